//! Turning a job into result files and a committed state, in an order that a crash
//! cannot break.
//!
//! A full scan of one digest:
//! 1. state: `scanning`, attempts + 1 (committed);
//! 2. syft, then grype, in a private temporary directory ([`crate::scanner`]);
//! 3. the SBOM into the local cache `state.dir/sboms/` (temp + rename);
//! 4. state: the output names with their sizes and sha256 as a pending write (committed);
//! 5. the SBOM copied once to `output.dir/sboms/` (if not there yet), then the grype
//!    document once under its final name in `output.dir/scans/`;
//! 6. state: `scanned` with the scan record (committed).
//!
//! A re-match (after a DB change) runs grype on the cached SBOM: no registry traffic. It
//! writes a new result file the same way (steps 4-6, the digest stays `scanned`) and, in
//! the commit of step 6, a change record for `changes/` ([`crate::changes`]).
//!
//! A crash before 4 leaves nothing in `output.dir`; a crash between 4 and 6 is settled at
//! start-up by [`recover`]: complete files are adopted (no second result for the same DB
//! build), partial ones are deleted and the job runs again. A failed scan is recorded with
//! the tail of stderr and retried with exponential back-off; it never stops the daemon.
//! Each failed scan or re-match, once committed, is also written to `failures/`
//! ([`crate::failures`]) so that Snowflake sees it; that file is best effort.
//! With no usable DB a job is held: the digest keeps its status and waits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::changes::{ChangeRecord, diff, findings};
use crate::current::Current;
use crate::digest::Digest;
use crate::failures::{FailureKind, FailureRecord};
use crate::output::{Output, OutputError, file_sha256};
use crate::queue::{Job, JobKind, Lane};
use crate::registry::RegistryClient;
use crate::scanner::{ScanArtifacts, ScanError, Scanner, error_chain};
use crate::state::{
    Batch, FLAG_EMPTY_SBOM, FLAG_STALE_DB, FileCheck, ImageRecord, ImageStatus, PendingWrite,
    ScanMode, ScanRecord, StateError, Store, split_tag_ref,
};
use crate::vulndb::VulnDb;

/// Characters of an error kept on a digest's record.
const MAX_ERROR_CHARS: usize = 2000;

/// What happened to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// A full scan finished.
    Scanned {
        result_file: Option<String>,
        matches: usize,
    },
    /// A re-match finished; `changed` when findings were added, removed or changed.
    Rematched {
        result_file: String,
        changed: bool,
    },
    Failed {
        error: String,
    },
    /// Not due any more (changed meanwhile) or nothing to pull it from.
    Skipped,
    /// No usable DB now (missing, or stale and held): the digest waits.
    Held {
        reason: String,
    },
    /// Stopped by shutdown; the digest keeps or gets back its earlier status.
    Cancelled,
}

/// Back-off: `initial`, doubling per attempt, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Delay before retry number `attempts` (1 = after the first failure).
    pub fn delay(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Something outside the scan broke (the store, the output dir): the scan is not
/// recorded as done.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("state store")]
    State(#[from] StateError),
    #[error("output")]
    Output(#[from] OutputError),
    #[error("SBOM cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs jobs and records their outcome.
pub struct Worker {
    pub store: Arc<Store>,
    pub scanner: Arc<Scanner>,
    /// The registry client in use (a config reload replaces it).
    pub registry: Arc<Current<RegistryClient>>,
    pub vulndb: Arc<VulnDb>,
    pub output: Output,
    pub sbom_cache: PathBuf,
    /// Failed scans.
    pub retry: RetryPolicy,
    /// Scans whose SBOM came out empty.
    pub empty_sbom_retry: RetryPolicy,
}

impl Worker {
    /// `state.dir/sboms`: the SBOMs a later DB update re-matches without pulling again.
    pub fn sbom_cache_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("sboms")
    }

    /// The cached SBOM of `digest`.
    pub fn cached_sbom(&self, digest: &Digest) -> PathBuf {
        self.sbom_cache.join(format!("{}.syft.json", digest.hex()))
    }

    /// Runs `job` and records the outcome; never panics, never stops the daemon.
    pub async fn run(&self, job: &Job, cancel: &CancellationToken) -> ScanOutcome {
        let result = match job.kind {
            // An operator's request runs whatever the retry back-off says.
            JobKind::Scan => {
                self.try_scan(&job.digest, job.lane != Lane::Manual, cancel)
                    .await
            }
            JobKind::Rematch => self.try_rematch(&job.digest, cancel).await,
        };
        match result {
            Ok(outcome) => outcome,
            Err(e) => {
                let text = error_chain(&e);
                error!(digest = %job.digest, error = %text, "job could not be recorded");
                // Best effort: leave it failed so that it is retried, not stuck in scanning.
                let _ = self.record_failure(&job.digest, &text).await;
                ScanOutcome::Failed { error: text }
            }
        }
    }

    /// Why matching cannot run now, if it cannot (SBOM-only mode never waits).
    async fn held(&self) -> Option<String> {
        if self.scanner.sbom_only() {
            return None;
        }
        match self.vulndb.readiness(Utc::now()).await {
            crate::vulndb::Readiness::NoDb(m) | crate::vulndb::Readiness::Held(m) => Some(m),
            _ => None,
        }
    }

    async fn try_scan(
        &self,
        digest: &Digest,
        require_due: bool,
        cancel: &CancellationToken,
    ) -> Result<ScanOutcome, WorkerError> {
        let Some(mut record) = self.store.get_image(digest)? else {
            return Ok(ScanOutcome::Skipped);
        };
        if require_due && !record.is_due(Utc::now()) {
            return Ok(ScanOutcome::Skipped);
        }
        let Some(repository) = pull_repository(&record) else {
            return Ok(ScanOutcome::Skipped);
        };
        if let Some(reason) = self.held().await {
            return Ok(ScanOutcome::Held { reason });
        }
        let before = record.status;
        record.status = ImageStatus::Scanning;
        record.attempts += 1;
        self.put(&record).await?;
        info!(digest = %digest, repository, attempt = record.attempts, "scan started");

        let credentials = match self.registry.get().credentials() {
            Ok(c) => c,
            Err(e) => return self.fail(record, &error_chain(&e)).await,
        };
        let artifacts = match self
            .scanner
            .scan(&repository, digest, credentials.as_ref(), cancel)
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_cancelled() || matches!(e, ScanError::DbUnavailable(_)) => {
                // Not the image's fault: back to where it was, the attempt does not count.
                record.status = if before == ImageStatus::Scanned {
                    before
                } else {
                    ImageStatus::Pending
                };
                record.attempts = record.attempts.saturating_sub(1);
                self.put(&record).await?;
                return Ok(match e {
                    ScanError::DbUnavailable(reason) => ScanOutcome::Held { reason },
                    _ => {
                        warn!(digest = %digest, "scan stopped by shutdown; back to pending");
                        ScanOutcome::Cancelled
                    }
                });
            }
            Err(e) => return self.fail(record, &error_chain(&e)).await,
        };
        self.finish_scan(record, artifacts).await
    }

    async fn finish_scan(
        &self,
        mut record: ImageRecord,
        artifacts: ScanArtifacts,
    ) -> Result<ScanOutcome, WorkerError> {
        let digest = record.digest.clone();
        let now = Utc::now();
        let sbom_path = artifacts.sbom_path();
        self.cache_sbom(&digest, &sbom_path)?;
        let sbom = check_local(&sbom_path, Output::sbom_name(&digest))?;
        let result = match artifacts.grype_path() {
            Some(path) => {
                let name = Output::scan_result_name(
                    &digest,
                    now,
                    artifacts.grype.as_ref().and_then(|g| g.db_build.as_deref()),
                );
                Some((check_local(&path, self.output.free_name(&name)?)?, path))
            }
            None => None,
        };
        let mut flags = Vec::new();
        if artifacts.stale_db {
            flags.push(FLAG_STALE_DB.to_string());
        }
        let empty = artifacts.sbom.packages == 0;
        if empty {
            flags.push(FLAG_EMPTY_SBOM.to_string());
        }
        let scan = ScanRecord {
            finished_at: now,
            mode: if artifacts.grype.is_some() {
                ScanMode::Full
            } else {
                ScanMode::SbomOnly
            },
            syft_version: artifacts.syft_version.clone(),
            grype_version: artifacts.grype_version.clone(),
            db_build: artifacts.grype.as_ref().and_then(|g| g.db_build.clone()),
            db_schema: artifacts.grype.as_ref().and_then(|g| g.db_schema.clone()),
            result_file: result.as_ref().map(|(check, _)| check.path.clone()),
            sbom_file: sbom.path.clone(),
            packages: artifacts.sbom.packages,
            matches: artifacts.grype.as_ref().map_or(0, |g| g.matches),
            severities: artifacts
                .grype
                .as_ref()
                .map(|g| g.severities.clone())
                .unwrap_or_default(),
            flags,
        };

        // Intent first, then the copies, then the commit: see the module docs.
        record.pending_write = Some(PendingWrite {
            sbom: Some(sbom.clone()),
            result: result.as_ref().map(|(check, _)| check.clone()),
            scan: scan.clone(),
            change: None,
        });
        self.put(&record).await?;
        self.output.copy_if_absent(&sbom_path, &sbom.path)?;
        if let Some((check, local)) = &result {
            self.copy_result(local, check)?;
        }

        record.status = ImageStatus::Scanned;
        record.pending_write = None;
        record.last_error = None;
        record.last_scan = Some(scan.clone());
        record.next_retry = if empty {
            // No package is not a clean image: an unreadable filesystem, an unknown
            // distro, a truncated pull. Look again sooner than any DB change would.
            let delay = self.empty_sbom_retry.delay(record.attempts);
            warn!(digest = %digest, retry_in = ?delay, "SBOM lists no package: flagged empty_sbom, scanning again later");
            Some(now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1)))
        } else {
            None
        };
        self.put(&record).await?;
        match &scan.result_file {
            Some(file) => info!(
                digest = %digest,
                packages = scan.packages,
                matches = scan.matches,
                db_build = scan.db_build.as_deref().unwrap_or("unknown"),
                stale_db = artifacts.stale_db,
                result = %file,
                "scan finished"
            ),
            None => info!(
                digest = %digest,
                packages = scan.packages,
                mode = "sbom-only",
                "scan finished without vulnerability matching (SBOM-only mode: scanner.grype is empty)"
            ),
        }
        Ok(ScanOutcome::Scanned {
            result_file: scan.result_file,
            matches: scan.matches,
        })
    }

    /// grype on the cached SBOM; a digest without one gets a full scan.
    async fn try_rematch(
        &self,
        digest: &Digest,
        cancel: &CancellationToken,
    ) -> Result<ScanOutcome, WorkerError> {
        let Some(mut record) = self.store.get_image(digest)? else {
            return Ok(ScanOutcome::Skipped);
        };
        let Some(previous) = record
            .last_scan
            .clone()
            .filter(|_| record.status == ImageStatus::Scanned)
        else {
            return Ok(ScanOutcome::Skipped);
        };
        let sbom = self.cached_sbom(digest);
        if !sbom.exists() {
            info!(digest = %digest, "no cached SBOM: a full scan instead of a re-match");
            return self.try_scan(digest, false, cancel).await;
        }
        if let Some(reason) = self.held().await {
            return Ok(ScanOutcome::Held { reason });
        }
        info!(digest = %digest, previous_db_build = previous.db_build.as_deref().unwrap_or("none"), "re-match started");
        let matched = match self.scanner.rematch(digest, &sbom, cancel).await {
            Ok(m) => m,
            Err(e) if e.is_cancelled() => return Ok(ScanOutcome::Cancelled),
            Err(ScanError::DbUnavailable(reason)) => return Ok(ScanOutcome::Held { reason }),
            Err(e) => {
                let text = error_chain(&e);
                let now = Utc::now();
                record.attempts += 1;
                let delay = self.retry.delay(record.attempts);
                record.last_error = Some(truncate(&text, MAX_ERROR_CHARS));
                record.next_retry = Some(
                    now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1)),
                );
                self.put(&record).await?;
                warn!(digest = %digest, retry_in = ?delay, error = %text, "re-match failed; the previous result stands");
                self.write_failure(&record, FailureKind::Rematch, now);
                return Ok(ScanOutcome::Failed { error: text });
            }
        };
        let now = Utc::now();
        let name = self.output.free_name(&Output::scan_result_name(
            digest,
            now,
            matched.summary.db_build.as_deref(),
        ))?;
        let check = check_local(&matched.grype_path, name)?;

        let change = self.change_record(
            &record,
            &previous,
            &check.path,
            &matched.grype_path,
            matched.summary.db_build.clone(),
            now,
        );
        let scan = ScanRecord {
            finished_at: now,
            mode: ScanMode::Full,
            syft_version: previous.syft_version.clone(),
            grype_version: Some(matched.grype_version.clone()),
            db_build: matched.summary.db_build.clone(),
            db_schema: matched.summary.db_schema.clone(),
            result_file: Some(check.path.clone()),
            sbom_file: previous.sbom_file.clone(),
            packages: previous.packages,
            matches: matched.summary.matches,
            severities: matched.summary.severities.clone(),
            flags: if matched.stale_db {
                vec![FLAG_STALE_DB.to_string()]
            } else {
                Vec::new()
            },
        };
        record.pending_write = Some(PendingWrite {
            sbom: None,
            result: Some(check.clone()),
            scan: scan.clone(),
            change: change.clone(),
        });
        self.put(&record).await?;
        self.copy_result(&matched.grype_path, &check)?;

        record.pending_write = None;
        record.last_scan = Some(scan.clone());
        record.last_error = None;
        record.next_retry = None;
        let mut batch = Batch::default();
        batch.put_image(&record);
        if let Some(change) = &change {
            batch.put_change(change);
        }
        self.store.commit(batch).await?;
        info!(
            digest = %digest,
            db_build = scan.db_build.as_deref().unwrap_or("unknown"),
            matches = scan.matches,
            added = change.as_ref().map_or(0, |c| c.added.len()),
            removed = change.as_ref().map_or(0, |c| c.removed.len()),
            changed = change.as_ref().map_or(0, |c| c.changed.len()),
            result = %check.path,
            "re-match finished"
        );
        Ok(ScanOutcome::Rematched {
            result_file: check.path,
            changed: change.is_some(),
        })
    }

    /// The findings added, removed and changed since the previous result; `None` when
    /// nothing changed.
    fn change_record(
        &self,
        record: &ImageRecord,
        previous: &ScanRecord,
        result_name: &str,
        result_local: &Path,
        db_build: Option<String>,
        now: chrono::DateTime<Utc>,
    ) -> Option<ChangeRecord> {
        let after = match findings(result_local) {
            Ok(f) => f,
            Err(e) => {
                warn!(digest = %record.digest, error = %error_chain(&e), "cannot read the new result for the change record");
                return None;
            }
        };
        let before = match previous
            .result_file
            .as_deref()
            .map(|name| findings(&self.output.path(name)))
        {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                warn!(digest = %record.digest, error = %error_chain(&e), "previous result unreadable: every finding counts as added");
                Default::default()
            }
            None => Default::default(),
        };
        let (added, removed, changed) = diff(&before, &after);
        let change = ChangeRecord {
            digest: record.digest.to_string(),
            tags: record.tags.iter().cloned().collect(),
            previous_result: previous.result_file.clone(),
            result: result_name.to_string(),
            previous_db_build: previous.db_build.clone(),
            db_build,
            observed_at: now,
            added,
            removed,
            changed,
        };
        (!change.is_empty()).then_some(change)
    }

    fn copy_result(&self, local: &Path, check: &FileCheck) -> Result<(), WorkerError> {
        if self.output.copy_if_absent(local, &check.path)?.is_none() {
            // Someone else took the name between free_name and the copy.
            return Err(WorkerError::Output(OutputError::NoFreeName {
                path: self.output.path(&check.path),
            }));
        }
        Ok(())
    }

    async fn fail(&self, mut record: ImageRecord, text: &str) -> Result<ScanOutcome, WorkerError> {
        let now = Utc::now();
        let delay = self.retry.delay(record.attempts);
        record.status = ImageStatus::Failed;
        // A failed copy removes its partial file; nothing is left to settle.
        record.pending_write = None;
        record.last_error = Some(truncate(text, MAX_ERROR_CHARS));
        record.next_retry =
            Some(now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1)));
        self.put(&record).await?;
        warn!(digest = %record.digest, attempt = record.attempts, retry_in = ?delay, error = %text, "scan failed");
        self.write_failure(&record, FailureKind::Scan, now);
        Ok(ScanOutcome::Failed {
            error: text.to_string(),
        })
    }

    /// Writes the failure just committed on `record` to `failures/`. Only after the
    /// commit: the store is the source of truth and drives the retry; this file is
    /// monitoring for Snowflake, so a write that fails is logged and the job goes on.
    fn write_failure(&self, record: &ImageRecord, kind: FailureKind, at: DateTime<Utc>) {
        if let Err(e) = FailureRecord::of(record, kind, at).write(&self.output) {
            warn!(digest = %record.digest, error = %error_chain(&e), "failure record not written; the failure is in state");
        }
    }

    async fn record_failure(&self, digest: &Digest, text: &str) -> Result<(), WorkerError> {
        if let Some(record) = self.store.get_image(digest)? {
            if record.status == ImageStatus::Scanning {
                self.fail(record, text).await?;
            }
        }
        Ok(())
    }

    async fn put(&self, record: &ImageRecord) -> Result<(), StateError> {
        let mut batch = Batch::default();
        batch.put_image(record);
        self.store.commit(batch).await
    }

    /// Keeps the SBOM locally (atomic rename on a local disk).
    fn cache_sbom(&self, digest: &Digest, src: &Path) -> Result<(), WorkerError> {
        let err = |source| WorkerError::Cache {
            path: self.sbom_cache.clone(),
            source,
        };
        std::fs::create_dir_all(&self.sbom_cache).map_err(err)?;
        let tmp = tempfile::NamedTempFile::new_in(&self.sbom_cache).map_err(err)?;
        std::fs::copy(src, tmp.path()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(self.cached_sbom(digest))
            .map_err(|e| err(e.error))?;
        Ok(())
    }
}

/// Size and sha256 of a local file that is to be copied under `name`.
fn check_local(path: &Path, name: String) -> Result<FileCheck, WorkerError> {
    let (size, sha256) = file_sha256(path).map_err(|source| WorkerError::Cache {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(FileCheck {
        path: name,
        sha256,
        size,
    })
}

/// The repository to pull a digest from: one of its tags' repositories, else any
/// repository it was seen in.
fn pull_repository(record: &ImageRecord) -> Option<String> {
    record
        .tags
        .iter()
        .filter_map(|t| split_tag_ref(t).map(|(r, _)| r.to_string()))
        .next()
        .or_else(|| record.repositories.iter().next().cloned())
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

/// What start-up recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Digests left `scanning` by a crash, back to `pending`.
    pub requeued: usize,
    /// Output files found complete after a crash and adopted.
    pub adopted: usize,
    /// Partial output files removed.
    pub removed_partial: usize,
}

/// Start-up: clears the temp area and settles what a crash left half done.
pub async fn recover(
    store: &Store,
    output: &Output,
    tmp_root: &Path,
) -> Result<Recovery, WorkerError> {
    if tmp_root.exists() {
        if let Err(source) = std::fs::remove_dir_all(tmp_root) {
            return Err(WorkerError::Cache {
                path: tmp_root.to_path_buf(),
                source,
            });
        }
    }
    let mut recovery = Recovery::default();
    let mut batch = Batch::default();
    for mut record in store.images_to_recover()? {
        if record.status != ImageStatus::Scanning && record.pending_write.is_none() {
            continue;
        }
        let complete = |f: &FileCheck| output.is_complete(&f.path, f.size, &f.sha256);
        // An SBOM from an earlier successful scan is left as it was by a rescan.
        let scanned_before = record.last_scan.is_some();
        let sbom_ok =
            |f: &FileCheck| complete(f) || (scanned_before && output.path(&f.path).exists());
        match record.pending_write.take() {
            Some(pending)
                if pending.sbom.as_ref().is_none_or(sbom_ok)
                    && pending.result.as_ref().is_none_or(complete) =>
            {
                info!(digest = %record.digest, "results written just before a crash adopted");
                record.status = ImageStatus::Scanned;
                record.last_scan = Some(pending.scan);
                record.last_error = None;
                record.next_retry = None;
                if let Some(change) = &pending.change {
                    batch.put_change(change);
                }
                recovery.adopted += 1;
            }
            Some(pending) => {
                if let Some(result) = pending.result.as_ref().filter(|r| !complete(r)) {
                    output.remove(&result.path)?;
                    recovery.removed_partial += 1;
                    warn!(digest = %record.digest, file = %result.path, "partial result from a crash removed");
                }
                // An SBOM that existed before this attempt was never touched by it; one
                // that did not, and is not complete, is a partial copy.
                if let Some(sbom) = pending
                    .sbom
                    .as_ref()
                    .filter(|s| !scanned_before && !complete(s))
                {
                    output.remove(&sbom.path)?;
                    recovery.removed_partial += 1;
                    warn!(digest = %record.digest, file = %sbom.path, "partial SBOM from a crash removed");
                }
                if record.status == ImageStatus::Scanning {
                    record.status = ImageStatus::Pending;
                    recovery.requeued += 1;
                }
            }
            None => {
                record.status = ImageStatus::Pending;
                recovery.requeued += 1;
            }
        }
        batch.put_image(&record);
    }
    store.commit(batch).await?;
    Ok(recovery)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let p = RetryPolicy {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(600),
        };
        assert_eq!(p.delay(1), Duration::from_secs(60));
        assert_eq!(p.delay(2), Duration::from_secs(120));
        assert_eq!(p.delay(4), Duration::from_secs(480));
        assert_eq!(p.delay(5), Duration::from_secs(600));
        assert_eq!(p.delay(60), Duration::from_secs(600));
    }

    #[tokio::test]
    async fn recovery_adopts_complete_and_removes_partial_results() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let output = Output::new(dir.path().join("out"));
        let now = Utc::now();
        let scan = ScanRecord {
            finished_at: now,
            mode: ScanMode::Full,
            syft_version: "1".into(),
            grype_version: Some("2".into()),
            db_build: None,
            db_schema: None,
            result_file: None,
            sbom_file: String::new(),
            packages: 1,
            matches: 0,
            severities: Default::default(),
            flags: Vec::new(),
        };
        let check = |w: &crate::output::Written| FileCheck {
            path: w.name.clone(),
            sha256: w.sha256.clone(),
            size: w.size,
        };
        let truncated = |w: &crate::output::Written| FileCheck {
            size: w.size + 10,
            ..check(w)
        };
        // a: SBOM and result complete -> adopted.
        let a_sbom = output
            .write_new("sboms/a.syft.json", b"{\"artifacts\":[]}")
            .unwrap();
        let a_result = output
            .write_new("scans/a/x.json", b"{\"matches\":[]}")
            .unwrap();
        // b: SBOM complete, result partial -> result removed, SBOM kept, pending.
        let b_sbom = output.write_new("sboms/b.syft.json", b"{}").unwrap();
        let b_result = output.write_new("scans/b/y.json", b"{\"matc").unwrap();
        // c: SBOM partial, never scanned before -> SBOM removed, pending.
        let c_sbom = output.write_new("sboms/c.syft.json", b"{\"arti").unwrap();
        let pendings = [
            ('a', check(&a_sbom), Some(check(&a_result))),
            ('b', check(&b_sbom), Some(truncated(&b_result))),
            ('c', truncated(&c_sbom), None),
        ];
        let mut batch = Batch::default();
        for (c, sbom, result) in pendings {
            let d = Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap();
            let mut r = ImageRecord::new(d, "m".into(), now);
            r.status = ImageStatus::Scanning;
            r.pending_write = Some(PendingWrite {
                sbom: Some(sbom),
                result,
                scan: scan.clone(),
                change: None,
            });
            batch.put_image(&r);
        }
        // d: crashed before any write -> pending.
        let d = Digest::parse(&format!("sha256:{}", "d".repeat(64))).unwrap();
        let mut plain = ImageRecord::new(d, "m".into(), now);
        plain.status = ImageStatus::Scanning;
        batch.put_image(&plain);
        store.commit(batch).await.unwrap();
        let tmp = dir.path().join("state/tmp");
        std::fs::create_dir_all(tmp.join("scan-leftover")).unwrap();

        let r = recover(&store, &output, &tmp).await.unwrap();
        assert_eq!(
            r,
            Recovery {
                requeued: 3,
                adopted: 1,
                removed_partial: 2
            }
        );
        assert!(!tmp.exists());
        assert!(
            output.path("scans/a/x.json").exists() && output.path("sboms/a.syft.json").exists()
        );
        assert!(!output.path("scans/b/y.json").exists());
        assert!(output.path("sboms/b.syft.json").exists());
        assert!(!output.path("sboms/c.syft.json").exists());
        let statuses: Vec<ImageStatus> = store
            .all_images()
            .unwrap()
            .iter()
            .map(|i| i.status)
            .collect();
        assert_eq!(
            statuses,
            vec![
                ImageStatus::Scanned,
                ImageStatus::Pending,
                ImageStatus::Pending,
                ImageStatus::Pending
            ]
        );
        assert!(
            store
                .all_images()
                .unwrap()
                .iter()
                .all(|i| i.pending_write.is_none())
        );
    }
}
