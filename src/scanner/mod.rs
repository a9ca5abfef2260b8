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
//!   scan (`GRYPE_DB_AUTO_UPDATE=false`).
//! - A result counts only if the child exited 0, was not killed by a signal, and its
//!   output file parses as the expected document ([`report`]).

pub mod process;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::digest::Digest;
use crate::registry::auth::Credentials;
use process::{Invocation, ProcessError, readable_tail};
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

const SBOM_FILE: &str = "sbom.syft.json";
const GRYPE_FILE: &str = "grype.json";

/// Runs syft and grype.
pub struct Scanner {
    syft: PathBuf,
    grype: Option<PathBuf>,
    timeout: Duration,
    db_cache_dir: Option<PathBuf>,
    tmp_root: PathBuf,
    registry_host: String,
    plain_http: bool,
    passthrough: Vec<(String, String)>,
    syft_version: Mutex<Option<String>>,
    grype_version: Mutex<Option<String>>,
}

impl Scanner {
    /// A scanner for `config`; children get `PASSTHROUGH_ENV` from `daemon_env`.
    pub fn new(config: &Config, daemon_env: impl IntoIterator<Item = (String, String)>) -> Self {
        let passthrough = daemon_env
            .into_iter()
            .filter(|(k, _)| PASSTHROUGH_ENV.contains(&k.as_str()))
            .collect();
        Scanner {
            syft: config.scanner.syft.clone(),
            grype: config.scanner.grype.clone(),
            timeout: config.scanner.timeout,
            db_cache_dir: config.vulndb.cache_dir.clone(),
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
        std::fs::create_dir_all(&self.tmp_root).map_err(|source| ScanError::Prepare {
            path: self.tmp_root.clone(),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("scan-{}-", digest.short()))
            .tempdir_in(&self.tmp_root)
            .map_err(|source| ScanError::Prepare {
                path: self.tmp_root.clone(),
                source,
            })?;

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

        let (grype, grype_version) = match &self.grype {
            None => (None, None),
            Some(program) => {
                let version = self
                    .version("grype", program, &self.grype_version, dir.path(), cancel)
                    .await?;
                let out = dir.path().join(GRYPE_FILE);
                let inv = self
                    .base(program, dir.path())
                    .arg(format!("sbom:{}", sbom_path.display()))
                    .arg("-o")
                    .arg(format!("json={}", out.display()));
                self.run_tool("grype", &inv, cancel, None).await?;
                let summary = report::read_grype(&out).map_err(|source| ScanError::Output {
                    tool: "grype",
                    source,
                })?;
                (Some(summary), Some(version))
            }
        };
        Ok(ScanArtifacts {
            dir,
            sbom,
            grype,
            syft_version,
            grype_version,
        })
    }

    /// An invocation with the passthrough environment, `TMPDIR` set to the scan
    /// directory, and grype's DB settings (harmless for syft).
    fn base(&self, program: &Path, dir: &Path) -> Invocation {
        let mut inv = Invocation::new(program, dir);
        for (k, v) in &self.passthrough {
            inv = inv.env(k, v.clone());
        }
        inv = inv
            .env("TMPDIR", dir.display().to_string())
            .env("GRYPE_DB_AUTO_UPDATE", "false")
            .env("GRYPE_CHECK_FOR_APP_UPDATE", "false");
        if let Some(cache) = &self.db_cache_dir {
            inv = inv.env("GRYPE_DB_CACHE_DIR", cache.display().to_string());
        }
        inv
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
            let mut stderr = readable_tail(&done.stderr, STDERR_IN_ERROR);
            if stderr.is_empty() {
                stderr = "(no stderr)".to_string();
            }
            // A scanner should never echo the password; if it does, it stops here.
            if let Some(c) = credentials {
                stderr = stderr.replace(c.password.expose(), "[redacted]");
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
