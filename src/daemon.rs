//! The daemon: opens the store, recovers from a crash, owns the scan queue and its
//! workers, keeps the vulnerability DB fresh, and runs cycles (a watcher pass, then the
//! jobs it makes due) once or on the cron schedule.
//!
//! Invariants:
//! - Cycles never overlap. The cron job only does a non-blocking `try_send` on a channel
//!   of capacity 1, so ticks during a running cycle coalesce into one.
//! - What to do is decided from the store after each pass ([`plan`]): full scans go to
//!   the `new` lane, re-matches after a DB change to the `rematch` lane, so a new image is
//!   never stuck behind thousands of re-matches. A cycle waits for its full scans only;
//!   re-matches run on between cycles (`once` waits for them too).
//! - A DB update that installs a new build triggers a cycle at once, which queues the
//!   re-matches.
//! - A cycle that fails (registry down) is logged and the loop goes on.
//! - On shutdown (the root token cancelled) the queue closes, running scanners are killed
//!   and their digests go back, pending change records are written, the store is flushed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::changes;
use crate::config::{Config, RescanConfig};
use crate::digest::Digest;
use crate::output::Output;
use crate::queue::{JobKind, Lane, ScanQueue};
use crate::registry::{RegistryClient, RegistryError};
use crate::scanner::{Scanner, error_chain, passthrough_env};
use crate::state::{ImageRecord, ImageStatus, ScanMode, StateError, Store, TagRecord};
use crate::vulndb::{Readiness, UpdateOutcome, VulnDb};
use crate::watcher::{PassReport, WatchError, Watcher};
use crate::worker::{RetryPolicy, ScanOutcome, Worker, WorkerError, recover};

/// The daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state store")]
    State(#[from] StateError),
    #[error("registry client")]
    Registry(#[from] RegistryError),
    #[error("start-up recovery")]
    Recovery(#[from] WorkerError),
    #[error("output directory {path}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scheduler: {0}")]
    Scheduler(String),
}

impl DaemonError {
    /// True when the cause is the environment the operator set up (store locked, corrupt
    /// or newer; unusable directories): exit code 64 rather than 1.
    pub fn is_setup_error(&self) -> bool {
        matches!(
            self,
            DaemonError::State(
                StateError::Locked { .. }
                    | StateError::NewerSchema { .. }
                    | StateError::Corrupt { .. }
                    | StateError::CreateDir { .. }
            ) | DaemonError::Output { .. }
        )
    }
}

/// What to run after a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Full scans (new or failed-and-due or empty-SBOM-and-due digests).
    pub full: Vec<Digest>,
    /// Re-matches of cached SBOMs (DB changed, or the result is older than
    /// `rescan.max_age`).
    pub rematch: Vec<Digest>,
    /// Digests due for a full scan that wait for a usable DB.
    pub held: usize,
}

/// Decides from the store what to scan and what to re-match.
pub fn plan(
    images: &[ImageRecord],
    tags: &[TagRecord],
    readiness: &Readiness,
    rescan: &RescanConfig,
    now: DateTime<Utc>,
) -> Plan {
    let mut last_seen: HashMap<&Digest, DateTime<Utc>> = HashMap::new();
    for tag in tags {
        let seen = last_seen.entry(&tag.image_digest).or_insert(tag.last_seen);
        *seen = (*seen).max(tag.last_seen);
    }
    let window = chrono::TimeDelta::from_std(rescan.window).unwrap_or(chrono::TimeDelta::MAX);
    let max_age = rescan
        .max_age
        .and_then(|m| chrono::TimeDelta::from_std(m).ok());
    let mut out = Plan::default();
    for image in images {
        if image.tags.is_empty() {
            continue;
        }
        if image.is_due(now) {
            match readiness {
                Readiness::SbomOnly | Readiness::Ready { .. } => {
                    out.full.push(image.digest.clone())
                }
                Readiness::NoDb(_) | Readiness::Held(_) => out.held += 1,
            }
            continue;
        }
        let Readiness::Ready { build, .. } = readiness else {
            continue;
        };
        let (ImageStatus::Scanned, Some(scan)) = (image.status, image.last_scan.as_ref()) else {
            continue;
        };
        if image.next_retry.is_some_and(|t| t > now) {
            continue;
        }
        if last_seen
            .get(&image.digest)
            .is_none_or(|seen| now - *seen > window)
        {
            continue;
        }
        let db_changed = scan.mode == ScanMode::SbomOnly || scan.db_build != *build;
        let too_old = max_age.is_some_and(|m| now - scan.finished_at > m);
        if db_changed || too_old {
            out.rematch.push(image.digest.clone());
        }
    }
    out.full.sort();
    out.rematch.sort();
    out
}

/// What one cycle did: the watcher pass, then the jobs.
#[derive(Debug, Clone, Default)]
pub struct CycleSummary {
    pub pass: PassReport,
    pub queued: usize,
    pub rematch_queued: usize,
    pub held: usize,
    pub scanned: usize,
    pub failed: usize,
    /// Re-matches finished within the cycle (`once` only; `run` logs them as they end).
    pub rematched: usize,
    pub registry_requests: u64,
    pub duration: Duration,
}

/// A cycle that could not complete its listing.
#[derive(Debug, thiserror::Error)]
#[error("cycle failed after {duration:?} and {registry_requests} registry requests")]
pub struct CycleError {
    #[source]
    pub source: WatchError,
    pub duration: Duration,
    pub registry_requests: u64,
}

/// The running daemon's parts.
pub struct Daemon {
    config: Config,
    registry: Arc<RegistryClient>,
    watcher: Watcher,
    worker: Arc<Worker>,
    store: Arc<Store>,
    vulndb: Arc<VulnDb>,
    queue: Arc<ScanQueue>,
    output: Output,
}

impl Daemon {
    /// Opens the store, prepares the output directory and recovers from a crash.
    pub async fn open(config: Config) -> Result<Daemon, DaemonError> {
        let store = Arc::new(Store::open(&config.state_dir)?);
        std::fs::create_dir_all(&config.output_dir).map_err(|source| DaemonError::Output {
            path: config.output_dir.clone(),
            source,
        })?;
        let output = Output::new(&config.output_dir);
        let recovery = recover(&store, &output, &Scanner::tmp_root(&config.state_dir)).await?;
        if recovery != Default::default() {
            info!(
                requeued = recovery.requeued,
                adopted = recovery.adopted,
                removed_partial = recovery.removed_partial,
                "recovered from an unclean stop"
            );
        }
        let registry = Arc::new(RegistryClient::new(config.registry.clone())?);
        let passthrough = passthrough_env(std::env::vars());
        let vulndb = Arc::new(VulnDb::new(
            &config,
            passthrough.clone(),
            store.vulndb_state()?,
        ));
        let scanner = Arc::new(Scanner::new(&config, passthrough, vulndb.clone()));
        if scanner.sbom_only() {
            warn!(
                "SBOM-only mode: scanner.grype is empty, so images are inventoried and SBOMs written, but no vulnerabilities are matched"
            );
        }
        let watcher = Watcher::new(
            registry.clone(),
            store.clone(),
            output.clone(),
            config.registry.platform.clone(),
        );
        let worker = Arc::new(Worker {
            store: store.clone(),
            scanner,
            registry: registry.clone(),
            vulndb: vulndb.clone(),
            output: output.clone(),
            sbom_cache: Worker::sbom_cache_dir(&config.state_dir),
            retry: RetryPolicy {
                initial: config.scanner.retry_initial,
                max: config.scanner.retry_max,
            },
            empty_sbom_retry: RetryPolicy {
                initial: config.rescan.empty_sbom_retry,
                max: config.scanner.retry_max.max(config.rescan.empty_sbom_retry),
            },
        });
        let daemon = Daemon {
            config,
            registry,
            watcher,
            worker,
            store,
            vulndb,
            queue: Arc::new(ScanQueue::new()),
            output,
        };
        daemon.flush_changes().await;
        Ok(daemon)
    }

    /// The store (for status queries).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The vulnerability DB owner.
    pub fn vulndb(&self) -> &VulnDb {
        &self.vulndb
    }

    /// Reads the DB status and, unless automatic updates are off
    /// (`vulndb.update_cron = ""`), checks for an update. Logs what scans can expect.
    pub async fn prepare_db(&self, cancel: &CancellationToken) {
        if self.config.scanner.grype.is_none() {
            return;
        }
        if let Err(e) = self.vulndb.refresh_status(cancel).await {
            warn!(error = %error_chain(&e), "cannot read the vulnerability DB status");
        }
        if !self.config.vulndb.update_cron.is_empty() {
            self.vulndb.update(cancel).await;
        }
        self.save_db_state().await;
        match self.vulndb.readiness(Utc::now()).await {
            Readiness::Ready { build, stale } => info!(
                db_build = build.as_deref().unwrap_or("unknown"),
                stale,
                db = %self.vulndb.cache_dir().display(),
                "vulnerability DB ready"
            ),
            Readiness::NoDb(m) | Readiness::Held(m) => error!("{m}"),
            Readiness::SbomOnly => {}
        }
    }

    async fn save_db_state(&self) {
        if let Err(e) = self
            .store
            .put_vulndb_state(&self.vulndb.state().await)
            .await
        {
            warn!(error = %error_chain(&e), "cannot record the vulnerability DB state");
        }
    }

    /// Starts `scanner.concurrency` workers taking jobs from the queue until it closes.
    fn spawn_workers(&self, cancel: &CancellationToken) -> JoinSet<()> {
        let mut set = JoinSet::new();
        for _ in 0..self.config.scanner.concurrency {
            let queue = self.queue.clone();
            let worker = self.worker.clone();
            let store = self.store.clone();
            let output = self.output.clone();
            let cancel = cancel.clone();
            set.spawn(async move {
                while let Some(job) = tokio::select! {
                    job = queue.next() => job,
                    _ = cancel.cancelled() => None,
                } {
                    let outcome = worker.run(&job, &cancel).await;
                    queue.complete(&job.digest, outcome);
                    if job.lane == Lane::Rematch && queue.lane_idle(Lane::Rematch) {
                        flush_changes(&store, &output).await;
                    }
                }
            });
        }
        set
    }

    async fn flush_changes(&self) {
        flush_changes(&self.store, &self.output).await;
    }

    /// One cycle: a watcher pass, the plan, the jobs queued; waits for the full scans
    /// (and for the re-matches too when `wait_rematch`). Logs one summary line.
    pub async fn cycle(
        &self,
        cancel: &CancellationToken,
        wait_rematch: bool,
    ) -> Result<CycleSummary, CycleError> {
        let started = Instant::now();
        let requests_before = self.registry.stats().total();
        let pass = match self.watcher.pass(cancel).await {
            Ok(p) => p,
            Err(source) => {
                let err = CycleError {
                    source,
                    duration: started.elapsed(),
                    registry_requests: self.registry.stats().total() - requests_before,
                };
                error!(error = %error_chain(&err), "cycle failed; will try again at the next tick");
                return Err(err);
            }
        };
        let registry_requests = self.registry.stats().total() - requests_before;
        let now = Utc::now();
        let readiness = self.vulndb.readiness(now).await;
        let plan = match (self.store.all_images(), self.store.all_tags()) {
            (Ok(images), Ok(tags)) => plan(&images, &tags, &readiness, &self.config.rescan, now),
            (Err(e), _) | (_, Err(e)) => {
                let err = CycleError {
                    source: WatchError::State(e),
                    duration: started.elapsed(),
                    registry_requests,
                };
                error!(error = %error_chain(&err), "cycle failed; will try again at the next tick");
                return Err(err);
            }
        };
        if plan.held > 0 {
            if let Readiness::NoDb(m) | Readiness::Held(m) = &readiness {
                warn!(held = plan.held, "scans held: {m}");
            }
        }
        let full: Vec<oneshot::Receiver<ScanOutcome>> = plan
            .full
            .iter()
            .map(|d| self.queue.push(d.clone(), JobKind::Scan, Lane::New))
            .collect();
        let rematch: Vec<oneshot::Receiver<ScanOutcome>> = plan
            .rematch
            .iter()
            .map(|d| self.queue.push(d.clone(), JobKind::Rematch, Lane::Rematch))
            .collect();
        if !plan.rematch.is_empty() {
            let build = match &readiness {
                Readiness::Ready { build, .. } => build.as_deref().unwrap_or("unknown"),
                _ => "unknown",
            };
            info!(
                queued = plan.rematch.len(),
                db_build = build,
                "re-matches queued"
            );
        }
        let mut outcomes = wait_all(full, cancel).await;
        let rematch_outcomes = if wait_rematch {
            wait_all(rematch, cancel).await
        } else {
            Vec::new()
        };
        outcomes.extend(rematch_outcomes.iter().cloned());
        let count = |want: fn(&ScanOutcome) -> bool| outcomes.iter().filter(|o| want(o)).count();
        let summary = CycleSummary {
            queued: plan.full.len(),
            rematch_queued: plan.rematch.len(),
            held: plan.held + count(|o| matches!(o, ScanOutcome::Held { .. })),
            scanned: count(|o| matches!(o, ScanOutcome::Scanned { .. })),
            failed: count(|o| matches!(o, ScanOutcome::Failed { .. })),
            rematched: count(|o| matches!(o, ScanOutcome::Rematched { .. })),
            registry_requests,
            duration: started.elapsed(),
            pass,
        };
        let p = &summary.pass;
        info!(
            repositories = p.repositories,
            tags = p.tags,
            added = p.added,
            moved = p.moved,
            removed = p.removed,
            unchanged = p.unchanged,
            unsupported = p.unsupported,
            errors = p.errors,
            queued = summary.queued,
            rematch_queued = summary.rematch_queued,
            held = summary.held,
            scanned = summary.scanned,
            failed = summary.failed,
            rematched = summary.rematched,
            registry_requests = summary.registry_requests,
            duration_ms = summary.duration.as_millis() as u64,
            "cycle finished"
        );
        Ok(summary)
    }

    /// One cycle with all its jobs (re-matches too), then stop: `spcs-image-scanner once`.
    pub async fn once(&self, cancel: &CancellationToken) -> Result<CycleSummary, CycleError> {
        let mut workers = self.spawn_workers(cancel);
        self.prepare_db(cancel).await;
        let result = self.cycle(cancel, true).await;
        self.queue.close();
        while workers.join_next().await.is_some() {}
        self.flush_changes().await;
        let _ = self.store.flush().await;
        result
    }

    /// Runs cycles on the schedule (and one at start-up) until `cancel`, with DB
    /// updates on `vulndb.update_cron`.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), DaemonError> {
        let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
        let mut scheduler = JobScheduler::new()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        add_tick_job(
            &scheduler,
            &self.config.schedule.cron,
            tick_tx.clone(),
            "schedule",
        )
        .await?;
        let (db_tx, mut db_rx) = mpsc::channel::<()>(1);
        let db_updates =
            self.config.scanner.grype.is_some() && !self.config.vulndb.update_cron.is_empty();
        if db_updates {
            add_tick_job(
                &scheduler,
                &self.config.vulndb.update_cron,
                db_tx,
                "vulndb update",
            )
            .await?;
        }
        scheduler
            .start()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        info!(cron = %self.config.schedule.cron, registry = %self.config.registry.base_url, "daemon started");

        let mut workers = self.spawn_workers(&cancel);
        self.prepare_db(&cancel).await;
        let _ = self.cycle(&cancel, false).await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                tick = tick_rx.recv() => {
                    if tick.is_none() {
                        break;
                    }
                    let _ = self.cycle(&cancel, false).await;
                }
                Some(()) = db_rx.recv(), if db_updates => {
                    if let UpdateOutcome::Updated { .. } = self.vulndb.update(&cancel).await {
                        // A new DB: the next cycle queues the re-matches; start it now.
                        let _ = tick_tx.try_send(());
                    }
                    self.save_db_state().await;
                }
            }
        }
        let _ = scheduler.shutdown().await;
        self.queue.close();
        while workers.join_next().await.is_some() {}
        self.flush_changes().await;
        self.store.flush().await?;
        info!("daemon stopped");
        Ok(())
    }
}

async fn add_tick_job(
    scheduler: &JobScheduler,
    cron: &str,
    tx: mpsc::Sender<()>,
    what: &'static str,
) -> Result<(), DaemonError> {
    let job = CronJob::new_async(cron, move |_, _| {
        let tx = tx.clone();
        Box::pin(async move {
            // Full means the work is running and another run is already queued: this
            // tick adds nothing.
            if let Err(mpsc::error::TrySendError::Full(())) = tx.try_send(()) {
                info!(
                    what,
                    "schedule tick coalesced: a cycle is running and another is queued"
                );
            }
        })
    })
    .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    scheduler
        .add(job)
        .await
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
    Ok(())
}

async fn wait_all(
    receivers: Vec<oneshot::Receiver<ScanOutcome>>,
    cancel: &CancellationToken,
) -> Vec<ScanOutcome> {
    let mut out = Vec::with_capacity(receivers.len());
    for rx in receivers {
        tokio::select! {
            outcome = rx => out.push(outcome.unwrap_or(ScanOutcome::Cancelled)),
            _ = cancel.cancelled() => out.push(ScanOutcome::Cancelled),
        }
    }
    out
}

async fn flush_changes(store: &Store, output: &Output) {
    match changes::flush(store, output).await {
        Ok(Some(file)) => info!(file = %file, "change records written"),
        Ok(None) => {}
        Err(e) => warn!(error = %error_chain(&e), "cannot write change records; they stay queued"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ScanRecord;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn scanned(c: char, build: Option<&str>, mode: ScanMode, at: DateTime<Utc>) -> ImageRecord {
        let mut i = ImageRecord::new(d(c), "m".into(), at);
        i.status = ImageStatus::Scanned;
        i.tags.insert(format!("r:{c}"));
        i.last_scan = Some(ScanRecord {
            finished_at: at,
            mode,
            syft_version: "1".into(),
            grype_version: None,
            db_build: build.map(String::from),
            db_schema: None,
            result_file: None,
            sbom_file: String::new(),
            packages: 1,
            matches: 0,
            severities: Default::default(),
            flags: Vec::new(),
        });
        i
    }

    fn tag(c: char, seen: DateTime<Utc>) -> TagRecord {
        TagRecord {
            repository: "r".into(),
            tag: c.to_string(),
            digest: d(c),
            image_digest: d(c),
            platform: None,
            first_seen: seen,
            last_seen: seen,
            changed_at: seen,
            previous: vec![],
        }
    }

    fn rescan(max_age: Option<Duration>) -> RescanConfig {
        RescanConfig {
            window: Duration::from_secs(30 * 86400),
            max_age,
            empty_sbom_retry: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_db_change_rematches_recent_tagged_images_only() {
        let now = Utc::now();
        let old = now - chrono::TimeDelta::days(40);
        let ready = Readiness::Ready {
            build: Some("B2".into()),
            stale: false,
        };
        let mut pending = ImageRecord::new(d('e'), "m".into(), now);
        pending.tags.insert("r:e".into());
        let mut untagged = scanned('f', Some("B1"), ScanMode::Full, now);
        untagged.tags.clear();
        let images = vec![
            scanned('a', Some("B1"), ScanMode::Full, now), // old build: re-match
            scanned('b', Some("B2"), ScanMode::Full, now), // current: nothing
            scanned('c', Some("B1"), ScanMode::Full, now), // not seen for 40 days
            scanned('d', None, ScanMode::SbomOnly, now),   // SBOM only, grype now there
            untagged,
            pending,
        ];
        let tags = vec![
            tag('a', now),
            tag('b', now),
            tag('c', old),
            tag('d', now),
            tag('e', now),
        ];
        let p = plan(&images, &tags, &ready, &rescan(None), now);
        assert_eq!(p.full, vec![d('e')]);
        assert_eq!(p.rematch, vec![d('a'), d('d')]);
        assert_eq!(p.held, 0);

        // rescan.max_age re-matches old results without a DB change.
        let aged = vec![scanned(
            'b',
            Some("B2"),
            ScanMode::Full,
            now - chrono::TimeDelta::days(3),
        )];
        let p = plan(
            &aged,
            &[tag('b', now)],
            &ready,
            &rescan(Some(Duration::from_secs(86400))),
            now,
        );
        assert_eq!(p.rematch, vec![d('b')]);
        let p = plan(&aged, &[tag('b', now)], &ready, &rescan(None), now);
        assert!(p.rematch.is_empty());
    }

    #[test]
    fn without_a_usable_db_scans_are_held_and_nothing_is_rematched() {
        let now = Utc::now();
        let mut pending = ImageRecord::new(d('e'), "m".into(), now);
        pending.tags.insert("r:e".into());
        let images = vec![pending, scanned('a', Some("B1"), ScanMode::Full, now)];
        let tags = vec![tag('e', now), tag('a', now)];
        for readiness in [
            Readiness::NoDb("none".into()),
            Readiness::Held("old".into()),
        ] {
            let p = plan(&images, &tags, &readiness, &rescan(None), now);
            assert_eq!((p.full.len(), p.rematch.len(), p.held), (0, 0, 1));
        }
        let p = plan(&images, &tags, &Readiness::SbomOnly, &rescan(None), now);
        assert_eq!((p.full.len(), p.rematch.len(), p.held), (1, 0, 0));
    }
}
