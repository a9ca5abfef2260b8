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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::changes;
use crate::config::{Config, Environment, RescanConfig};
use crate::control::{
    Control, CycleFigures, ImageTarget, RequestState, Scope, Taken, Telemetry, Trigger,
};
use crate::current::Current;
use crate::digest::Digest;
use crate::output::Output;
use crate::queue::{JobKind, Lane, ScanQueue};
use crate::registry::{RegistryClient, RegistryError, RequestStats};
use crate::scanner::{Scanner, error_chain, passthrough_env};
use crate::state::{
    ImagePlanView, ImageRecord, ImageStatus, ScanMode, StateError, Store, TagPlanView,
};
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
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen on {addr} (api.listen)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
                | DaemonError::Listen { .. }
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
    images: &[ImagePlanView],
    tags: &[TagPlanView],
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
        if image.tags == 0 {
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

impl CycleFigures {
    fn ok(scope: &str, s: &CycleSummary) -> Self {
        let p = &s.pass;
        CycleFigures {
            scope: scope.to_string(),
            finished_at: Some(Utc::now()),
            ok: true,
            duration_ms: s.duration.as_millis() as u64,
            repositories: p.repositories,
            tags: p.tags,
            added: p.added,
            moved: p.moved,
            removed: p.removed,
            unchanged: p.unchanged,
            errors: p.errors,
            queued: s.queued,
            rematch_queued: s.rematch_queued,
            scanned: s.scanned,
            failed: s.failed,
            registry_requests: s.registry_requests,
            error: None,
        }
    }

    fn failed(scope: &str, e: &CycleError) -> Self {
        CycleFigures {
            scope: scope.to_string(),
            finished_at: Some(Utc::now()),
            ok: false,
            duration_ms: e.duration.as_millis() as u64,
            registry_requests: e.registry_requests,
            error: Some(error_chain(e)),
            ..CycleFigures::default()
        }
    }
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

/// Listings more of a registry event's repository while its push is not visible yet.
const EVENT_RELISTS: u32 = 3;
/// The first of those waits (doubling).
const EVENT_RELIST_DELAY: Duration = Duration::from_millis(500);

/// How long a graceful stop may take before `main` gives up waiting.
pub const STOP_DEADLINE: Duration = Duration::from_secs(25);

/// The running daemon's parts. Everything the API reads is behind an `Arc`.
pub struct Daemon {
    config: Arc<Current<Config>>,
    registry: Arc<Current<RegistryClient>>,
    watcher: Current<Watcher>,
    stats: Arc<RequestStats>,
    worker: Arc<Worker>,
    store: Arc<Store>,
    vulndb: Arc<VulnDb>,
    queue: Arc<ScanQueue>,
    output: Output,
    control: Arc<Control>,
    telemetry: Arc<Telemetry>,
    /// Scan slots: `scanner.concurrency` permits, resized on reload.
    slots: Arc<Semaphore>,
    slot_count: AtomicUsize,
}

/// What the HTTP API needs from the daemon.
#[derive(Clone)]
pub struct Handles {
    pub config: Arc<Current<Config>>,
    pub registry: Arc<Current<RegistryClient>>,
    pub stats: Arc<RequestStats>,
    pub store: Arc<Store>,
    pub vulndb: Arc<VulnDb>,
    pub queue: Arc<ScanQueue>,
    pub control: Arc<Control>,
    pub telemetry: Arc<Telemetry>,
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
        let stats = Arc::new(RequestStats::default());
        let client = Arc::new(RegistryClient::with_stats(
            config.registry.clone(),
            stats.clone(),
        )?);
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
            client.clone(),
            store.clone(),
            output.clone(),
            config.registry.platform.clone(),
        );
        let registry = Arc::new(Current::from_arc(client.clone()));
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
        let concurrency = config.scanner.concurrency;
        let daemon = Daemon {
            config: Arc::new(Current::new(config)),
            registry,
            watcher: Current::new(watcher),
            stats,
            worker,
            store,
            vulndb,
            queue: Arc::new(ScanQueue::new()),
            output,
            control: Arc::new(Control::new()),
            telemetry: Arc::new(Telemetry::new()),
            slots: Arc::new(Semaphore::new(concurrency)),
            slot_count: AtomicUsize::new(concurrency),
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

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// What the API serves from.
    pub fn handles(&self) -> Handles {
        Handles {
            config: self.config.clone(),
            registry: self.registry.clone(),
            stats: self.stats.clone(),
            store: self.store.clone(),
            vulndb: self.vulndb.clone(),
            queue: self.queue.clone(),
            control: self.control.clone(),
            telemetry: self.telemetry.clone(),
        }
    }

    /// Reads the DB status and, unless automatic updates are off
    /// (`vulndb.update_cron = ""`), checks for an update. Logs what scans can expect.
    pub async fn prepare_db(&self, cancel: &CancellationToken) {
        let config = self.config();
        if config.scanner.grype.is_none() {
            return;
        }
        if let Err(e) = self.vulndb.refresh_status(cancel).await {
            warn!(error = %error_chain(&e), "cannot read the vulnerability DB status");
        }
        if !config.vulndb.update_cron.is_empty() {
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

    /// Hands queued jobs to workers, at most `scanner.concurrency` at a time (the slot
    /// count follows reloads), until the queue closes or `cancel`.
    fn spawn_workers(&self, cancel: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let queue = self.queue.clone();
        let worker = self.worker.clone();
        let store = self.store.clone();
        let output = self.output.clone();
        let slots = self.slots.clone();
        let telemetry = self.telemetry.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut running = JoinSet::new();
            loop {
                let permit = tokio::select! {
                    p = slots.clone().acquire_owned() => p,
                    _ = cancel.cancelled() => break,
                };
                let Ok(permit) = permit else { break };
                let job = tokio::select! {
                    job = queue.next() => job,
                    _ = cancel.cancelled() => None,
                };
                let Some(job) = job else { break };
                let (queue, worker, store, output, telemetry, cancel) = (
                    queue.clone(),
                    worker.clone(),
                    store.clone(),
                    output.clone(),
                    telemetry.clone(),
                    cancel.clone(),
                );
                running.spawn(async move {
                    let _permit = permit;
                    let outcome = worker.run(&job, &cancel).await;
                    telemetry.job(job.kind == JobKind::Rematch, &job.digest, &outcome);
                    queue.complete(&job.digest, outcome);
                    if job.lane == Lane::Rematch && queue.lane_idle(Lane::Rematch) {
                        flush_changes(&store, &output).await;
                    }
                });
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
        })
    }

    /// Sets the number of scans that may run at once.
    fn resize_slots(&self, want: usize) {
        let had = self.slot_count.swap(want, Ordering::SeqCst);
        if want > had {
            self.slots.add_permits(want - had);
        } else if want < had {
            // Running scans finish; their slots are then retired.
            let slots = self.slots.clone();
            let retire = (had - want) as u32;
            tokio::spawn(async move {
                if let Ok(p) = slots.acquire_many_owned(retire).await {
                    p.forget();
                }
            });
        }
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
        let config = self.config();
        let requests_before = self.stats.total();
        let watcher = self.watcher.get();
        let pass = match watcher.pass(cancel).await {
            Ok(p) => p,
            Err(source) => {
                let err = CycleError {
                    source,
                    duration: started.elapsed(),
                    registry_requests: self.stats.total() - requests_before,
                };
                error!(error = %error_chain(&err), "cycle failed; will try again at the next tick");
                self.telemetry
                    .cycle(CycleFigures::failed("all", &err), err.duration);
                return Err(err);
            }
        };
        let registry_requests = self.stats.total() - requests_before;
        let now = Utc::now();
        let readiness = self.vulndb.readiness(now).await;
        let plan = match (self.store.image_plan_views(), self.store.tag_plan_views()) {
            (Ok(images), Ok(tags)) => plan(&images, &tags, &readiness, &config.rescan, now),
            (Err(e), _) | (_, Err(e)) => {
                let err = CycleError {
                    source: WatchError::State(e),
                    duration: started.elapsed(),
                    registry_requests,
                };
                error!(error = %error_chain(&err), "cycle failed; will try again at the next tick");
                self.telemetry
                    .cycle(CycleFigures::failed("all", &err), err.duration);
                return Err(err);
            }
        };
        if plan.held > 0 {
            if let Readiness::NoDb(m) | Readiness::Held(m) = &readiness {
                warn!(held = plan.held, "scans held: {m}");
            }
        }
        let (full, rematch) = self.queue_plan(&plan, &readiness);
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
        self.telemetry
            .cycle(CycleFigures::ok("all", &summary), summary.duration);
        Ok(summary)
    }

    /// Queues a plan's jobs: full scans in the `new` lane, re-matches in `rematch`.
    fn queue_plan(
        &self,
        plan: &Plan,
        readiness: &Readiness,
    ) -> (
        Vec<oneshot::Receiver<ScanOutcome>>,
        Vec<oneshot::Receiver<ScanOutcome>>,
    ) {
        let full = plan
            .full
            .iter()
            .map(|d| self.queue.push(d.clone(), JobKind::Scan, Lane::New))
            .collect();
        let rematch = plan
            .rematch
            .iter()
            .map(|d| self.queue.push(d.clone(), JobKind::Rematch, Lane::Rematch))
            .collect();
        if !plan.rematch.is_empty() {
            let build = match readiness {
                Readiness::Ready { build, .. } => build.as_deref().unwrap_or("unknown"),
                _ => "unknown",
            };
            info!(
                queued = plan.rematch.len(),
                db_build = build,
                "re-matches queued"
            );
        }
        (full, rematch)
    }

    /// Runs one request from the control plane: lists what its scope needs, decides,
    /// queues, and leaves a task to count the outcomes. Never waits for a scan.
    async fn handle_request(&self, taken: Taken, cancel: &CancellationToken) {
        let (id, scope, trigger) = (taken.id.as_str(), &taken.scope, taken.trigger);
        let started = Instant::now();
        self.control.set_state(id, RequestState::Listing, 0);
        let requests_before = self.stats.total();
        let watcher = self.watcher.get();
        let listed = match scope {
            Scope::All => Some(watcher.pass(cancel).await),
            Scope::Repository(r) => Some(watcher.pass_repository(r, cancel).await),
            Scope::Image(ImageTarget::Tag { repository, .. })
            | Scope::Image(ImageTarget::Pinned { repository, .. }) => {
                Some(watcher.pass_repository(repository, cancel).await)
            }
            Scope::Image(ImageTarget::Digest(_)) => None,
        };
        let label = match scope {
            Scope::All => "all".to_string(),
            other => other.repository().unwrap_or("image").to_string(),
        };
        let pass = match listed {
            Some(Err(source)) => {
                let err = CycleError {
                    source,
                    duration: started.elapsed(),
                    registry_requests: self.stats.total() - requests_before,
                };
                let text = error_chain(&err);
                warn!(request = id, scope = %scope.key(), error = %text, "request failed");
                self.telemetry
                    .cycle(CycleFigures::failed(&label, &err), err.duration);
                self.control.finish(id, Some(text));
                return;
            }
            Some(Ok(p)) => Some(p),
            None => None,
        };
        // A registry may notify before the pushed tag is visible in its listing: when
        // an event's listing shows no change, list again shortly (bounded).
        if trigger == Trigger::Event
            && taken.attempt < EVENT_RELISTS
            && pass.as_ref().is_some_and(|p| p.added + p.moved == 0)
        {
            let delay = EVENT_RELIST_DELAY * 2u32.pow(taken.attempt);
            debug!(request = id, scope = %scope.key(), ?delay, "registry event: no change visible yet; listing again");
            let control = self.control.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => control.requeue(taken),
                    _ = cancel.cancelled() => {}
                }
            });
            return;
        }
        let config = self.config();
        let now = Utc::now();
        let readiness = self.vulndb.readiness(now).await;
        let jobs = match self.decide(scope, trigger, &readiness, &config, now) {
            Ok(jobs) => jobs,
            Err(e) => {
                info!(request = id, scope = %scope.key(), "request failed: {e}");
                self.control.finish(id, Some(e));
                return;
            }
        };
        let receivers: Vec<oneshot::Receiver<ScanOutcome>> = jobs
            .iter()
            .map(|(d, kind, lane)| self.queue.push(d.clone(), *kind, *lane))
            .collect();
        if let Some(pass) = pass {
            let figures = CycleFigures {
                queued: jobs.len(),
                ..CycleFigures::ok(
                    &label,
                    &CycleSummary {
                        registry_requests: self.stats.total() - requests_before,
                        duration: started.elapsed(),
                        pass,
                        ..CycleSummary::default()
                    },
                )
            };
            let p = &figures;
            info!(
                request = id,
                scope = %scope.key(),
                tags = p.tags,
                added = p.added,
                moved = p.moved,
                removed = p.removed,
                errors = p.errors,
                queued = jobs.len(),
                registry_requests = p.registry_requests,
                duration_ms = p.duration_ms,
                "scoped cycle finished"
            );
            self.telemetry.cycle(figures, started.elapsed());
        }
        info!(request = id, scope = %scope.key(), jobs = jobs.len(), "request queued");
        self.control
            .set_state(id, RequestState::Queued, receivers.len());
        let control = self.control.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            for rx in receivers {
                let outcome = rx.await.unwrap_or(ScanOutcome::Cancelled);
                control.count_outcome(&id, &outcome);
            }
            control.finish(&id, None);
        });
    }

    /// The jobs a request makes, from the store after its listing.
    fn decide(
        &self,
        scope: &Scope,
        trigger: Trigger,
        readiness: &Readiness,
        config: &Config,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Digest, JobKind, Lane)>, String> {
        let store_err = |e: StateError| error_chain(&e);
        let images: Vec<ImageRecord> = match scope {
            Scope::All => self.store.all_images().map_err(store_err)?,
            Scope::Repository(r) => {
                let mut digests: Vec<Digest> = self
                    .store
                    .tags_in(r)
                    .map_err(store_err)?
                    .into_iter()
                    .map(|t| t.image_digest)
                    .collect();
                digests.sort();
                digests.dedup();
                let mut out = Vec::new();
                for d in digests {
                    if let Some(i) = self.store.get_image(&d).map_err(store_err)? {
                        out.push(i);
                    }
                }
                out
            }
            Scope::Image(target) => {
                let digest = match target {
                    ImageTarget::Tag { repository, tag } => self
                        .store
                        .get_tag(repository, tag)
                        .map_err(store_err)?
                        .map(|t| t.image_digest)
                        .ok_or_else(|| {
                            format!(
                                "the registry has no tag {repository}:{tag} (or it is not watched)"
                            )
                        })?,
                    ImageTarget::Digest(d) | ImageTarget::Pinned { digest: d, .. } => self
                        .image_digest(d)
                        .map_err(store_err)?
                        .ok_or_else(|| format!("no image with digest {d} is known"))?,
                };
                match self.store.get_image(&digest).map_err(store_err)? {
                    Some(i) => vec![i],
                    None => return Err(format!("no image with digest {digest} is known")),
                }
            }
        };
        if trigger == Trigger::Event {
            let tags = self.store.tag_plan_views().map_err(store_err)?;
            let views: Vec<ImagePlanView> = images.iter().map(ImagePlanView::from).collect();
            let plan = plan(&views, &tags, readiness, &config.rescan, now);
            return Ok(plan
                .full
                .into_iter()
                .map(|d| (d, JobKind::Scan, Lane::New))
                .chain(
                    plan.rematch
                        .into_iter()
                        .map(|d| (d, JobKind::Rematch, Lane::Rematch)),
                )
                .collect());
        }
        let force = matches!(trigger, Trigger::Rescan { force: true });
        let single = matches!(scope, Scope::Image(_));
        let build = match readiness {
            Readiness::Ready { build, .. } => Some(build.clone()),
            _ => None,
        };
        let mut jobs = Vec::new();
        for image in images {
            // Untagged images are history, unless asked for by name.
            if image.tags.is_empty() && !single {
                continue;
            }
            let kind = match image.status {
                ImageStatus::Unsupported => None,
                // Being scanned now: the queue attaches the request to the running scan
                // (forced or not), so the request reports that scan's outcome.
                ImageStatus::Scanning => Some(JobKind::Scan),
                _ if force => Some(JobKind::Scan),
                ImageStatus::Pending | ImageStatus::Failed => Some(JobKind::Scan),
                ImageStatus::Scanned => match (&image.last_scan, &build) {
                    (Some(s), _) if s.has_flag(crate::state::FLAG_EMPTY_SBOM) => {
                        Some(JobKind::Scan)
                    }
                    (Some(s), Some(build))
                        if s.mode == ScanMode::SbomOnly || s.db_build != *build =>
                    {
                        Some(JobKind::Rematch)
                    }
                    (None, _) => Some(JobKind::Scan),
                    // Already scanned with this DB (or no DB to match with now).
                    _ => None,
                },
            };
            if let Some(kind) = kind {
                jobs.push((image.digest, kind, Lane::Manual));
            }
        }
        Ok(jobs)
    }

    /// The image a digest names: itself, or an index's platform image.
    fn image_digest(&self, digest: &Digest) -> Result<Option<Digest>, StateError> {
        if self.store.get_image(digest)?.is_some() {
            return Ok(Some(digest.clone()));
        }
        Ok(self.store.get_index(digest)?.and_then(|i| i.child))
    }

    /// Re-reads the config file: validates it first and keeps the running config on
    /// error; applies the schedule, registry settings (filters, concurrency ...),
    /// `scanner.concurrency`, `[rescan]` and `vulndb.update_cron`; logs what changed and
    /// what needs a restart.
    async fn reload(&self, schedules: &mut Schedules) {
        let running = self.config();
        let fresh = match Config::load(&running.source, &Environment::from_process()) {
            Ok(c) => c,
            Err(e) => {
                let text = error_chain(&e);
                error!(error = %text, "config reload failed; keeping the running config");
                self.telemetry.reload(Some(text));
                return;
            }
        };
        let reload = match running.reloaded(&fresh, &Environment::from_process()) {
            Ok(r) => r,
            Err(e) => {
                let text = error_chain(&e);
                error!(error = %text, "config reload failed; keeping the running config");
                self.telemetry.reload(Some(text));
                return;
            }
        };
        if reload.applied.is_empty() && reload.restart.is_empty() {
            info!("config reloaded: nothing changed");
            self.telemetry.reload(None);
            return;
        }
        let new = reload.config;
        // The registry client first: it can fail (and then nothing changes).
        if reload.applied.iter().any(|k| k.starts_with("registry.")) {
            match RegistryClient::with_stats(new.registry.clone(), self.stats.clone()) {
                Ok(client) => {
                    let client = Arc::new(client);
                    self.watcher.set(Arc::new(Watcher::new(
                        client.clone(),
                        self.store.clone(),
                        self.output.clone(),
                        new.registry.platform.clone(),
                    )));
                    self.registry.set(client);
                }
                Err(e) => {
                    let text = error_chain(&e);
                    error!(error = %text, "config reload failed; keeping the running config");
                    self.telemetry.reload(Some(text));
                    return;
                }
            }
        }
        if new.schedule.cron != running.schedule.cron {
            if let Err(e) = schedules.set_cycle(&new.schedule.cron).await {
                error!(error = %e, "cannot apply schedule.cron; keeping the old schedule");
            }
        }
        if new.vulndb.update_cron != running.vulndb.update_cron && new.scanner.grype.is_some() {
            if let Err(e) = schedules.set_db(&new.vulndb.update_cron).await {
                error!(error = %e, "cannot apply vulndb.update_cron");
            }
        }
        if new.scanner.concurrency != running.scanner.concurrency {
            self.resize_slots(new.scanner.concurrency);
        }
        info!(
            applied = ?reload.applied,
            needs_restart = ?reload.restart,
            cron = %new.schedule.cron,
            scanner_concurrency = new.scanner.concurrency,
            registry_concurrency = new.registry.concurrency,
            "config reloaded"
        );
        if !reload.restart.is_empty() {
            warn!(keys = ?reload.restart, "these keys changed in the config file but take effect only after a restart");
        }
        self.config.set(Arc::new(new));
        self.telemetry.reload(None);
    }

    /// One cycle with all its jobs (re-matches too), then stop: `spcs-image-scanner once`.
    pub async fn once(&self, cancel: &CancellationToken) -> Result<CycleSummary, CycleError> {
        let workers = self.spawn_workers(cancel);
        self.prepare_db(cancel).await;
        let result = self.cycle(cancel, true).await;
        self.queue.close();
        let _ = workers.await;
        self.flush_changes().await;
        let _ = self.store.flush().await;
        result
    }

    /// Runs cycles on the schedule (and one at start-up) until `cancel`, with DB
    /// updates on `vulndb.update_cron`, the HTTP API, rescan requests and registry
    /// events, SIGUSR1 (rescan all) and SIGHUP (reload the config).
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), DaemonError> {
        let config = self.config();
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
        let api = match config.api.listen {
            Some(addr) => Some(
                crate::api::serve(addr, self.handles(), cancel.clone())
                    .await
                    .map_err(|source| DaemonError::Listen { addr, source })?,
            ),
            None => None,
        };
        let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
        let (db_tx, mut db_rx) = mpsc::channel::<()>(1);
        let mut schedules = Schedules::start(tick_tx.clone(), db_tx).await?;
        schedules.set_cycle(&config.schedule.cron).await?;
        if config.scanner.grype.is_some() && !config.vulndb.update_cron.is_empty() {
            schedules.set_db(&config.vulndb.update_cron).await?;
        }
        info!(
            cron = %config.schedule.cron,
            registry = %config.registry.base_url,
            api = %config.api.listen.map_or("off".to_string(), |a| a.to_string()),
            "daemon started"
        );

        let workers = self.spawn_workers(&cancel);
        self.prepare_db(&cancel).await;
        let _ = self.cycle(&cancel, false).await;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = hup.recv() => {
                    info!(file = %self.config().source.display(), "SIGHUP: reloading the config");
                    self.reload(&mut schedules).await;
                }
                _ = usr1.recv() => {
                    match self.control.submit(Scope::All, Trigger::Rescan { force: false }, "SIGUSR1") {
                        Ok(s) => info!(request = %s.request_id, coalesced = s.coalesced, "SIGUSR1: rescan of all images requested"),
                        Err(e) => warn!("SIGUSR1 ignored: {e}"),
                    }
                }
                _ = self.control.notified() => {
                    while let Some(taken) = self.control.take() {
                        if cancel.is_cancelled() {
                            self.control.finish(&taken.id, Some("stopped by shutdown".into()));
                            continue;
                        }
                        self.handle_request(taken, &cancel).await;
                    }
                }
                tick = tick_rx.recv() => {
                    if tick.is_none() {
                        break;
                    }
                    let _ = self.cycle(&cancel, false).await;
                }
                Some(()) = db_rx.recv() => {
                    if let UpdateOutcome::Updated { .. } = self.vulndb.update(&cancel).await {
                        // A new DB: the next cycle queues the re-matches; start it now.
                        let _ = tick_tx.try_send(());
                    }
                    self.save_db_state().await;
                }
            }
        }
        schedules.shutdown().await;
        self.queue.close();
        let _ = workers.await;
        self.flush_changes().await;
        self.store.flush().await?;
        if let Some(api) = api {
            let _ = api.await;
        }
        info!("daemon stopped");
        Ok(())
    }
}

/// The cron jobs: cycles, and DB updates when on. Replaced on reload.
struct Schedules {
    scheduler: JobScheduler,
    tick_tx: mpsc::Sender<()>,
    db_tx: mpsc::Sender<()>,
    cycle: Option<uuid::Uuid>,
    db: Option<uuid::Uuid>,
}

impl Schedules {
    async fn start(
        tick_tx: mpsc::Sender<()>,
        db_tx: mpsc::Sender<()>,
    ) -> Result<Self, DaemonError> {
        let scheduler = JobScheduler::new()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        scheduler
            .start()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        Ok(Schedules {
            scheduler,
            tick_tx,
            db_tx,
            cycle: None,
            db: None,
        })
    }

    async fn set_cycle(&mut self, cron: &str) -> Result<(), DaemonError> {
        let id = add_tick_job(&self.scheduler, cron, self.tick_tx.clone(), "schedule").await?;
        if let Some(old) = self.cycle.replace(id) {
            let _ = self.scheduler.remove(&old).await;
        }
        Ok(())
    }

    /// An empty `cron` turns DB updates off.
    async fn set_db(&mut self, cron: &str) -> Result<(), DaemonError> {
        if let Some(old) = self.db.take() {
            let _ = self.scheduler.remove(&old).await;
        }
        if !cron.is_empty() {
            self.db = Some(
                add_tick_job(&self.scheduler, cron, self.db_tx.clone(), "vulndb update").await?,
            );
        }
        Ok(())
    }

    async fn shutdown(mut self) {
        let _ = self.scheduler.shutdown().await;
    }
}

async fn add_tick_job(
    scheduler: &JobScheduler,
    cron: &str,
    tx: mpsc::Sender<()>,
    what: &'static str,
) -> Result<uuid::Uuid, DaemonError> {
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
        .map_err(|e| DaemonError::Scheduler(e.to_string()))
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
    use crate::state::{ScanRecord, TagRecord};

    /// [`super::plan`] over the views of whole records, as the store reads them.
    fn plan(
        images: &[ImageRecord],
        tags: &[TagRecord],
        readiness: &Readiness,
        rescan: &RescanConfig,
        now: DateTime<Utc>,
    ) -> Plan {
        let images: Vec<ImagePlanView> = images
            .iter()
            .map(|i| serde_json::from_str(&serde_json::to_string(i).unwrap()).unwrap())
            .collect();
        let tags: Vec<TagPlanView> = tags
            .iter()
            .map(|t| serde_json::from_str(&serde_json::to_string(t).unwrap()).unwrap())
            .collect();
        super::plan(&images, &tags, readiness, rescan, now)
    }

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
