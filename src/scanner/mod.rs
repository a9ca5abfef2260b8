//! Scanning one digest: `syft registry:<host>/<repo>@<digest>` writes a syft-json SBOM,
//! then `grype sbom:<file>` matches it (unless `scanner.grype = ""`: SBOM-only mode).
//!
//! Invariants:
//! - Each scan runs in its own directory under `state.dir/tmp/` (also the children's
//!   `TMPDIR`, where syft leaves `stereoscope-*` after a signal); it is removed when the
//!   [`ScanArtifacts`] are dropped, and whatever a crash leaves there is removed at
//!   start-up.
//! - Registry credentials reach syft only as `SYFT_REGISTRY_AUTH_*` variables; grype reads
//!   the SBOM and gets none. Update checks are off; grype never updates its DB during a
//!   scan: it runs with the settings of [`crate::vulndb`] and holds a DB permit, so no
//!   update replaces the DB under it.
//! - A result counts only if the child exited 0, was not killed by a signal, and its
//!   output file parses as the expected document ([`report`]).

pub mod process;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::digest::Digest;
use crate::registry::auth::Credentials;
use crate::vulndb::{Readiness, VulnDb};
use process::{Invocation, ProcessError, readable_tail, readable_tail_redacted};
use report::{GrypeSummary, ReportError, SbomSummary};

/// Variables passed through from the daemon's environment to the scanners: what they
/// need to find programs, certificates, proxies and grype's default DB location.
const PASSTHROUGH_ENV: [&str; 14] = [
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "XDG_CACHE_HOME",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
];

/// Characters of a scanner's stderr kept in an error message.
const STDERR_IN_ERROR: usize = 1500;

/// How long `syft version` / `grype version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(60);

/// A scan failed; recorded on the digest and retried later.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot prepare scan directory {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} could not run")]
    Process {
        tool: &'static str,
        #[source]
        source: ProcessError,
    },
    #[error("{tool} exited with code {code}: {stderr}")]
    Exit {
        tool: &'static str,
        code: i32,
        stderr: String,
    },
    #[error("{tool} was killed by signal {signal}: not a result")]
    Signalled { tool: &'static str, signal: i32 },
    #[error("{tool} output refused")]
    Output {
        tool: &'static str,
        #[source]
        source: ReportError,
    },
    #[error("{tool} version could not be read: {reason}")]
    Version { tool: &'static str, reason: String },
    /// The DB may not be used now (missing, or stale with `on_stale = "hold"`): the
    /// digest waits, it has not failed.
    #[error("{0}")]
    DbUnavailable(String),
}

impl ScanError {
    /// True when the scan was stopped by shutdown (the digest goes back to pending,
    /// not to failed).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            ScanError::Process {
                source: ProcessError::Cancelled { .. },
                ..
            }
        )
    }
}

/// What a successful scan produced, in its own temporary directory (removed on drop).
#[derive(Debug)]
pub struct ScanArtifacts {
    dir: tempfile::TempDir,
    pub sbom: SbomSummary,
    pub grype: Option<GrypeSummary>,
    pub syft_version: String,
    pub grype_version: Option<String>,
    /// Matched with a DB past `vulndb.max_age` (`on_stale = "scan-and-flag"`).
    pub stale_db: bool,
}

impl ScanArtifacts {
    /// The SBOM file.
    pub fn sbom_path(&self) -> PathBuf {
        self.dir.path().join(SBOM_FILE)
    }

    /// The grype document, if grype ran.
    pub fn grype_path(&self) -> Option<PathBuf> {
        self.grype
            .as_ref()
            .map(|_| self.dir.path().join(GRYPE_FILE))
    }
}

/// What a re-match produced, in its own temporary directory (removed on drop).
#[derive(Debug)]
pub struct MatchArtifacts {
    dir: tempfile::TempDir,
    pub grype_path: PathBuf,
    pub summary: GrypeSummary,
    pub grype_version: String,
    pub stale_db: bool,
}

impl MatchArtifacts {
    /// The temporary directory (kept alive as long as this value).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

struct Matched {
    summary: GrypeSummary,
    version: String,
    stale: bool,
}

/// The variables of `env` that children may see ([`PASSTHROUGH_ENV`]).
pub fn passthrough_env(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    env.into_iter()
        .filter(|(k, _)| PASSTHROUGH_ENV.contains(&k.as_str()))
        .collect()
}

const SBOM_FILE: &str = "sbom.syft.json";
const GRYPE_FILE: &str = "grype.json";

/// Runs syft and grype.
pub struct Scanner {
    syft: PathBuf,
    grype: Option<PathBuf>,
    timeout: Duration,
    vulndb: Arc<VulnDb>,
    tmp_root: PathBuf,
    registry_host: String,
    plain_http: bool,
    passthrough: Vec<(String, String)>,
    syft_version: Mutex<Option<String>>,
    grype_version: Mutex<Option<String>>,
}

impl Scanner {
    /// A scanner for `config`; children get [`passthrough_env`] of the daemon's
    /// environment, and grype its DB settings from `vulndb`.
    pub fn new(config: &Config, passthrough: Vec<(String, String)>, vulndb: Arc<VulnDb>) -> Self {
        Scanner {
            syft: config.scanner.syft.clone(),
            grype: config.scanner.grype.clone(),
            timeout: config.scanner.timeout,
            vulndb,
            tmp_root: Self::tmp_root(&config.state_dir),
            registry_host: config.registry.host.clone(),
            plain_http: config.registry.plain_http,
            passthrough,
            syft_version: Mutex::new(None),
            grype_version: Mutex::new(None),
        }
    }

    /// `state.dir/tmp`, where scan directories live.
    pub fn tmp_root(state_dir: &Path) -> PathBuf {
        state_dir.join("tmp")
    }

    /// True in SBOM-only mode.
    pub fn sbom_only(&self) -> bool {
        self.grype.is_none()
    }

    /// Scans `repository@digest`.
    pub async fn scan(
        &self,
        repository: &str,
        digest: &Digest,
        credentials: Option<&Credentials>,
        cancel: &CancellationToken,
    ) -> Result<ScanArtifacts, ScanError> {
        let dir = self.scan_dir(digest)?;
        let syft_version = self
            .version("syft", &self.syft, &self.syft_version, dir.path(), cancel)
            .await?;
        let sbom_path = dir.path().join(SBOM_FILE);
        let mut syft = self
            .base(&self.syft, dir.path())
            .arg(format!(
                "registry:{}/{}@{}",
                self.registry_host, repository, digest
            ))
            .arg("-o")
            .arg(format!("syft-json={}", sbom_path.display()))
            .env("SYFT_CHECK_FOR_APP_UPDATE", "false");
        if self.plain_http {
            syft = syft.env("SYFT_REGISTRY_INSECURE_USE_HTTP", "true");
        }
        if let Some(c) = credentials {
            syft = syft
                .env("SYFT_REGISTRY_AUTH_AUTHORITY", self.registry_host.clone())
                .env("SYFT_REGISTRY_AUTH_USERNAME", c.username.clone())
                .secret_env("SYFT_REGISTRY_AUTH_PASSWORD", &c.password);
        }
        self.run_tool("syft", &syft, cancel, credentials).await?;
        let sbom = report::read_sbom(&sbom_path).map_err(|source| ScanError::Output {
            tool: "syft",
            source,
        })?;

        let (grype, grype_version, stale) = match &self.grype {
            None => (None, None, false),
            Some(_) => {
                let matched = self.match_into(&sbom_path, dir.path(), cancel).await?;
                (Some(matched.summary), Some(matched.version), matched.stale)
            }
        };
        Ok(ScanArtifacts {
            dir,
            sbom,
            grype,
            syft_version,
            grype_version,
            stale_db: stale,
        })
    }

    /// An invocation with the passthrough environment and `TMPDIR` set to the scan
    /// directory.
    fn base(&self, program: &Path, dir: &Path) -> Invocation {
        let mut inv = Invocation::new(program, dir);
        for (k, v) in &self.passthrough {
            inv = inv.env(k, v.clone());
        }
        inv.env("TMPDIR", dir.display().to_string())
    }

    /// Matches the cached SBOM at `sbom` against the current DB (a re-match: no registry
    /// traffic).
    pub async fn rematch(
        &self,
        digest: &Digest,
        sbom: &Path,
        cancel: &CancellationToken,
    ) -> Result<MatchArtifacts, ScanError> {
        let dir = self.scan_dir(digest)?;
        let matched = self.match_into(sbom, dir.path(), cancel).await?;
        Ok(MatchArtifacts {
            grype_path: dir.path().join(GRYPE_FILE),
            dir,
            summary: matched.summary,
            grype_version: matched.version,
            stale_db: matched.stale,
        })
    }

    /// `grype sbom:<sbom> -o json=<dir>/grype.json` under a DB permit.
    async fn match_into(
        &self,
        sbom: &Path,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<Matched, ScanError> {
        let program = self.grype.as_ref().ok_or_else(|| {
            ScanError::DbUnavailable("no grype configured (SBOM-only mode)".into())
        })?;
        let version = self
            .version("grype", program, &self.grype_version, dir, cancel)
            .await?;
        let permit = self.vulndb.permit().await.map_err(|r| {
            ScanError::DbUnavailable(match r {
                Readiness::NoDb(m) | Readiness::Held(m) => m,
                other => format!("{other:?}"),
            })
        })?;
        let out = dir.join(GRYPE_FILE);
        let mut inv = self
            .base(program, dir)
            .arg(format!("sbom:{}", sbom.display()))
            .arg("-o")
            .arg(format!("json={}", out.display()));
        for (k, v) in self.vulndb.grype_env(permit.stale) {
            inv = inv.env(&k, v);
        }
        let stale = permit.stale;
        self.run_tool("grype", &inv, cancel, None).await?;
        drop(permit);
        let summary = report::read_grype(&out).map_err(|source| ScanError::Output {
            tool: "grype",
            source,
        })?;
        Ok(Matched {
            summary,
            version,
            stale,
        })
    }

    fn scan_dir(&self, digest: &Digest) -> Result<tempfile::TempDir, ScanError> {
        std::fs::create_dir_all(&self.tmp_root).map_err(|source| ScanError::Prepare {
            path: self.tmp_root.clone(),
            source,
        })?;
        tempfile::Builder::new()
            .prefix(&format!("scan-{}-", digest.short()))
            .tempdir_in(&self.tmp_root)
            .map_err(|source| ScanError::Prepare {
                path: self.tmp_root.clone(),
                source,
            })
    }

    async fn run_tool(
        &self,
        tool: &'static str,
        inv: &Invocation,
        cancel: &CancellationToken,
        credentials: Option<&Credentials>,
    ) -> Result<(), ScanError> {
        let done = process::run(inv, self.timeout, cancel)
            .await
            .map_err(|source| ScanError::Process { tool, source })?;
        if let Some(signal) = done.signal() {
            return Err(ScanError::Signalled { tool, signal });
        }
        let code = done.status.code().unwrap_or(-1);
        if code != 0 {
            // A scanner should never echo the password; if it does, it stops here,
            // before the text is cut (a cut could leave part of it).
            let mut stderr = readable_tail_redacted(
                &done.stderr,
                STDERR_IN_ERROR,
                credentials.map(|c| c.password.expose()),
            );
            if stderr.is_empty() {
                stderr = "(no stderr)".to_string();
            }
            return Err(ScanError::Exit { tool, code, stderr });
        }
        Ok(())
    }

    /// `<tool> version -o json` → `version`, cached once read.
    async fn version(
        &self,
        tool: &'static str,
        program: &Path,
        cache: &Mutex<Option<String>>,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<String, ScanError> {
        let mut guard = cache.lock().await;
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        let inv = self.base(program, dir).arg("version").arg("-o").arg("json");
        let done = process::run(&inv, VERSION_TIMEOUT, cancel)
            .await
            .map_err(|source| ScanError::Process { tool, source })?;
        if !done.status.success() {
            return Err(ScanError::Version {
                tool,
                reason: format!(
                    "exit {:?}: {}",
                    done.status.code(),
                    readable_tail(&done.stderr, 300)
                ),
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(&done.stdout.tail).map_err(|e| ScanError::Version {
                tool,
                reason: format!("not JSON: {e}"),
            })?;
        let application = value
            .get("application")
            .and_then(|v| v.as_str())
            .unwrap_or(tool);
        let version = value
            .get("version")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ScanError::Version {
                tool,
                reason: "no `version` field".into(),
            })?;
        let text = if application == tool {
            version.to_string()
        } else {
            format!("{application} {version}")
        };
        *guard = Some(text.clone());
        Ok(text)
    }
}

/// The full chain of an error, `outer: inner: ...`, for records and logs.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
