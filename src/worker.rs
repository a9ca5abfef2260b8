//! Turning a due digest into result files and a committed state, in an order that a
//! crash cannot break.
//!
//! For one digest:
//! 1. state: `scanning`, attempts + 1 (committed);
//! 2. syft, then grype, in a private temporary directory ([`crate::scanner`]);
//! 3. the SBOM into the local cache `state.dir/sboms/` (temp + rename) and, once, into
//!    `output.dir/sboms/`;
//! 4. state: the result file's name, size and sha256 as a pending write (committed);
//! 5. the grype document copied once under its final name in `output.dir/scans/`;
//! 6. state: `scanned` with the scan record (committed).
//!
//! A crash before 4 leaves nothing under `scans/`; a crash between 4 and 6 is resolved at
//! start-up by [`recover`]: a complete file is adopted (no second result), a partial one
//! is deleted and the digest scanned again. A failed scan is recorded with the tail of
//! stderr and retried with exponential back-off; it never stops the daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::digest::Digest;
use crate::output::{Output, OutputError, file_sha256};
use crate::registry::RegistryClient;
use crate::scanner::{ScanArtifacts, ScanError, Scanner, error_chain};
use crate::state::{
    Batch, ImageRecord, ImageStatus, PendingWrite, ScanMode, ScanRecord, StateError, Store,
    split_tag_ref,
};

/// Characters of an error kept on a digest's record.
const MAX_ERROR_CHARS: usize = 2000;

/// What happened to one digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    Scanned {
        result_file: Option<String>,
        matches: usize,
    },
    Failed {
        error: String,
    },
    /// Not due any more (changed meanwhile) or nothing to pull it from.
    Skipped,
    /// Stopped by shutdown; back to pending.
    Cancelled,
}

/// Back-off for failed scans: `initial`, doubling per attempt, at most `max`.
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

/// Scans digests and records the outcome.
pub struct Worker {
    pub store: Arc<Store>,
    pub scanner: Arc<Scanner>,
    pub registry: Arc<RegistryClient>,
    pub output: Output,
    pub sbom_cache: PathBuf,
    pub retry: RetryPolicy,
}

impl Worker {
    /// `state.dir/sboms`: the SBOMs a later DB update re-matches without pulling again.
    pub fn sbom_cache_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("sboms")
    }

    /// Scans `digest` if it is still due, and records the outcome.
    pub async fn scan(&self, digest: &Digest, cancel: &CancellationToken) -> ScanOutcome {
        match self.try_scan(digest, cancel).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let text = error_chain(&e);
                error!(digest = %digest, error = %text, "scan could not be recorded");
                // Best effort: leave it failed so that it is retried, not stuck in scanning.
                let _ = self.record_failure(digest, &text).await;
                ScanOutcome::Failed { error: text }
            }
        }
    }

    async fn try_scan(
        &self,
        digest: &Digest,
        cancel: &CancellationToken,
    ) -> Result<ScanOutcome, WorkerError> {
        let Some(mut record) = self.store.get_image(digest)? else {
            return Ok(ScanOutcome::Skipped);
        };
        if !record.is_due(Utc::now()) {
            return Ok(ScanOutcome::Skipped);
        }
        let Some(repository) = pull_repository(&record) else {
            return Ok(ScanOutcome::Skipped);
        };
        record.status = ImageStatus::Scanning;
        record.attempts += 1;
        self.put(&record).await?;
        info!(digest = %digest, repository, attempt = record.attempts, "scan started");

        let credentials = match self.registry.credentials() {
            Ok(c) => c,
            Err(e) => return self.fail(record, &error_chain(&e)).await,
        };
        let artifacts = match self
            .scanner
            .scan(&repository, digest, credentials.as_ref(), cancel)
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_cancelled() => {
                record.status = ImageStatus::Pending;
                record.attempts = record.attempts.saturating_sub(1);
                self.put(&record).await?;
                warn!(digest = %digest, "scan stopped by shutdown; back to pending");
                return Ok(ScanOutcome::Cancelled);
            }
            Err(e) => return self.fail(record, &scan_error_text(&e)).await,
        };
        self.finish(record, artifacts).await
    }

    async fn finish(
        &self,
        mut record: ImageRecord,
        artifacts: ScanArtifacts,
    ) -> Result<ScanOutcome, WorkerError> {
        let digest = record.digest.clone();
        let now = Utc::now();
        let sbom_name = Output::sbom_name(&digest);
        self.cache_sbom(&digest, &artifacts.sbom_path())?;
        self.output
            .copy_if_absent(&artifacts.sbom_path(), &sbom_name)?;

        let mut scan = ScanRecord {
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
            result_file: None,
            sbom_file: sbom_name,
            packages: artifacts.sbom.packages,
            matches: artifacts.grype.as_ref().map_or(0, |g| g.matches),
            severities: artifacts
                .grype
                .as_ref()
                .map(|g| g.severities.clone())
                .unwrap_or_default(),
        };

        if let Some(grype_path) = artifacts.grype_path() {
            let name = self.output.free_name(&Output::scan_result_name(
                &digest,
                now,
                scan.db_build.as_deref(),
            ))?;
            let (size, sha256) = file_sha256(&grype_path).map_err(|source| WorkerError::Cache {
                path: grype_path.clone(),
                source,
            })?;
            scan.result_file = Some(name.clone());
            record.pending_write = Some(PendingWrite {
                path: name.clone(),
                sha256,
                size,
                scan: scan.clone(),
            });
            self.put(&record).await?;
            if self.output.copy_if_absent(&grype_path, &name)?.is_none() {
                // Someone else took the name between free_name and the copy.
                return Err(WorkerError::Output(OutputError::NoFreeName {
                    path: self.output.path(&name),
                }));
            }
        }

        record.status = ImageStatus::Scanned;
        record.pending_write = None;
        record.last_error = None;
        record.next_retry = None;
        record.last_scan = Some(scan.clone());
        self.put(&record).await?;
        match &scan.result_file {
            Some(file) => info!(
                digest = %digest,
                packages = scan.packages,
                matches = scan.matches,
                db_build = scan.db_build.as_deref().unwrap_or("unknown"),
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

    async fn fail(&self, mut record: ImageRecord, text: &str) -> Result<ScanOutcome, WorkerError> {
        let delay = self.retry.delay(record.attempts);
        record.status = ImageStatus::Failed;
        record.last_error = Some(truncate(text, MAX_ERROR_CHARS));
        record.next_retry = Some(
            Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1)),
        );
        self.put(&record).await?;
        warn!(digest = %record.digest, attempt = record.attempts, retry_in = ?delay, error = %text, "scan failed");
        Ok(ScanOutcome::Failed {
            error: text.to_string(),
        })
    }

    async fn record_failure(&self, digest: &Digest, text: &str) -> Result<(), WorkerError> {
        if let Some(record) = self.store.get_image(digest)? {
            self.fail(record, text).await?;
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
        tmp.persist(self.sbom_cache.join(format!("{}.syft.json", digest.hex())))
            .map_err(|e| err(e.error))?;
        Ok(())
    }
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

fn scan_error_text(e: &ScanError) -> String {
    error_chain(e)
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
    /// Result files found complete after a crash and adopted.
    pub adopted: usize,
    /// Partial result files removed.
    pub removed_partial: usize,
}

/// Start-up: clears the temp area and settles digests a crash left `scanning`.
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
    for mut record in store.all_images()? {
        if record.status != ImageStatus::Scanning {
            continue;
        }
        match record.pending_write.take() {
            Some(pending) if output.is_complete(&pending.path, pending.size, &pending.sha256) => {
                record.status = ImageStatus::Scanned;
                record.last_scan = Some(pending.scan);
                record.last_error = None;
                record.next_retry = None;
                recovery.adopted += 1;
                info!(digest = %record.digest, file = %pending.path, "result written before a crash adopted");
            }
            Some(pending) => {
                output.remove(&pending.path)?;
                record.status = ImageStatus::Pending;
                recovery.removed_partial += 1;
                recovery.requeued += 1;
                warn!(digest = %record.digest, file = %pending.path, "partial result from a crash removed; will scan again");
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
            result_file: Some("scans/a/x.json".into()),
            sbom_file: "sboms/a.syft.json".into(),
            packages: 1,
            matches: 0,
            severities: Default::default(),
        };
        let complete = output
            .write_new("scans/a/x.json", b"{\"matches\":[]}")
            .unwrap();
        let partial = output.write_new("scans/b/y.json", b"{\"matc").unwrap();
        let mut batch = Batch::default();
        for (c, written, size, sha) in [
            ('a', &complete, complete.size, complete.sha256.clone()),
            ('b', &partial, 100, "0".repeat(64)),
        ] {
            let d = Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap();
            let mut r = ImageRecord::new(d, "m".into(), now);
            r.status = ImageStatus::Scanning;
            r.pending_write = Some(PendingWrite {
                path: written.name.clone(),
                sha256: sha,
                size,
                scan: scan.clone(),
            });
            batch.put_image(&r);
        }
        let d = Digest::parse(&format!("sha256:{}", "c".repeat(64))).unwrap();
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
                requeued: 2,
                adopted: 1,
                removed_partial: 1
            }
        );
        assert!(!tmp.exists());
        assert!(output.path("scans/a/x.json").exists());
        assert!(!output.path("scans/b/y.json").exists());
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
                ImageStatus::Pending
            ]
        );
    }
}
