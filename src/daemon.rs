//! The daemon: opens the store, recovers from a crash, and runs cycles (a watcher pass
//! and the scans it finds due) once or on the cron schedule.
//!
//! Invariants:
//! - Cycles never overlap. The cron job only does a non-blocking `try_send` on a channel
//!   of capacity 1, so ticks during a running cycle coalesce into one.
//! - A cycle that fails (registry down) is logged and the loop goes on; the next tick
//!   tries again.
//! - On shutdown (the root token cancelled) running scanners are killed, their digests go
//!   back to `pending`, and the store is flushed before returning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::output::Output;
use crate::registry::{RegistryClient, RegistryError};
use crate::scanner::{Scanner, error_chain};
use crate::state::{StateError, Store};
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
        path: std::path::PathBuf,
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

/// What one cycle did: the watcher pass, then the scans.
#[derive(Debug, Clone, Default)]
pub struct CycleSummary {
    pub pass: PassReport,
    pub scanned: usize,
    pub failed: usize,
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
    worker: Worker,
    store: Arc<Store>,
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
        let scanner = Arc::new(Scanner::new(&config, std::env::vars()));
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
        let worker = Worker {
            store: store.clone(),
            scanner,
            registry: registry.clone(),
            output,
            sbom_cache: Worker::sbom_cache_dir(&config.state_dir),
            retry: RetryPolicy {
                initial: config.scanner.retry_initial,
                max: config.scanner.retry_max,
            },
        };
        Ok(Daemon {
            config,
            registry,
            watcher,
            worker,
            store,
        })
    }

    /// The store (for status queries).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One cycle: a watcher pass, then the scans it found due, `scanner.concurrency` at a
    /// time. Logs one summary line.
    pub async fn cycle(&self, cancel: &CancellationToken) -> Result<CycleSummary, CycleError> {
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
        let outcomes: Vec<ScanOutcome> = futures::stream::iter(pass.due.iter())
            .map(|digest| self.worker.scan(digest, cancel))
            .buffer_unordered(self.config.scanner.concurrency)
            .collect()
            .await;
        let count = |want: fn(&ScanOutcome) -> bool| outcomes.iter().filter(|o| want(o)).count();
        let summary = CycleSummary {
            scanned: count(|o| matches!(o, ScanOutcome::Scanned { .. })),
            failed: count(|o| matches!(o, ScanOutcome::Failed { .. })),
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
            queued = p.due.len(),
            scanned = summary.scanned,
            failed = summary.failed,
            registry_requests = summary.registry_requests,
            duration_ms = summary.duration.as_millis() as u64,
            "cycle finished"
        );
        Ok(summary)
    }

    /// Runs cycles on the schedule (and one at start-up) until `cancel`.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), DaemonError> {
        let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
        let mut scheduler = JobScheduler::new()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let job = Job::new_async(self.config.schedule.cron.as_str(), move |_, _| {
            let tx = tick_tx.clone();
            Box::pin(async move {
                // Full means a cycle is running and another is already queued: this tick
                // adds nothing.
                if let Err(mpsc::error::TrySendError::Full(())) = tx.try_send(()) {
                    info!("schedule tick coalesced: a cycle is running and another is queued");
                }
            })
        })
        .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        scheduler
            .add(job)
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        scheduler
            .start()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        info!(cron = %self.config.schedule.cron, registry = %self.config.registry.base_url, "daemon started");

        let _ = self.cycle(&cancel).await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                tick = tick_rx.recv() => {
                    if tick.is_none() {
                        break;
                    }
                    let _ = self.cycle(&cancel).await;
                }
            }
        }
        let _ = scheduler.shutdown().await;
        self.store.flush().await?;
        info!("daemon stopped");
        Ok(())
    }
}
