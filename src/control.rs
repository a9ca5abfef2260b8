//! The control plane's model: rescan requests (from HTTP, SQL, signals and registry
//! events) coalesced by scope, and the daemon's running figures for `/status`,
//! `/metrics` and `/readyz`.
//!
//! Invariants:
//! - A request is accepted at once and never waits for a scan: it is recorded, queued
//!   for the daemon's control loop, and answered with its id.
//! - Requests for the same scope (and kind, and `force`) coalesce while one is not
//!   finished: a burst of 1,000 asks for the same image yields one request and one job.
//! - At most [`MAX_PENDING`] distinct requests wait; more are refused (the caller gets
//!   503), so a flood of distinct targets cannot grow memory without bound.
//! - Finished requests are kept for lookup up to [`MAX_KEPT`], oldest dropped first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;

use crate::digest::Digest;
use crate::registry::{is_valid_repository_name, is_valid_tag};
use crate::worker::ScanOutcome;

/// Distinct requests waiting for the control loop at most.
pub const MAX_PENDING: usize = 1024;
/// Requests kept for `GET /rescan/{id}`.
pub const MAX_KEPT: usize = 512;
/// Failures kept for `/status`.
const MAX_FAILURES: usize = 20;

/// Bad input, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// One image, as an operator names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTarget {
    /// `sha256:...`: an image (or index) the store knows.
    Digest(Digest),
    /// `repo:tag`.
    Tag { repository: String, tag: String },
    /// `repo@sha256:...`.
    Pinned { repository: String, digest: Digest },
}

/// What a rescan covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Repository(String),
    Image(ImageTarget),
}

impl Scope {
    /// From `POST /rescan`'s `scope` and `target`.
    pub fn parse(scope: &str, target: Option<&str>) -> Result<Scope, FieldError> {
        let target = target.map(str::trim).filter(|t| !t.is_empty());
        match scope {
            "all" => match target {
                None => Ok(Scope::All),
                Some(_) => Err(FieldError::new(
                    "target",
                    "must be empty when scope is \"all\"",
                )),
            },
            "repository" => {
                let t = target
                    .ok_or_else(|| FieldError::new("target", "required: a repository name"))?;
                let name = strip_host(t);
                if !is_valid_repository_name(name) {
                    return Err(FieldError::new(
                        "target",
                        format!("{:?} is not a valid repository name", truncate(t)),
                    ));
                }
                Ok(Scope::Repository(name.to_string()))
            }
            "image" => {
                let t = target.ok_or_else(|| {
                    FieldError::new(
                        "target",
                        "required: an image reference (repo:tag, repo@sha256:...) or a digest",
                    )
                })?;
                Ok(Scope::Image(parse_image(t)?))
            }
            other => Err(FieldError::new(
                "scope",
                format!(
                    "{:?} is not one of \"all\", \"repository\", \"image\"",
                    truncate(other)
                ),
            )),
        }
    }

    /// From a bare target (the SQL service function): `all` or `*`, a digest, a
    /// reference with a tag or digest, else a repository.
    pub fn infer(target: &str) -> Result<Scope, FieldError> {
        let t = target.trim();
        if t.is_empty() {
            return Err(FieldError::new(
                "target",
                "empty: give \"all\", a repository, or an image reference",
            ));
        }
        if t == "all" || t == "*" {
            return Ok(Scope::All);
        }
        let name = strip_host(t);
        let last = name.rsplit('/').next().unwrap_or(name);
        if t.starts_with("sha256:") || name.contains('@') || last.contains(':') {
            Scope::parse("image", Some(t))
        } else {
            Scope::parse("repository", Some(t))
        }
    }

    /// A stable key: requests with the same key coalesce.
    pub fn key(&self) -> String {
        match self {
            Scope::All => "all".to_string(),
            Scope::Repository(r) => format!("repository:{r}"),
            Scope::Image(ImageTarget::Digest(d)) => format!("image:{d}"),
            Scope::Image(ImageTarget::Tag { repository, tag }) => {
                format!("image:{repository}:{tag}")
            }
            Scope::Image(ImageTarget::Pinned { repository, digest }) => {
                format!("image:{repository}@{digest}")
            }
        }
    }

    /// The repository to list before deciding, if the scope names one.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Scope::Repository(r) => Some(r),
            Scope::Image(ImageTarget::Tag { repository, .. })
            | Scope::Image(ImageTarget::Pinned { repository, .. }) => Some(repository),
            _ => None,
        }
    }
}

/// Drops a registry host (`host.domain[:port]/`, `localhost/`) in front of a
/// reference: the daemon watches one registry.
fn strip_host(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, rest))
            if !rest.is_empty()
                && is_host(first)
                && (first.contains('.') || first.contains(':') || first == "localhost") =>
        {
            rest
        }
        _ => reference,
    }
}

/// `name[:port]` where the name is letters, digits, dots and dashes, beginning and
/// ending with a letter or digit (so `..` is never a host).
fn is_host(text: &str) -> bool {
    let (name, port) = match text.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (text, None),
    };
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

fn parse_image(text: &str) -> Result<ImageTarget, FieldError> {
    if text.starts_with("sha256:") {
        return Digest::parse(text)
            .map(ImageTarget::Digest)
            .map_err(|e| FieldError::new("target", format!("not a digest: {e}")));
    }
    let name = strip_host(text);
    if let Some((repository, digest)) = name.split_once('@') {
        check_repository(repository, text)?;
        let digest = Digest::parse(digest)
            .map_err(|e| FieldError::new("target", format!("not a digest: {e}")))?;
        return Ok(ImageTarget::Pinned {
            repository: repository.to_string(),
            digest,
        });
    }
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let Some(colon) = name[slash..].rfind(':').map(|i| slash + i) else {
        return Err(FieldError::new(
            "target",
            format!(
                "{:?} names no tag or digest: use repo:tag, repo@sha256:... or sha256:...",
                truncate(text)
            ),
        ));
    };
    let (repository, tag) = (&name[..colon], &name[colon + 1..]);
    check_repository(repository, text)?;
    if !is_valid_tag(tag) {
        return Err(FieldError::new(
            "target",
            format!("{:?} is not a valid tag", truncate(tag)),
        ));
    }
    Ok(ImageTarget::Tag {
        repository: repository.to_string(),
        tag: tag.to_string(),
    })
}

fn check_repository(repository: &str, text: &str) -> Result<(), FieldError> {
    if is_valid_repository_name(repository) {
        Ok(())
    } else {
        Err(FieldError::new(
            "target",
            format!(
                "{:?}: {:?} is not a valid repository name",
                truncate(text),
                truncate(repository)
            ),
        ))
    }
}

/// Untrusted text echoed in an error, cut to a readable length.
fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An operator's rescan: jobs go to the `manual` lane. `force` ignores "already
    /// scanned with this DB" and builds a fresh SBOM.
    Rescan { force: bool },
    /// A registry push: a cycle for that repository, with the usual rules.
    Event,
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    /// Waiting for the control loop.
    Accepted,
    /// Its listing runs.
    Listing,
    /// Its jobs are queued or running.
    Queued,
    /// Every job ended (see `outcomes`).
    Done,
    /// It could not run (listing failed, image unknown); see `error`.
    Failed,
}

/// A request as `GET /rescan/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub id: String,
    pub scope: String,
    pub kind: &'static str,
    pub force: bool,
    pub source: String,
    pub received_at: DateTime<Utc>,
    /// Further requests merged into this one.
    pub coalesced: u64,
    pub state: RequestState,
    /// Digests queued for it.
    pub jobs: usize,
    /// Job outcomes so far: `scanned`, `rematched`, `failed`, ...
    pub outcomes: BTreeMap<String, usize>,
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub request_id: String,
    /// True when it joined a request for the same scope that had not finished.
    pub coalesced: bool,
}

/// A request taken for running.
#[derive(Debug, Clone)]
pub struct Taken {
    pub id: String,
    pub scope: Scope,
    pub trigger: Trigger,
    /// Runs before this one (a registry event whose push was not visible yet).
    pub attempt: u32,
}

/// Too many distinct requests are waiting.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{MAX_PENDING} requests are waiting already; try again later")]
pub struct Busy;

struct Pending {
    id: String,
    scope: Scope,
    trigger: Trigger,
    attempt: u32,
}

#[derive(Default)]
struct Inner {
    /// Coalescing key → id, until the request finishes.
    active: HashMap<String, String>,
    pending: VecDeque<Pending>,
    records: HashMap<String, RequestRecord>,
    /// Ids of finished requests, oldest first.
    finished: VecDeque<String>,
}

/// Rescan requests between the API (and signals) and the daemon's control loop.
pub struct Control {
    inner: Mutex<Inner>,
    notify: Notify,
    next: AtomicU64,
    epoch: String,
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    pub fn new() -> Self {
        Control {
            inner: Mutex::default(),
            notify: Notify::new(),
            next: AtomicU64::new(1),
            // Ids stay unique across restarts.
            epoch: format!("{:x}", Utc::now().timestamp_millis()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a request, or merges it into an unfinished one for the same scope.
    pub fn submit(&self, scope: Scope, trigger: Trigger, source: &str) -> Result<Submitted, Busy> {
        let (kind, force) = match trigger {
            Trigger::Rescan { force } => ("rescan", force),
            Trigger::Event => ("event", false),
        };
        let key = format!("{kind}|{force}|{}", scope.key());
        let mut inner = self.lock();
        if let Some(id) = inner.active.get(&key).cloned() {
            if let Some(record) = inner.records.get_mut(&id) {
                record.coalesced += 1;
            }
            return Ok(Submitted {
                request_id: id,
                coalesced: true,
            });
        }
        if inner.pending.len() >= MAX_PENDING {
            return Err(Busy);
        }
        let id = format!(
            "{}-{}",
            self.epoch,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        inner.records.insert(
            id.clone(),
            RequestRecord {
                id: id.clone(),
                scope: scope.key(),
                kind,
                force,
                source: source.to_string(),
                received_at: Utc::now(),
                coalesced: 0,
                state: RequestState::Accepted,
                jobs: 0,
                outcomes: BTreeMap::new(),
                error: None,
                finished_at: None,
            },
        );
        inner.active.insert(key, id.clone());
        inner.pending.push_back(Pending {
            id: id.clone(),
            scope,
            trigger,
            attempt: 0,
        });
        drop(inner);
        self.notify.notify_one();
        Ok(Submitted {
            request_id: id,
            coalesced: false,
        })
    }

    /// Waits until a request may be waiting.
    pub async fn notified(&self) {
        let notified = self.notify.notified();
        if !self.lock().pending.is_empty() {
            return;
        }
        notified.await;
    }

    /// The oldest waiting request, with how many times it ran before.
    pub fn take(&self) -> Option<Taken> {
        let p = self.lock().pending.pop_front()?;
        Some(Taken {
            id: p.id,
            scope: p.scope,
            trigger: p.trigger,
            attempt: p.attempt,
        })
    }

    /// Puts a request back to run again (its coalescing key stays taken meanwhile).
    pub fn requeue(&self, taken: Taken) {
        if let Some(r) = self.lock().records.get_mut(&taken.id) {
            r.state = RequestState::Accepted;
        }
        self.lock().pending.push_back(Pending {
            id: taken.id,
            scope: taken.scope,
            trigger: taken.trigger,
            attempt: taken.attempt + 1,
        });
        self.notify.notify_one();
    }

    /// Distinct requests waiting.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Sets a request's state.
    pub fn set_state(&self, id: &str, state: RequestState, jobs: usize) {
        if let Some(r) = self.lock().records.get_mut(id) {
            r.state = state;
            r.jobs = jobs;
        }
    }

    /// Counts one job outcome of a request.
    pub fn count_outcome(&self, id: &str, outcome: &ScanOutcome) {
        if let Some(r) = self.lock().records.get_mut(id) {
            *r.outcomes
                .entry(outcome_name(outcome).to_string())
                .or_default() += 1;
        }
    }

    /// Ends a request: later ones for its scope start afresh.
    pub fn finish(&self, id: &str, error: Option<String>) {
        let mut inner = self.lock();
        inner.active.retain(|_, v| v != id);
        if let Some(r) = inner.records.get_mut(id) {
            r.state = if error.is_some() {
                RequestState::Failed
            } else {
                RequestState::Done
            };
            r.error = error;
            r.finished_at = Some(Utc::now());
        }
        inner.finished.push_back(id.to_string());
        while inner.finished.len() > MAX_KEPT {
            if let Some(old) = inner.finished.pop_front() {
                inner.records.remove(&old);
            }
        }
    }

    /// One request, if still kept.
    pub fn get(&self, id: &str) -> Option<RequestRecord> {
        self.lock().records.get(id).cloned()
    }

    /// Requests not finished yet, oldest first.
    pub fn unfinished(&self) -> Vec<RequestRecord> {
        let inner = self.lock();
        let mut out: Vec<RequestRecord> = inner
            .active
            .values()
            .filter_map(|id| inner.records.get(id).cloned())
            .collect();
        out.sort_by_key(|r| r.received_at);
        out
    }
}

/// The short name of an outcome, for counters.
pub fn outcome_name(outcome: &ScanOutcome) -> &'static str {
    match outcome {
        ScanOutcome::Scanned { .. } => "scanned",
        ScanOutcome::Rematched { .. } => "rematched",
        ScanOutcome::Failed { .. } => "failed",
        ScanOutcome::Skipped => "skipped",
        ScanOutcome::Held { .. } => "held",
        ScanOutcome::Cancelled => "cancelled",
    }
}

/// The last cycle, as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleFigures {
    /// `all`, or the repository of a scoped cycle.
    pub scope: String,
    pub finished_at: Option<DateTime<Utc>>,
    pub ok: bool,
    pub duration_ms: u64,
    pub repositories: usize,
    pub tags: usize,
    pub added: usize,
    pub moved: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub errors: usize,
    pub queued: usize,
    pub rematch_queued: usize,
    pub scanned: usize,
    pub failed: usize,
    pub registry_requests: u64,
    pub error: Option<String>,
}

/// A failure worth showing an operator.
#[derive(Debug, Clone, Serialize)]
pub struct FailureRecord {
    pub at: DateTime<Utc>,
    /// `cycle`, `scan` or `reload`.
    pub what: &'static str,
    pub digest: Option<String>,
    pub error: String,
}

#[derive(Default)]
struct Figures {
    cycles: BTreeMap<(&'static str, &'static str), u64>,
    cycle_seconds_sum: f64,
    cycle_count: u64,
    last_cycle: Option<CycleFigures>,
    failing_since: Option<DateTime<Utc>>,
    failures: VecDeque<FailureRecord>,
    outcomes: BTreeMap<(&'static str, &'static str), u64>,
    reloads: BTreeMap<&'static str, u64>,
}

/// Running figures, shared by the daemon and the API.
pub struct Telemetry {
    pub started_at: DateTime<Utc>,
    figures: Mutex<Figures>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

/// A snapshot of [`Telemetry`].
#[derive(Debug, Clone, Default)]
pub struct TelemetrySnapshot {
    /// (scope kind `all`|`repository`, result `ok`|`failed`) → cycles.
    pub cycles: BTreeMap<(&'static str, &'static str), u64>,
    pub cycle_seconds_sum: f64,
    pub cycle_count: u64,
    pub last_cycle: Option<CycleFigures>,
    pub failing_since: Option<DateTime<Utc>>,
    pub failures: Vec<FailureRecord>,
    /// (job kind `scan`|`rematch`, outcome) → jobs.
    pub outcomes: BTreeMap<(&'static str, &'static str), u64>,
    /// `ok`|`failed` → reloads.
    pub reloads: BTreeMap<&'static str, u64>,
}

impl Telemetry {
    pub fn new() -> Self {
        Telemetry {
            started_at: Utc::now(),
            figures: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.figures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a finished (or failed) cycle.
    pub fn cycle(&self, figures: CycleFigures, duration: Duration) {
        let mut f = self.lock();
        let kind = if figures.scope == "all" {
            "all"
        } else {
            "repository"
        };
        let result = if figures.ok { "ok" } else { "failed" };
        *f.cycles.entry((kind, result)).or_default() += 1;
        f.cycle_seconds_sum += duration.as_secs_f64();
        f.cycle_count += 1;
        // Readiness follows full cycles only: one repository failing to list (an event
        // for a repository deleted since) does not make the daemon unready.
        if figures.ok {
            if kind == "all" {
                f.failing_since = None;
            }
        } else {
            let now = figures.finished_at.unwrap_or_else(Utc::now);
            if kind == "all" {
                f.failing_since.get_or_insert(now);
            }
            push_failure(
                &mut f.failures,
                FailureRecord {
                    at: now,
                    what: "cycle",
                    digest: None,
                    error: figures.error.clone().unwrap_or_default(),
                },
            );
        }
        f.last_cycle = Some(figures);
    }

    /// Records a job's outcome.
    pub fn job(&self, rematch: bool, digest: &Digest, outcome: &ScanOutcome) {
        let mut f = self.lock();
        let kind = if rematch { "rematch" } else { "scan" };
        *f.outcomes.entry((kind, outcome_name(outcome))).or_default() += 1;
        if let ScanOutcome::Failed { error } = outcome {
            push_failure(
                &mut f.failures,
                FailureRecord {
                    at: Utc::now(),
                    what: "scan",
                    digest: Some(digest.to_string()),
                    error: error.chars().take(500).collect(),
                },
            );
        }
    }

    /// Records a config reload.
    pub fn reload(&self, error: Option<String>) {
        let mut f = self.lock();
        *f.reloads
            .entry(if error.is_some() { "failed" } else { "ok" })
            .or_default() += 1;
        if let Some(error) = error {
            push_failure(
                &mut f.failures,
                FailureRecord {
                    at: Utc::now(),
                    what: "reload",
                    digest: None,
                    error,
                },
            );
        }
    }

    pub fn snapshot(&self) -> TelemetrySnapshot {
        let f = self.lock();
        TelemetrySnapshot {
            cycles: f.cycles.clone(),
            cycle_seconds_sum: f.cycle_seconds_sum,
            cycle_count: f.cycle_count,
            last_cycle: f.last_cycle.clone(),
            failing_since: f.failing_since,
            failures: f.failures.iter().rev().cloned().collect(),
            outcomes: f.outcomes.clone(),
            reloads: f.reloads.clone(),
        }
    }
}

fn push_failure(list: &mut VecDeque<FailureRecord>, record: FailureRecord) {
    list.push_back(record);
    while list.len() > MAX_FAILURES {
        list.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn scopes_parse_and_bad_input_names_the_field() {
        assert_eq!(Scope::parse("all", None).unwrap(), Scope::All);
        assert_eq!(
            Scope::parse("repository", Some("db/schema/repo/app")).unwrap(),
            Scope::Repository("db/schema/repo/app".into())
        );
        assert_eq!(
            Scope::parse(
                "image",
                Some("org-acct.registry.snowflakecomputing.com/db/s/r/python:3.6")
            )
            .unwrap(),
            Scope::Image(ImageTarget::Tag {
                repository: "db/s/r/python".into(),
                tag: "3.6".into()
            })
        );
        assert_eq!(
            Scope::parse("image", Some("127.0.0.1:5000/app@".to_string().as_str()))
                .unwrap_err()
                .field,
            "target"
        );
        assert!(matches!(
            Scope::parse("image", Some(&format!("app@{D}"))).unwrap(),
            Scope::Image(ImageTarget::Pinned { .. })
        ));
        assert!(matches!(
            Scope::parse("image", Some(D)).unwrap(),
            Scope::Image(ImageTarget::Digest(_))
        ));
        for (scope, target, field) in [
            ("everything", None, "scope"),
            ("all", Some("x"), "target"),
            ("repository", None, "target"),
            ("repository", Some("../etc"), "target"),
            ("repository", Some("../../etc"), "target"),
            ("image", Some("../etc:1"), "target"),
            ("repository", Some("a/%2e%2e/b"), "target"),
            ("repository", Some("UPPER"), "target"),
            ("image", Some("app"), "target"),
            ("image", Some("app:bad tag"), "target"),
            ("image", Some("sha256:abc"), "target"),
        ] {
            assert_eq!(
                Scope::parse(scope, target).unwrap_err().field,
                field,
                "{scope} {target:?}"
            );
        }
    }

    #[test]
    fn the_service_function_target_is_inferred() {
        assert_eq!(Scope::infer("all").unwrap(), Scope::All);
        assert_eq!(
            Scope::infer("db/schema/repo/python").unwrap(),
            Scope::Repository("db/schema/repo/python".into())
        );
        assert!(matches!(
            Scope::infer("db/schema/repo/python:3.6").unwrap(),
            Scope::Image(ImageTarget::Tag { .. })
        ));
        assert!(matches!(
            Scope::infer("localhost:5000/app").unwrap(),
            Scope::Repository(_)
        ));
        assert!(Scope::infer(" ").is_err());
    }

    #[test]
    fn requests_for_one_scope_coalesce_until_finished() {
        let c = Control::new();
        let first = c
            .submit(Scope::All, Trigger::Rescan { force: false }, "test")
            .unwrap();
        assert!(!first.coalesced);
        for _ in 0..999 {
            let again = c
                .submit(Scope::All, Trigger::Rescan { force: false }, "test")
                .unwrap();
            assert_eq!(again.request_id, first.request_id);
            assert!(again.coalesced);
        }
        // force and events are separate requests.
        let forced = c
            .submit(Scope::All, Trigger::Rescan { force: true }, "test")
            .unwrap();
        assert_ne!(forced.request_id, first.request_id);
        assert_eq!(c.pending(), 2);
        let taken = c.take().unwrap();
        let id = taken.id.clone();
        assert_eq!(
            (id.as_str(), &taken.scope, taken.attempt),
            (first.request_id.as_str(), &Scope::All, 0)
        );
        // Put back (an event not visible yet): the same request, one attempt on.
        c.requeue(taken);
        assert_eq!(
            c.take().unwrap().id,
            forced.request_id,
            "behind the waiting one"
        );
        let taken = c.take().unwrap();
        assert_eq!((taken.id.as_str(), taken.attempt), (id.as_str(), 1));
        // Still running: coalesces.
        assert!(
            c.submit(Scope::All, Trigger::Rescan { force: false }, "t")
                .unwrap()
                .coalesced
        );
        c.finish(&id, None);
        let record = c.get(&id).unwrap();
        assert_eq!((record.state, record.coalesced), (RequestState::Done, 1000));
        let next = c
            .submit(Scope::All, Trigger::Rescan { force: false }, "t")
            .unwrap();
        assert!(!next.coalesced);
    }

    #[test]
    fn distinct_pending_requests_are_bounded() {
        let c = Control::new();
        for i in 0..MAX_PENDING {
            c.submit(Scope::Repository(format!("r{i}")), Trigger::Event, "test")
                .unwrap();
        }
        assert!(
            c.submit(Scope::Repository("more".into()), Trigger::Event, "t")
                .is_err()
        );
    }
}
