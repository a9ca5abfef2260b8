//! The one owner of grype's vulnerability DB in `vulndb.cache_dir` (in SPCS a block volume
//! restored from a snapshot).
//!
//! Invariants:
//! - Updates (`grype db check`, then `grype db update` or `db import`) run under the
//!   write side of one lock; every grype scan holds the read side. grype replaces its DB by
//!   deleting the old directory and renaming the new one in, so a scan must never start in
//!   between.
//! - Every grype run gets `GRYPE_DB_CACHE_DIR`, `GRYPE_DB_AUTO_UPDATE=false` and grype's
//!   age limit set to `vulndb.max_age` ([`VulnDb::grype_env`]); only the daemon updates.
//! - A failed update keeps the current DB and is reported (log line, [`DbState`]).
//! - Past `vulndb.max_age` scans are either held or run and flagged `stale_db`
//!   (`vulndb.on_stale`); with no usable DB nothing is scanned and the message says how to
//!   get one ([`Readiness`]).
//! - `grype db status -o json` has had several shapes; it is parsed loosely
//!   ([`parse_status`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, OnStale};
use crate::scanner::process::{self, Invocation, readable_tail};

/// How long `grype db status` may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);

/// What identifies the DB a result was matched against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbIdentity {
    pub schema_version: Option<String>,
    /// Build time, RFC 3339.
    pub built: Option<String>,
    pub path: Option<String>,
    /// Where it came from (listing URL, import file).
    pub from: Option<String>,
    pub checksum: Option<String>,
    pub valid: bool,
    pub error: Option<String>,
}

impl DbIdentity {
    /// The build time, when it parses.
    pub fn built_at(&self) -> Option<DateTime<Utc>> {
        self.built
            .as_deref()
            .and_then(|b| DateTime::parse_from_rfc3339(b).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// Age at `now`.
    pub fn age(&self, now: DateTime<Utc>) -> Option<chrono::TimeDelta> {
        self.built_at().map(|b| now - b)
    }
}

/// What the daemon knows about the DB; kept in the state store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbState {
    pub identity: Option<DbIdentity>,
    /// Last update check, successful or not.
    pub checked_at: Option<DateTime<Utc>>,
    /// Last time a new DB was installed.
    pub updated_at: Option<DateTime<Utc>>,
    /// The last update failure, cleared by the next success.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// Whether scans may use the DB now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// No grype configured: SBOM-only, no DB needed.
    SbomOnly,
    /// Usable; `stale` when past `max_age` with `on_stale = "scan-and-flag"`.
    Ready { build: Option<String>, stale: bool },
    /// No usable DB; the message says how to get one.
    NoDb(String),
    /// Past `max_age` with `on_stale = "hold"`.
    Held(String),
}

impl Readiness {
    /// True when grype may run.
    pub fn can_match(&self) -> bool {
        matches!(self, Readiness::Ready { .. })
    }
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// A new DB is installed.
    Updated {
        from: Option<String>,
        to: Option<String>,
    },
    /// The current DB is the newest.
    UpToDate,
    /// The check or the update failed; the current DB is kept.
    Failed(String),
    /// No grype configured.
    NotApplicable,
}

/// A DB command failed to run at all.
#[derive(Debug, thiserror::Error)]
pub enum VulnDbError {
    #[error(
        "grype is not configured (scanner.grype is empty): there is no vulnerability DB to manage"
    )]
    NoGrype,
    #[error("grype db {command}")]
    Process {
        command: &'static str,
        #[source]
        source: process::ProcessError,
    },
    #[error("grype db {command} exited with code {code}: {stderr}")]
    Exit {
        command: &'static str,
        code: i32,
        stderr: String,
    },
    #[error("grype db status printed no JSON: {0}")]
    Status(String),
    #[error("cannot create {path}")]
    CacheDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The DB owner.
pub struct VulnDb {
    grype: Option<PathBuf>,
    cache_dir: PathBuf,
    update_url: Option<String>,
    update_timeout: Duration,
    max_age: Duration,
    on_stale: OnStale,
    passthrough: Vec<(String, String)>,
    tmp_root: PathBuf,
    lock: RwLock<()>,
    state: Mutex<DbState>,
}

/// Held by a grype scan: no update can replace the DB meanwhile.
pub struct ScanPermit<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    /// The DB is past `max_age` (and `on_stale = "scan-and-flag"`).
    pub stale: bool,
}

impl VulnDb {
    /// The owner for `config`; `passthrough` is the environment children may see.
    pub fn new(config: &Config, passthrough: Vec<(String, String)>, initial: DbState) -> Self {
        VulnDb {
            grype: config.scanner.grype.clone(),
            cache_dir: config.vulndb.cache_dir.clone(),
            update_url: config.vulndb.update_url.clone(),
            update_timeout: config.vulndb.update_timeout,
            max_age: config.vulndb.max_age,
            on_stale: config.vulndb.on_stale,
            passthrough,
            tmp_root: config.state_dir.join("tmp"),
            lock: RwLock::new(()),
            state: Mutex::new(initial),
        }
    }

    /// The DB directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// A copy of what is known.
    pub async fn state(&self) -> DbState {
        self.state.lock().await.clone()
    }

    /// The environment grype needs for this DB; `stale` lifts grype's own age check
    /// (the daemon decided to scan and flag).
    pub fn grype_env(&self, stale: bool) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "GRYPE_DB_CACHE_DIR".to_string(),
                self.cache_dir.display().to_string(),
            ),
            ("GRYPE_DB_AUTO_UPDATE".to_string(), "false".to_string()),
            (
                "GRYPE_CHECK_FOR_APP_UPDATE".to_string(),
                "false".to_string(),
            ),
            // grype parses Go durations; whole seconds are always accepted.
            (
                "GRYPE_DB_MAX_ALLOWED_BUILT_AGE".to_string(),
                format!("{}s", self.max_age.as_secs()),
            ),
        ];
        if stale {
            env.push(("GRYPE_DB_VALIDATE_AGE".to_string(), "false".to_string()));
        }
        if let Some(url) = &self.update_url {
            env.push(("GRYPE_DB_UPDATE_URL".to_string(), url.clone()));
        }
        env
    }

    /// Whether scans may match now, from the last known identity.
    pub async fn readiness(&self, now: DateTime<Utc>) -> Readiness {
        if self.grype.is_none() {
            return Readiness::SbomOnly;
        }
        let state = self.state.lock().await;
        let Some(identity) = state.identity.as_ref().filter(|i| i.valid) else {
            let why = state
                .identity
                .as_ref()
                .and_then(|i| i.error.clone())
                .unwrap_or_else(|| "database does not exist".to_string());
            return Readiness::NoDb(format!(
                "no usable vulnerability DB in {} ({why}); get one with `spcs-image-scanner db update` \
                 (needs network access to grype.anchore.io or vulndb.update_url), \
                 `spcs-image-scanner db import FILE`, or a volume restored from a DB snapshot",
                self.cache_dir.display()
            ));
        };
        let max_age = chrono::TimeDelta::from_std(self.max_age).unwrap_or(chrono::TimeDelta::MAX);
        let stale = identity.age(now).is_none_or(|age| age > max_age);
        match (stale, self.on_stale) {
            (true, OnStale::Hold) => Readiness::Held(format!(
                "vulnerability DB built {} is older than vulndb.max_age ({}): scans are held until a fresh DB arrives \
                 (vulndb.on_stale = \"hold\")",
                identity.built.as_deref().unwrap_or("at an unknown time"),
                humantime::format_duration(self.max_age)
            )),
            _ => Readiness::Ready {
                build: identity.built.clone(),
                stale,
            },
        }
    }

    /// Waits until no update runs and returns a permit that keeps updates out while a
    /// scan uses the DB; `Err` with the reason when scans may not match now.
    pub async fn permit(&self) -> Result<ScanPermit<'_>, Readiness> {
        let guard = self.lock.read().await;
        match self.readiness(Utc::now()).await {
            Readiness::Ready { stale, .. } => Ok(ScanPermit {
                _guard: guard,
                stale,
            }),
            other => Err(other),
        }
    }

    /// Reads `grype db status -o json` and records the identity.
    pub async fn refresh_status(
        &self,
        cancel: &CancellationToken,
    ) -> Result<DbIdentity, VulnDbError> {
        let _guard = self.lock.read().await;
        self.status_unlocked(cancel).await
    }

    async fn status_unlocked(&self, cancel: &CancellationToken) -> Result<DbIdentity, VulnDbError> {
        // The daemon judges the age itself (vulndb.max_age, on_stale); status reports the rest.
        let inv = self.invocation(
            &["db", "status", "-o", "json"],
            &[("GRYPE_DB_VALIDATE_AGE", "false")],
        )?;
        let done = process::run(&inv, STATUS_TIMEOUT, cancel)
            .await
            .map_err(|source| VulnDbError::Process {
                command: "status",
                source,
            })?;
        // grype prints the JSON and exits 1 when the DB is invalid or missing.
        let identity = parse_status(&done.stdout.tail).ok_or_else(|| {
            VulnDbError::Status(format!(
                "exit {:?}: {}",
                done.status.code(),
                readable_tail(&done.stderr, 300)
            ))
        })?;
        self.state.lock().await.identity = Some(identity.clone());
        Ok(identity)
    }

    /// Checks for a newer DB and installs it; keeps the current DB on any failure.
    pub async fn update(&self, cancel: &CancellationToken) -> UpdateOutcome {
        if self.grype.is_none() {
            return UpdateOutcome::NotApplicable;
        }
        let before = self.state.lock().await.identity.clone();
        let outcome = self.try_update(cancel).await;
        let now = Utc::now();
        let mut state = self.state.lock().await;
        state.checked_at = Some(now);
        match outcome {
            Ok(true) => {
                let after = state.identity.clone();
                let (from, to) = (
                    before.and_then(|i| i.built),
                    after.as_ref().and_then(|i| i.built.clone()),
                );
                state.last_error = None;
                state.last_error_at = None;
                if from != to {
                    state.updated_at = Some(now);
                    info!(
                        from = from.as_deref().unwrap_or("none"),
                        to = to.as_deref().unwrap_or("unknown"),
                        "vulnerability DB updated"
                    );
                    UpdateOutcome::Updated { from, to }
                } else {
                    UpdateOutcome::UpToDate
                }
            }
            Ok(false) => {
                state.last_error = None;
                state.last_error_at = None;
                UpdateOutcome::UpToDate
            }
            Err(e) => {
                let text = crate::scanner::error_chain(&e);
                warn!(error = %text, db = %self.cache_dir.display(), "vulnerability DB update failed; keeping the current DB");
                state.last_error = Some(text.clone());
                state.last_error_at = Some(now);
                UpdateOutcome::Failed(text)
            }
        }
    }

    /// `Ok(true)` when `grype db update` ran (a newer DB was available).
    async fn try_update(&self, cancel: &CancellationToken) -> Result<bool, VulnDbError> {
        std::fs::create_dir_all(&self.cache_dir).map_err(|source| VulnDbError::CacheDir {
            path: self.cache_dir.clone(),
            source,
        })?;
        // The check only reads: no lock, scans go on.
        let check = self.invocation(&["db", "check", "-o", "json"], &[])?;
        let done = self.run_db("check", &check, cancel).await?;
        match done.status.code() {
            Some(0) => {
                self.refresh_status(cancel).await?;
                return Ok(false);
            }
            // 100: an update is available (or there is no DB yet).
            Some(100) => {}
            _ => return Err(exit_error("check", &done)),
        }
        let _guard = self.lock.write().await;
        let update = self.invocation(&["db", "update"], &[])?;
        let done = self.run_db("update", &update, cancel).await?;
        if !done.status.success() {
            // Re-read: grype keeps the old DB on failure, but say what is there now.
            let _ = self.status_unlocked(cancel).await;
            return Err(exit_error("update", &done));
        }
        self.status_unlocked(cancel).await?;
        Ok(true)
    }

    /// `grype db import FILE` under the write lock.
    pub async fn import(
        &self,
        file: &Path,
        cancel: &CancellationToken,
    ) -> Result<DbIdentity, VulnDbError> {
        std::fs::create_dir_all(&self.cache_dir).map_err(|source| VulnDbError::CacheDir {
            path: self.cache_dir.clone(),
            source,
        })?;
        let _guard = self.lock.write().await;
        let inv = self.invocation(&["db", "import", &file.display().to_string()], &[])?;
        let done = self.run_db("import", &inv, cancel).await?;
        if !done.status.success() {
            return Err(exit_error("import", &done));
        }
        let identity = self.status_unlocked(cancel).await?;
        let mut state = self.state.lock().await;
        state.updated_at = Some(Utc::now());
        state.last_error = None;
        Ok(identity)
    }

    /// Runs `grype db <command>`; `Err` only when it could not run to its end.
    async fn run_db(
        &self,
        command: &'static str,
        inv: &Invocation,
        cancel: &CancellationToken,
    ) -> Result<process::Finished, VulnDbError> {
        process::run(inv, self.update_timeout, cancel)
            .await
            .map_err(|source| VulnDbError::Process { command, source })
    }

    fn invocation(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<Invocation, VulnDbError> {
        let grype = self.grype.as_ref().ok_or(VulnDbError::NoGrype)?;
        std::fs::create_dir_all(&self.tmp_root).map_err(|source| VulnDbError::CacheDir {
            path: self.tmp_root.clone(),
            source,
        })?;
        let mut inv = Invocation::new(grype, &self.tmp_root);
        for a in args {
            inv = inv.arg(*a);
        }
        for (k, v) in &self.passthrough {
            inv = inv.env(k, v.clone());
        }
        inv = inv.env("TMPDIR", self.tmp_root.display().to_string());
        for (k, v) in self.grype_env(false) {
            inv = inv.env(&k, v);
        }
        for (k, v) in extra {
            inv = inv.env(k, *v);
        }
        Ok(inv)
    }
}

fn exit_error(command: &'static str, done: &process::Finished) -> VulnDbError {
    VulnDbError::Exit {
        command,
        code: done.status.code().unwrap_or(-1),
        stderr: readable_tail(&done.stderr, 1000),
    }
}

/// Parses `grype db status -o json` in any of its shapes:
/// v0.90+ `{schemaVersion, from, built, path, valid, error?}`; v0.88-0.89
/// `{schemaVersion, built, path, checksum, error}`; v5 `{location, built, schemaVersion: 5,
/// checksum, error}`; and a nested `{status: {...}}`.
pub fn parse_status(stdout: &[u8]) -> Option<DbIdentity> {
    let text = String::from_utf8_lossy(stdout);
    let start = text.find('{')?;
    let value: serde_json::Value = serde_json::from_str(text[start..].trim()).ok()?;
    let node = value
        .get("status")
        .filter(|s| s.is_object())
        .unwrap_or(&value);
    if !node.is_object() {
        return None;
    }
    let string = |key: &str| {
        node.get(key).and_then(|v| match v {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let error = string("error");
    let valid = match node.get("valid") {
        Some(serde_json::Value::Bool(b)) => *b,
        _ => error.is_none() && string("built").is_some(),
    };
    Some(DbIdentity {
        schema_version: string("schemaVersion"),
        built: string("built"),
        path: string("path").or_else(|| string("location")),
        from: string("from"),
        checksum: string("checksum"),
        valid,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shapes_are_all_understood() {
        let v090 = br#"{"schemaVersion":"v6.0.2","from":"https://grype.anchore.io/databases/v6/x.tar.zst","built":"2024-11-27T14:43:17Z","path":"/c/6/vulnerability.db","valid":true}"#;
        let i = parse_status(v090).unwrap();
        assert!(i.valid);
        assert_eq!(i.built.as_deref(), Some("2024-11-27T14:43:17Z"));
        assert_eq!(i.schema_version.as_deref(), Some("v6.0.2"));

        let missing = br#"{"schemaVersion":"","path":"/c/6/vulnerability.db","valid":false,"error":"database does not exist"}"#;
        let i = parse_status(missing).unwrap();
        assert!(!i.valid);
        assert_eq!(i.error.as_deref(), Some("database does not exist"));
        assert_eq!(i.schema_version, None);

        let v088 = br#"{"schemaVersion":"v6.0.2","built":"2025-03-01T00:00:00Z","path":"/c/6/vulnerability.db","checksum":"xxh64:1","error":""}"#;
        assert!(parse_status(v088).unwrap().valid);

        let v5 = br#"{"built":"2023-09-01T01:26:55Z","schemaVersion":5,"location":"/c/5","checksum":"sha256:ab","error":null}"#;
        let i = parse_status(v5).unwrap();
        assert!(i.valid);
        assert_eq!(i.schema_version.as_deref(), Some("5"));
        assert_eq!(i.path.as_deref(), Some("/c/5"));

        let nested =
            br#"{"status":{"schemaVersion":"v6.1.3","built":"2026-12-01T00:00:00Z","valid":true}}"#;
        assert!(parse_status(nested).unwrap().valid);
        assert!(parse_status(b"not json").is_none());
        assert!(
            parse_status(b"warning: x\n{\"built\":\"2026-01-01T00:00:00Z\"}")
                .unwrap()
                .valid
        );
    }

    #[test]
    fn age_is_measured_from_the_build_time() {
        let i = DbIdentity {
            built: Some("2026-12-01T00:00:00Z".into()),
            valid: true,
            ..DbIdentity::default()
        };
        let now = DateTime::parse_from_rfc3339("2026-12-03T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(i.age(now), Some(chrono::TimeDelta::days(2)));
    }
}
