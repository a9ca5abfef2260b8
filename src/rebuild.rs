//! `spcs-image-scanner state rebuild`: a new store from what the daemon wrote, for when
//! the store is lost or damaged.
//!
//! The output directory holds nearly everything the store knew, as write-once files:
//! - `scans/<digest hex>/<timestamp>_<DB build>.json`: the grype documents; the newest
//!   valid one per digest becomes its last scan (`scanned`, with its result file, DB
//!   build and severity counts, read by [`crate::scanner::report::read_grype`]);
//! - `sboms/<digest hex>.syft.json` (and the cache `state.dir/sboms/`): package counts and
//!   the syft version; a digest with an SBOM and no grype document is `scanned` in
//!   SBOM-only mode (the next cycle re-matches it when a DB is usable); a digest with a
//!   result but no SBOM anywhere is `pending` (scanned again, which writes both);
//! - `inventory/<timestamp>.json`: every tag change (added, moved, removed); replayed in
//!   order, the newest record per tag wins, giving each `repository:tag` its digest (and
//!   index, platform, previous digests). Digests known only from inventory are `pending`:
//!   the next cycle scans them.
//!
//! What cannot be rebuilt: failure counts and retry times (failed digests become
//! `pending` and are retried at once), change records not yet written to `changes/`, the
//! vulnerability DB's update history, the media types of index manifests, and whether a
//! digest known only from inventory is a runnable image (a signature or chart recorded
//! `unsupported` before comes back `pending`, and its scan fails once).
//!
//! Order: the store must not be held by another process ([`StateError::Locked`], exit
//! 64); the output is read (nothing is written there); if nothing could be rebuilt from
//! a non-empty output directory the command fails and the old store stays where it is;
//! otherwise the old store is moved aside to `state.dir/db.corrupt-<UTC timestamp>`
//! ([`crate::state::retire`]: never deleted), a fresh store is created and filled in one
//! atomic batch, and SBOMs missing from `state.dir/sboms/` are copied there from
//! `output.dir/sboms/` (so re-matches need no registry traffic).
//!
//! Everything read is untrusted: a name becomes a digest only through [`Digest::parse`],
//! timestamps must parse, repository and tag names must pass the registry's own checks,
//! documents must parse as what they claim and name the digest they are filed under.
//! Symbolic links and anything that is not a regular file are skipped, never followed,
//! so nothing outside the directories is read. Each skipped file or record is counted
//! with its reason in the [`Summary`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

use crate::config::Config;
use crate::digest::Digest;
use crate::registry::{is_valid_repository_name, is_valid_tag};
use crate::scanner::report::{GrypeSummary, SbomSummary, read_grype, read_sbom};
use crate::state::{
    Batch, FLAG_EMPTY_SBOM, FLAG_STALE_DB, ImageRecord, ImageStatus, IndexRecord, MAX_TAG_HISTORY,
    PreviousDigest, Retired, ScanMode, ScanRecord, StateError, Store, TagRecord, tag_ref,
};
use crate::watcher::InventoryRecord;
use crate::worker::Worker;

/// Largest inventory file read (one cycle's tag changes; a real one is far smaller).
const MAX_INVENTORY_BYTES: u64 = 64 * 1024 * 1024;

/// Skipped files listed by name in the summary (all are counted).
const MAX_LISTED: usize = 50;

/// The media type recorded when the manifest's own is not known (indexes, and images
/// whose SBOM does not say).
pub const UNKNOWN_MEDIA_TYPE: &str = "unknown (rebuilt from output.dir)";

/// The rebuild could not run or found nothing.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The store is held by another process, or the new store cannot be written.
    #[error("state rebuild")]
    State(#[from] StateError),
    /// A directory of the output (or the SBOM cache) cannot be read or written.
    #[error("state rebuild: {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The output directory holds files, but none could be used.
    #[error(
        "state rebuild: nothing could be rebuilt from {dir} ({skipped} files or records skipped); the old store was left in place"
    )]
    Nothing {
        dir: PathBuf,
        skipped: usize,
        summary: Box<Summary>,
    },
    /// A store appeared while the old one was being moved aside (a daemon started).
    #[error(
        "state {path}: a new store was created by another process while rebuilding; stop it and run state rebuild again"
    )]
    Raced { path: PathBuf },
}

impl RebuildError {
    /// True for errors the operator must fix first (exit 64).
    pub fn is_setup_error(&self) -> bool {
        match self {
            RebuildError::State(e) => e.is_unusable_store(),
            RebuildError::Raced { .. } => true,
            _ => false,
        }
    }
}

/// What a rebuild found and did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Where the new store is.
    pub store: PathBuf,
    /// What happened to the old one (`None` when nothing was written).
    pub retired: Option<Retired>,
    pub tags: usize,
    /// Digests `scanned` with a grype result.
    pub scanned: usize,
    /// Digests `scanned` in SBOM-only mode (an SBOM, no grype document).
    pub sbom_only: usize,
    /// Digests `pending`: known only from inventory, or a result without an SBOM.
    pub pending: usize,
    pub indexes: usize,
    /// SBOMs copied into `state.dir/sboms/`.
    pub sboms_cached: usize,
    /// Skipped files and records per reason.
    pub skipped: BTreeMap<String, usize>,
    /// The first 50 skipped, as `path: reason (detail)`.
    pub listed: Vec<String>,
}

impl Summary {
    /// Files and records skipped.
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    fn skip(&mut self, path: &str, reason: &str, detail: Option<&str>) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
        if self.listed.len() < MAX_LISTED {
            let shown: String = path.escape_debug().take(200).collect();
            self.listed.push(match detail {
                Some(d) => format!(
                    "{shown}: {reason} ({})",
                    d.chars().take(200).collect::<String>()
                ),
                None => format!("{shown}: {reason}"),
            });
        }
    }

    /// The text `state rebuild` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match &self.retired {
            Some(Retired::Moved { to, damaged }) => {
                out.push_str(&format!("old store moved aside to {}", to.display()));
                if let Some(d) = damaged {
                    out.push_str(&format!(" (it could not be read: {d})"));
                }
                out.push('\n');
            }
            Some(Retired::Absent) => out.push_str("no old store (it was missing)\n"),
            None => {}
        }
        if self.retired.is_some() {
            out.push_str(&format!("new store: {}\n", self.store.display()));
        }
        out.push_str(&format!("tags: {}\n", self.tags));
        out.push_str(&format!("digests scanned: {}\n", self.scanned));
        out.push_str(&format!("digests sbom-only: {}\n", self.sbom_only));
        out.push_str(&format!(
            "digests pending: {} (scanned by the next cycle)\n",
            self.pending
        ));
        out.push_str(&format!("indexes: {}\n", self.indexes));
        out.push_str(&format!(
            "SBOMs restored into the cache: {}\n",
            self.sboms_cached
        ));
        out.push_str(&format!("skipped: {}\n", self.skipped_total()));
        for (reason, n) in &self.skipped {
            out.push_str(&format!("  {reason}: {n}\n"));
        }
        for line in &self.listed {
            out.push_str(&format!("  skipped {line}\n"));
        }
        out
    }
}

/// Rebuilds the store of `config` from its output directory and SBOM cache.
pub async fn rebuild(config: &Config, now: DateTime<Utc>) -> Result<Summary, RebuildError> {
    // Refuse before reading anything: a running daemon owns the store.
    crate::state::ensure_not_locked(&config.state_dir)?;
    let mut summary = Summary {
        store: config.state_dir.join("db"),
        ..Summary::default()
    };
    let output = &config.output_dir;
    let cache = Worker::sbom_cache_dir(&config.state_dir);

    let results = gather_results(output, &mut summary)?;
    let out_sboms = gather_sboms(output, &mut summary)?;
    let inventory = gather_inventory(output, &mut summary)?;
    let replay = replay(inventory);

    let mut digests: BTreeSet<Digest> = BTreeSet::new();
    digests.extend(results.keys().cloned());
    digests.extend(out_sboms.keys().cloned());
    digests.extend(replay.seen.keys().cloned());

    let mut images = Vec::new();
    let mut to_cache = Vec::new();
    for digest in &digests {
        let seen = replay.seen.get(digest);
        let tags: BTreeSet<String> = replay
            .tags
            .values()
            .filter(|t| &t.image_digest == digest)
            .map(TagRecord::reference)
            .collect();
        let result = results.get(digest);
        let first_seen = seen
            .map(|s| s.first_seen)
            .or(result.map(|r| r.finished_at))
            .unwrap_or(now);
        let out_sbom = out_sboms.get(digest);
        let sbom = match (out_sbom, result) {
            (Some(s), _) => Some(s.clone()),
            // The output lost its SBOM: the cache may still have it.
            (None, Some(_)) => {
                let path = cache.join(format!("{}.syft.json", digest.hex()));
                read_checked_sbom(&path, digest).ok()
            }
            (None, None) => None,
        };
        let mut record = ImageRecord::new(
            digest.clone(),
            sbom.as_ref()
                .and_then(|s| s.media_type.clone())
                .unwrap_or_else(|| UNKNOWN_MEDIA_TYPE.to_string()),
            first_seen,
        );
        record.tags = tags;
        if let Some(seen) = seen {
            record.repositories = seen.repositories.clone();
            record.index_digests = seen.indexes.clone();
            record.platform = seen.platform.clone();
        }
        let sbom_name = crate::output::Output::sbom_name(digest);
        match (&sbom, result) {
            (Some(sbom), Some(result)) => {
                let scan = ScanRecord {
                    finished_at: result.finished_at,
                    mode: ScanMode::Full,
                    syft_version: sbom.syft_version.clone(),
                    grype_version: result.grype_version.clone(),
                    db_build: result.summary.db_build.clone(),
                    db_schema: result.summary.db_schema.clone(),
                    result_file: Some(result.name.clone()),
                    sbom_file: sbom_name,
                    packages: sbom.summary.packages,
                    matches: result.summary.matches,
                    severities: result.summary.severities.clone(),
                    flags: flags(
                        sbom.summary.packages,
                        result.summary.db_build.as_deref(),
                        result.finished_at,
                        config,
                    ),
                };
                finish_scanned(&mut record, scan, config);
                summary.scanned += 1;
            }
            (Some(sbom), None) => {
                let scan = ScanRecord {
                    finished_at: sbom.written_at.unwrap_or(first_seen),
                    mode: ScanMode::SbomOnly,
                    syft_version: sbom.syft_version.clone(),
                    grype_version: None,
                    db_build: None,
                    db_schema: None,
                    result_file: None,
                    sbom_file: sbom_name,
                    packages: sbom.summary.packages,
                    matches: 0,
                    severities: BTreeMap::new(),
                    flags: flags(sbom.summary.packages, None, first_seen, config),
                };
                finish_scanned(&mut record, scan, config);
                summary.sbom_only += 1;
            }
            (None, _) => summary.pending += 1,
        }
        if record.status == ImageStatus::Scanned && out_sbom.is_some() {
            to_cache.push(digest.clone());
        }
        images.push(record);
    }

    if images.is_empty() && replay.tags.is_empty() && summary.skipped_total() > 0 {
        return Err(RebuildError::Nothing {
            dir: output.clone(),
            skipped: summary.skipped_total(),
            summary: Box::new(summary),
        });
    }

    summary.retired = Some(crate::state::retire(&config.state_dir, now)?);
    let store = Store::open(&config.state_dir)?;
    if !store.all_tags()?.is_empty() || !store.all_images()?.is_empty() {
        return Err(RebuildError::Raced {
            path: summary.store.clone(),
        });
    }
    let mut batch = Batch::default();
    for tag in replay.tags.values() {
        batch.put_tag(tag);
    }
    for index in replay.indexes.values() {
        batch.put_index(index);
    }
    for image in &images {
        batch.put_image(image);
    }
    store.commit(batch).await?;
    summary.tags = replay.tags.len();
    summary.indexes = replay.indexes.len();
    summary.sboms_cached = restore_cache(output, &cache, &to_cache)?;
    Ok(summary)
}

/// `scanned` with `scan`; an empty SBOM is looked at again after the configured delay.
fn finish_scanned(record: &mut ImageRecord, scan: ScanRecord, config: &Config) {
    record.status = ImageStatus::Scanned;
    record.attempts = 1;
    if scan.has_flag(FLAG_EMPTY_SBOM) {
        record.next_retry = Some(
            scan.finished_at
                + chrono::Duration::from_std(config.rescan.empty_sbom_retry)
                    .unwrap_or(chrono::Duration::hours(1)),
        );
    }
    record.last_scan = Some(scan);
}

/// The flags the worker would have set: `empty_sbom`, and `stale_db` when the DB was
/// older than `vulndb.max_age` at the time of the scan.
fn flags(
    packages: usize,
    db_build: Option<&str>,
    finished_at: DateTime<Utc>,
    config: &Config,
) -> Vec<String> {
    let mut out = Vec::new();
    let max_age = chrono::Duration::from_std(config.vulndb.max_age).ok();
    let built = db_build
        .and_then(|b| DateTime::parse_from_rfc3339(b).ok())
        .map(|b| b.with_timezone(&Utc));
    if let (Some(built), Some(max_age)) = (built, max_age) {
        if finished_at - built > max_age {
            out.push(FLAG_STALE_DB.to_string());
        }
    }
    if packages == 0 {
        out.push(FLAG_EMPTY_SBOM.to_string());
    }
    out
}

/// The newest valid grype document of a digest.
struct FoundResult {
    /// Relative to `output.dir`.
    name: String,
    finished_at: DateTime<Utc>,
    summary: GrypeSummary,
    grype_version: Option<String>,
}

/// A valid SBOM and what the store keeps of it.
#[derive(Clone)]
struct FoundSbom {
    summary: SbomSummary,
    syft_version: String,
    media_type: Option<String>,
    written_at: Option<DateTime<Utc>>,
}

/// The parts of a syft or grype document that say which image and which tool.
#[derive(Deserialize)]
struct Probe {
    source: Option<ProbeSource>,
    descriptor: Option<ProbeDescriptor>,
}

#[derive(Deserialize)]
struct ProbeSource {
    /// grype: the image (from the SBOM's source metadata), or a path string.
    target: Option<serde_json::Value>,
    /// syft: the image.
    metadata: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ProbeDescriptor {
    version: Option<String>,
}

/// The manifest digest, media type and tool version a document names.
struct Probed {
    manifest_digest: Option<String>,
    media_type: Option<String>,
    version: Option<String>,
}

fn probe(path: &Path) -> Result<Probed, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let probe: Probe =
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| e.to_string())?;
    let image = probe.source.as_ref().and_then(|s| {
        s.target
            .as_ref()
            .filter(|t| t.is_object())
            .or(s.metadata.as_ref())
    });
    let field = |name: &str| {
        image
            .and_then(|i| i.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Ok(Probed {
        manifest_digest: field("manifestDigest"),
        // Only a plausible media type is kept: it is shown by the API.
        media_type: field("mediaType").filter(|m| {
            m.len() <= 200
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".+-/_".contains(&b))
        }),
        version: probe
            .descriptor
            .and_then(|d| d.version)
            .filter(|v| v.len() <= 100),
    })
}

/// A directory entry: its name (UTF-8 only) and whether it is a real file or directory.
enum Entry {
    File(String),
    Dir(String),
    /// A symbolic link or something else: never followed.
    Other(String, &'static str),
    /// A name that is not UTF-8.
    BadName(String),
}

fn entries(dir: &Path) -> Result<Vec<Entry>, RebuildError> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RebuildError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for item in read {
        let item = item.map_err(|source| RebuildError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let Some(name) = item.file_name().to_str().map(str::to_string) else {
            out.push(Entry::BadName(
                item.file_name().to_string_lossy().to_string(),
            ));
            continue;
        };
        // symlink_metadata: a link is reported as a link, never as what it points at.
        match std::fs::symlink_metadata(item.path()) {
            Ok(m) if m.file_type().is_symlink() => out.push(Entry::Other(name, "symbolic link")),
            Ok(m) if m.is_file() => out.push(Entry::File(name)),
            Ok(m) if m.is_dir() => out.push(Entry::Dir(name)),
            Ok(_) => out.push(Entry::Other(name, "not a regular file")),
            Err(_) => out.push(Entry::Other(name, "unreadable")),
        }
    }
    out.sort_by(|a, b| entry_name(a).cmp(entry_name(b)));
    Ok(out)
}

fn entry_name(e: &Entry) -> &str {
    match e {
        Entry::File(n) | Entry::Dir(n) | Entry::Other(n, _) | Entry::BadName(n) => n,
    }
}

/// The top-level `sub` of `root`, unless it is a link (then skipped and counted).
fn subdir(root: &Path, sub: &str, summary: &mut Summary) -> Option<PathBuf> {
    let dir = root.join(sub);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => Some(dir),
        Ok(m) if m.file_type().is_symlink() => {
            summary.skip(sub, "symbolic link", None);
            None
        }
        Ok(_) => {
            summary.skip(sub, "not a directory", None);
            None
        }
        Err(_) => None,
    }
}

/// A digest from a file-name hex part (`sha256`, or `sha512` by its length).
fn digest_of_hex(hex: &str) -> Option<Digest> {
    let algorithm = match hex.len() {
        64 => "sha256",
        128 => "sha512",
        _ => return None,
    };
    Digest::parse(&format!("{algorithm}:{hex}")).ok()
}

/// `20261203T174512.123Z` as written by [`crate::output::timestamp`].
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y%m%dT%H%M%S%.3fZ")
        .ok()
        .map(|t| t.and_utc())
}

/// The numeric suffix [`crate::output::Output::free_name`] adds to a taken name.
fn name_suffix(stem: &str) -> u32 {
    stem.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

/// `<timestamp>_<label>(-n).json`: its time and suffix.
fn parse_result_name(name: &str) -> Option<(DateTime<Utc>, u32)> {
    let stem = name.strip_suffix(".json")?;
    let (ts, label) = stem.split_once('_')?;
    if label.is_empty()
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return None;
    }
    Some((parse_timestamp(ts)?, name_suffix(label)))
}

/// `<timestamp>(-n).json`: its time and suffix.
fn parse_inventory_name(name: &str) -> Option<(DateTime<Utc>, u32)> {
    let stem = name.strip_suffix(".json")?;
    let (ts, n) = match stem.split_once('-') {
        Some((ts, n)) => (ts, n.parse().ok()?),
        None => (stem, 0),
    };
    Some((parse_timestamp(ts)?, n))
}

fn gather_results(
    output: &Path,
    summary: &mut Summary,
) -> Result<BTreeMap<Digest, FoundResult>, RebuildError> {
    let mut out = BTreeMap::new();
    let Some(scans) = subdir(output, "scans", summary) else {
        return Ok(out);
    };
    for entry in entries(&scans)? {
        let name = match entry {
            Entry::Dir(name) => name,
            Entry::File(name) => {
                summary.skip(&format!("scans/{name}"), "not a digest directory", None);
                continue;
            }
            Entry::Other(name, why) => {
                summary.skip(&format!("scans/{name}"), why, None);
                continue;
            }
            Entry::BadName(name) => {
                summary.skip(&format!("scans/{name}"), "not a digest", None);
                continue;
            }
        };
        let Some(digest) = digest_of_hex(&name) else {
            summary.skip(&format!("scans/{name}"), "not a digest", None);
            continue;
        };
        let dir = scans.join(&name);
        let mut candidates = Vec::new();
        for entry in entries(&dir)? {
            let file = match entry {
                Entry::File(file) => file,
                Entry::Dir(file) => {
                    summary.skip(&format!("scans/{name}/{file}"), "not a regular file", None);
                    continue;
                }
                Entry::Other(file, why) => {
                    summary.skip(&format!("scans/{name}/{file}"), why, None);
                    continue;
                }
                Entry::BadName(file) => {
                    summary.skip(
                        &format!("scans/{name}/{file}"),
                        "not a result file name",
                        None,
                    );
                    continue;
                }
            };
            match parse_result_name(&file) {
                Some((at, n)) => candidates.push((at, n, file)),
                None => summary.skip(
                    &format!("scans/{name}/{file}"),
                    "not a result file name",
                    None,
                ),
            }
        }
        // Newest first: the first valid one is the digest's last result.
        candidates.sort_by(|a, b| b.cmp(a));
        for (at, _, file) in candidates {
            let rel = format!("scans/{name}/{file}");
            let path = dir.join(&file);
            let summary_doc = match read_grype(&path) {
                Ok(s) => s,
                Err(e) => {
                    summary.skip(
                        &rel,
                        "not a grype document",
                        Some(&crate::scanner::error_chain(&e)),
                    );
                    continue;
                }
            };
            let probed = match probe(&path) {
                Ok(p) => p,
                Err(e) => {
                    summary.skip(&rel, "not a grype document", Some(&e));
                    continue;
                }
            };
            if probed
                .manifest_digest
                .as_deref()
                .is_some_and(|d| d != digest.as_str())
            {
                summary.skip(
                    &rel,
                    "result for another digest",
                    probed.manifest_digest.as_deref(),
                );
                continue;
            }
            out.insert(
                digest.clone(),
                FoundResult {
                    name: rel,
                    finished_at: at,
                    summary: summary_doc,
                    grype_version: probed.version,
                },
            );
            break;
        }
    }
    Ok(out)
}

/// Validates an SBOM file filed under `digest`.
fn read_checked_sbom(path: &Path, digest: &Digest) -> Result<FoundSbom, (&'static str, String)> {
    let sbom = read_sbom(path).map_err(|e| ("not a syft SBOM", crate::scanner::error_chain(&e)))?;
    let probed = probe(path).map_err(|e| ("not a syft SBOM", e))?;
    if let Some(d) = probed.manifest_digest.as_deref() {
        if d != digest.as_str() {
            return Err(("SBOM of another digest", d.to_string()));
        }
    }
    let written_at = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(DateTime::<Utc>::from);
    Ok(FoundSbom {
        summary: sbom,
        syft_version: probed.version.unwrap_or_else(|| "unknown".to_string()),
        media_type: probed.media_type,
        written_at,
    })
}

fn gather_sboms(
    output: &Path,
    summary: &mut Summary,
) -> Result<BTreeMap<Digest, FoundSbom>, RebuildError> {
    let mut out = BTreeMap::new();
    let Some(dir) = subdir(output, "sboms", summary) else {
        return Ok(out);
    };
    for entry in entries(&dir)? {
        let name = match entry {
            Entry::File(name) => name,
            Entry::Dir(name) => {
                summary.skip(&format!("sboms/{name}"), "not a regular file", None);
                continue;
            }
            Entry::Other(name, why) => {
                summary.skip(&format!("sboms/{name}"), why, None);
                continue;
            }
            Entry::BadName(name) => {
                summary.skip(&format!("sboms/{name}"), "not an SBOM file name", None);
                continue;
            }
        };
        let rel = format!("sboms/{name}");
        let Some(digest) = name.strip_suffix(".syft.json").and_then(digest_of_hex) else {
            summary.skip(&rel, "not an SBOM file name", None);
            continue;
        };
        match read_checked_sbom(&dir.join(&name), &digest) {
            Ok(sbom) => {
                out.insert(digest, sbom);
            }
            Err((reason, detail)) => summary.skip(&rel, reason, Some(&detail)),
        }
    }
    Ok(out)
}

/// Valid inventory records, in the order they were observed.
fn gather_inventory(
    output: &Path,
    summary: &mut Summary,
) -> Result<Vec<InventoryRecord>, RebuildError> {
    let Some(dir) = subdir(output, "inventory", summary) else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    for entry in entries(&dir)? {
        match entry {
            Entry::File(name) => match parse_inventory_name(&name) {
                Some((at, n)) => files.push((at, n, name)),
                None => summary.skip(
                    &format!("inventory/{name}"),
                    "not an inventory file name",
                    None,
                ),
            },
            Entry::Dir(name) => {
                summary.skip(&format!("inventory/{name}"), "not a regular file", None)
            }
            Entry::Other(name, why) => summary.skip(&format!("inventory/{name}"), why, None),
            Entry::BadName(name) => summary.skip(
                &format!("inventory/{name}"),
                "not an inventory file name",
                None,
            ),
        }
    }
    files.sort();
    let mut out = Vec::new();
    for (_, _, name) in files {
        let rel = format!("inventory/{name}");
        let records = match read_inventory(&dir.join(&name)) {
            Ok(r) => r,
            Err(e) => {
                summary.skip(&rel, "not an inventory file", Some(&e));
                continue;
            }
        };
        for (i, record) in records.into_iter().enumerate() {
            match check_record(record) {
                Ok(r) => out.push(r),
                Err(why) => summary.skip(
                    &format!("{rel}[{i}]"),
                    "invalid inventory record",
                    Some(why),
                ),
            }
        }
    }
    // Stable: records of one observation keep their file order.
    out.sort_by_key(|r| r.observed_at);
    Ok(out)
}

fn read_inventory(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size > MAX_INVENTORY_BYTES {
        return Err(format!(
            "{size} bytes is over the {MAX_INVENTORY_BYTES}-byte limit"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_INVENTORY_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    // Records one by one: a bad record does not spoil the others of its file.
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// A record whose every name and digest is valid.
fn check_record(value: serde_json::Value) -> Result<InventoryRecord, &'static str> {
    let record: InventoryRecord =
        serde_json::from_value(value).map_err(|_| "not an inventory record")?;
    if !is_valid_repository_name(&record.repository) {
        return Err("invalid repository name");
    }
    if !is_valid_tag(&record.tag) {
        return Err("invalid tag");
    }
    Digest::parse(&record.digest).map_err(|_| "invalid digest")?;
    for d in [&record.index_digest, &record.previous_digest]
        .into_iter()
        .flatten()
    {
        Digest::parse(d).map_err(|_| "invalid digest")?;
    }
    if !matches!(record.change.as_str(), "added" | "moved" | "removed") {
        return Err("unknown change");
    }
    if let Some(p) = &record.platform {
        if p.is_empty()
            || p.len() > 64
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
        {
            return Err("invalid platform");
        }
    }
    Ok(record)
}

/// What a digest was seen as in inventory.
struct Seen {
    first_seen: DateTime<Utc>,
    repositories: BTreeSet<String>,
    indexes: BTreeSet<Digest>,
    platform: Option<String>,
}

/// Inventory replayed: the tags as they are now, indexes, and every digest seen.
#[derive(Default)]
struct Replay {
    tags: BTreeMap<String, TagRecord>,
    indexes: BTreeMap<Digest, IndexRecord>,
    seen: BTreeMap<Digest, Seen>,
}

fn replay(records: Vec<InventoryRecord>) -> Replay {
    let mut out = Replay::default();
    for r in records {
        // Checked by check_record.
        let (Ok(image), Ok(index)) = (
            Digest::parse(&r.digest),
            r.index_digest.as_deref().map(Digest::parse).transpose(),
        ) else {
            continue;
        };
        let at = r.observed_at;
        let seen = out.seen.entry(image.clone()).or_insert_with(|| Seen {
            first_seen: at,
            repositories: BTreeSet::new(),
            indexes: BTreeSet::new(),
            platform: None,
        });
        seen.first_seen = seen.first_seen.min(at);
        seen.repositories.insert(r.repository.clone());
        if let Some(index) = index.as_ref().filter(|i| **i != image) {
            seen.indexes.insert(index.clone());
            if r.platform.is_some() {
                seen.platform = r.platform.clone();
            }
            let platform = r.platform.clone().unwrap_or_default();
            out.indexes
                .entry(index.clone())
                .and_modify(|i| i.child = Some(image.clone()))
                .or_insert_with(|| IndexRecord {
                    digest: index.clone(),
                    media_type: UNKNOWN_MEDIA_TYPE.to_string(),
                    platform,
                    child: Some(image.clone()),
                    first_seen: at,
                });
        }
        let reference = tag_ref(&r.repository, &r.tag);
        if r.change == "removed" {
            // As the watcher does: a removed tag has no record; if it comes back it
            // starts a new history.
            out.tags.remove(&reference);
            continue;
        }
        let target = index.clone().unwrap_or_else(|| image.clone());
        match out.tags.get_mut(&reference) {
            Some(tag) => {
                if tag.digest != target || tag.image_digest != image {
                    tag.previous.insert(
                        0,
                        PreviousDigest {
                            digest: tag.digest.clone(),
                            image_digest: tag.image_digest.clone(),
                            until: at,
                        },
                    );
                    tag.previous.truncate(MAX_TAG_HISTORY);
                    tag.changed_at = at;
                }
                tag.digest = target;
                tag.image_digest = image;
                tag.platform = r.platform.clone();
                tag.last_seen = at;
            }
            None => {
                out.tags.insert(
                    reference,
                    TagRecord {
                        repository: r.repository.clone(),
                        tag: r.tag.clone(),
                        digest: target,
                        image_digest: image,
                        platform: r.platform.clone(),
                        first_seen: at,
                        last_seen: at,
                        changed_at: at,
                        previous: Vec::new(),
                    },
                );
            }
        }
    }
    out
}

/// Copies SBOMs of `digests` missing from the cache there from the output (temp file and
/// rename in the cache directory, so a crash leaves no partial SBOM under its name).
fn restore_cache(output: &Path, cache: &Path, digests: &[Digest]) -> Result<usize, RebuildError> {
    if digests.is_empty() {
        return Ok(0);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RebuildError::Io { path, source }
    };
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let mut copied = 0;
    for digest in digests {
        let name = format!("{}.syft.json", digest.hex());
        let target = cache.join(&name);
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let source = output.join("sboms").join(&name);
        // Checked as a regular file when gathered; a link now is skipped.
        if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let tmp = cache.join(format!(".{name}.rebuild"));
        std::fs::copy(&source, &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        copied += 1;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_only_when_well_formed() {
        let (at, n) = parse_result_name("20261203T174512.123Z_20261201T000000Z.json").unwrap();
        assert_eq!(n, 0);
        assert_eq!(at.to_rfc3339(), "2026-12-03T17:45:12.123+00:00");
        assert_eq!(
            parse_result_name("20261203T174512.123Z_20261201T000000Z-2.json")
                .unwrap()
                .1,
            2
        );
        assert_eq!(
            parse_result_name("20261203T174512.123Z_unknown-db.json")
                .unwrap()
                .1,
            0
        );
        for bad in [
            "x.json",
            "20261203T174512.123Z_.json",
            "20261203T174512.123Z_a/../b.json",
            "20261203T174512.123Z_x.txt",
            "2026-12-03_x.json",
        ] {
            assert!(parse_result_name(bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_inventory_name("20261203T174512.123Z-1.json")
                .unwrap()
                .1,
            1
        );
        assert!(parse_inventory_name("20261203T174512.123Z-x.json").is_none());
        assert!(digest_of_hex(&"a".repeat(64)).is_some());
        assert!(digest_of_hex(&"A".repeat(64)).is_none());
        assert!(digest_of_hex("..").is_none());
    }

    fn record(tag: &str, digest: char, change: &str, at: i64) -> InventoryRecord {
        InventoryRecord {
            repository: "demo/x".into(),
            tag: tag.into(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            index_digest: None,
            platform: None,
            change: change.into(),
            previous_digest: None,
            observed_at: DateTime::from_timestamp(at, 0).unwrap(),
        }
    }

    #[test]
    fn replay_keeps_the_newest_record_per_tag_and_its_history() {
        let r = replay(vec![
            record("1", 'a', "added", 10),
            record("2", 'a', "added", 10),
            record("1", 'b', "moved", 20),
            record("2", 'a', "removed", 30),
        ]);
        assert_eq!(r.tags.len(), 1);
        let tag = &r.tags["demo/x:1"];
        assert_eq!(tag.image_digest.hex(), "b".repeat(64));
        assert_eq!(tag.previous.len(), 1);
        assert_eq!(tag.previous[0].image_digest.hex(), "a".repeat(64));
        assert_eq!(r.seen.len(), 2);
    }

    #[test]
    fn hostile_records_are_refused() {
        let mut bad = record("1", 'a', "added", 1);
        bad.repository = "../etc".into();
        let bad = serde_json::to_value(bad).unwrap();
        assert_eq!(check_record(bad).err(), Some("invalid repository name"));
        let mut bad = record("1", 'a', "added", 1);
        bad.digest = "sha256:../../x".into();
        assert_eq!(
            check_record(serde_json::to_value(bad).unwrap()).err(),
            Some("invalid digest")
        );
        assert!(check_record(serde_json::json!({"x": 1})).is_err());
    }
}
