//! Result files under `output.dir` (in SPCS a stage mount, loaded by Snowpipe):
//!
//! - `scans/<digest hex>/<UTC timestamp>_<DB build>.json`: the grype document, unchanged;
//! - `sboms/<digest hex>.syft.json`: the SBOM;
//! - `inventory/<UTC timestamp>.json`: tag changes seen by one cycle;
//! - `changes/<UTC timestamp>.json`: findings changed by re-matches ([`crate::changes`]);
//! - `failures/<UTC timestamp>_<digest hex>.json`: one failed scan or re-match
//!   ([`crate::failures`]).
//!
//! Invariants:
//! - A name is never reused: files are created with `create_new`, and a taken name gets
//!   a numeric suffix. Snowpipe never reloads a name it has loaded, so overwriting would
//!   silently lose data.
//! - A stage mount cannot rename atomically, so content is prepared in a local file and
//!   then written once, sequentially, under its final name, and synced.
//! - Names are built only from validated digests ([`Digest::hex`]), timestamps and a
//!   sanitized DB build: nothing from the registry becomes a path unchecked.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Suffixes tried when a name is taken (two results in the same millisecond).
const MAX_NAME_SUFFIX: u32 = 1000;

/// Writing an output file failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output {path}: cannot write")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("output {path}: no free name after {MAX_NAME_SUFFIX} tries")]
    NoFreeName { path: PathBuf },
}

/// The output directory.
#[derive(Debug, Clone)]
pub struct Output {
    dir: PathBuf,
}

/// A file written: its name relative to `output.dir`, size and sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `20261203T174512.123Z`: sortable, no `:` (unsafe on some stage paths).
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// A DB build time as a file-name part: `20261201T000000Z`, else the sanitized text.
pub fn db_build_label(build: Option<&str>) -> String {
    match build {
        None => "unknown-db".to_string(),
        Some(b) => match DateTime::parse_from_rfc3339(b) {
            Ok(t) => t.with_timezone(&Utc).format("%Y%m%dT%H%M%SZ").to_string(),
            Err(_) => {
                let clean: String = b
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                    .take(64)
                    .collect();
                if clean.is_empty() {
                    "unknown-db".to_string()
                } else {
                    clean
                }
            }
        },
    }
}

impl Output {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Output { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `scans/<hex>/<timestamp>_<build>.json`.
    pub fn scan_result_name(digest: &Digest, at: DateTime<Utc>, db_build: Option<&str>) -> String {
        format!(
            "scans/{}/{}_{}.json",
            digest.hex(),
            timestamp(at),
            db_build_label(db_build)
        )
    }

    /// `sboms/<hex>.syft.json`.
    pub fn sbom_name(digest: &Digest) -> String {
        format!("sboms/{}.syft.json", digest.hex())
    }

    /// `inventory/<timestamp>.json`.
    pub fn inventory_name(at: DateTime<Utc>) -> String {
        format!("inventory/{}.json", timestamp(at))
    }

    /// `failures/<timestamp>_<hex>.json`: the digest in the name, so that two digests
    /// failing in the same millisecond do not need a suffix.
    pub fn failure_name(digest: &Digest, at: DateTime<Utc>) -> String {
        format!("failures/{}_{}.json", timestamp(at), digest.hex())
    }

    /// The absolute path of a relative output name.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Picks a free name near `name` (adding `-1`, `-2` ... before the extension).
    pub fn free_name(&self, name: &str) -> Result<String, OutputError> {
        if !self.path(name).exists() {
            return Ok(name.to_string());
        }
        // The suffix goes before the last extension of the file name.
        let (stem, ext) = name
            .rsplit_once('.')
            .filter(|(_, e)| !e.contains('/'))
            .map(|(s, e)| (s, format!(".{e}")))
            .unwrap_or((name, String::new()));
        for i in 1..MAX_NAME_SUFFIX {
            let candidate = format!("{stem}-{i}{ext}");
            if !self.path(&candidate).exists() {
                return Ok(candidate);
            }
        }
        Err(OutputError::NoFreeName {
            path: self.path(name),
        })
    }

    /// Writes `bytes` once under `name`, or a free name next to it; never overwrites.
    pub fn write_new(&self, name: &str, bytes: &[u8]) -> Result<Written, OutputError> {
        for _ in 0..MAX_NAME_SUFFIX {
            let candidate = self.free_name(name)?;
            match self.create_and_write(&candidate, &mut std::io::Cursor::new(bytes)) {
                Ok(w) => return Ok(w),
                Err(CreateError::Exists) => continue,
                Err(CreateError::Io(path, source)) => {
                    return Err(OutputError::Write { path, source });
                }
            }
        }
        Err(OutputError::NoFreeName {
            path: self.path(name),
        })
    }

    /// Copies the local file `src` once under exactly `name`. `Ok(None)` if `name`
    /// already exists (left untouched).
    pub fn copy_if_absent(&self, src: &Path, name: &str) -> Result<Option<Written>, OutputError> {
        let mut file = std::fs::File::open(src).map_err(|source| OutputError::Write {
            path: src.to_path_buf(),
            source,
        })?;
        match self.create_and_write(name, &mut file) {
            Ok(w) => Ok(Some(w)),
            Err(CreateError::Exists) => Ok(None),
            Err(CreateError::Io(path, source)) => Err(OutputError::Write { path, source }),
        }
    }

    /// True when `name` exists with exactly this size and sha256.
    pub fn is_complete(&self, name: &str, size: u64, sha256: &str) -> bool {
        let path = self.path(name);
        // The size first: a partial file is told apart without reading it.
        std::fs::metadata(&path).is_ok_and(|m| m.len() == size)
            && file_sha256(&path).is_ok_and(|(n, sum)| n == size && sum == sha256)
    }

    /// Removes `name` if it exists.
    pub fn remove(&self, name: &str) -> Result<(), OutputError> {
        match std::fs::remove_file(self.path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OutputError::Write {
                path: self.path(name),
                source,
            }),
        }
    }

    fn create_and_write(
        &self,
        name: &str,
        content: &mut dyn std::io::Read,
    ) -> Result<Written, CreateError> {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CreateError::Io(parent.to_path_buf(), e))?;
        }
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CreateError::Exists);
            }
            Err(e) => return Err(CreateError::Io(path, e)),
        };
        let result = (|| {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = content.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
                size += n as u64;
            }
            file.flush()?;
            file.sync_all()?;
            Ok::<_, std::io::Error>((size, hex::encode(hasher.finalize())))
        })();
        match result {
            Ok((size, sha256)) => Ok(Written {
                name: name.to_string(),
                size,
                sha256,
            }),
            Err(e) => {
                // Never leave a partial file under a final name.
                drop(file);
                let _ = std::fs::remove_file(&path);
                Err(CreateError::Io(path, e))
            }
        }
    }
}

enum CreateError {
    Exists,
    Io(PathBuf, std::io::Error),
}

/// sha256 and size of a local file.
pub fn file_sha256(path: &Path) -> std::io::Result<(u64, String)> {
    // Streamed: a grype document may be hundreds of MB.
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let out = Output::new(dir.path());
        let a = out.write_new("inventory/x.json", b"one").unwrap();
        let t1 = out
            .write_new("inventory/20261203T174512.123Z.json", b"1")
            .unwrap();
        let t2 = out
            .write_new("inventory/20261203T174512.123Z.json", b"2")
            .unwrap();
        assert_eq!(t2.name, "inventory/20261203T174512.123Z-1.json");
        assert_ne!(t1.name, t2.name);
        let b = out.write_new("inventory/x.json", b"two").unwrap();
        assert_eq!(a.name, "inventory/x.json");
        assert_eq!(b.name, "inventory/x-1.json");
        assert_eq!(std::fs::read(out.path(&a.name)).unwrap(), b"one");
        assert!(out.is_complete(&b.name, 3, &b.sha256));
        assert!(!out.is_complete(&b.name, 4, &b.sha256));
    }

    #[test]
    fn copy_if_absent_leaves_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = Output::new(dir.path().join("o"));
        let src = dir.path().join("src");
        std::fs::write(&src, b"sbom").unwrap();
        assert!(
            out.copy_if_absent(&src, "sboms/a.syft.json")
                .unwrap()
                .is_some()
        );
        std::fs::write(&src, b"changed").unwrap();
        assert!(
            out.copy_if_absent(&src, "sboms/a.syft.json")
                .unwrap()
                .is_none()
        );
        assert_eq!(
            std::fs::read(out.path("sboms/a.syft.json")).unwrap(),
            b"sbom"
        );
    }

    #[test]
    fn labels_are_safe_file_name_parts() {
        assert_eq!(
            db_build_label(Some("2026-12-01T00:00:00Z")),
            "20261201T000000Z"
        );
        assert_eq!(db_build_label(Some("../../etc")), "....etc");
        assert_eq!(db_build_label(None), "unknown-db");
        let d = Digest::parse(&format!("sha256:{}", "f".repeat(64))).unwrap();
        let at = DateTime::parse_from_rfc3339("2026-12-03T17:45:12.123Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            Output::scan_result_name(&d, at, Some("2026-12-01T00:00:00Z")),
            format!(
                "scans/{}/20261203T174512.123Z_20261201T000000Z.json",
                "f".repeat(64)
            )
        );
    }
}
