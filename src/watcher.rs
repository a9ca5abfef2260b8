//! One pass of "what does the registry show, what does the store know": list, HEAD every
//! tag, diff, resolve new digests, write the inventory record and commit. What to scan
//! is decided afterwards from the store ([`crate::daemon`]).
//!
//! Invariants:
//! - Level-triggered: running a pass twice does no harm; a pass that fails part-way
//!   commits nothing it did not observe.
//! - A tag is "removed" only when its repository was listed successfully and the tag is
//!   absent (or its HEAD says 404). A failed listing or HEAD never removes anything.
//! - A manifest is fetched (GET) only for a digest the store does not know yet; an
//!   unchanged registry costs one HEAD per tag plus the listing pages.
//! - The inventory file is complete before the state that it describes is committed: a
//!   crash between the two repeats the record next cycle, it never loses it.
//! - The pass stops early, and fails, after [`UNREACHABLE_LIMIT`] consecutive
//!   connection failures: a registry that went away is not asked about every tag.
//! - With `registry.listing = "sql"` a full pass lists each image repository with one
//!   `SHOW IMAGES` ([`crate::registry::spcs_sql`]) instead of catalog + tag lists +
//!   HEADs; what it yields is the same (repository, tag → digest) observations, so the
//!   diff and everything after it do not change. An image repository whose SQL listing
//!   fails is listed through the registry API in the same pass; one whose SQL digest
//!   differs from the registry's HEAD is listed through the registry API from then on.
//!   The first SQL listing of an image repository is checked tag by tag, later ones by
//!   `registry.sql_verify_sample` tags per cycle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Listing, Platform};
use crate::digest::Digest;
use crate::output::{Output, OutputError};
use crate::registry::manifest::{ManifestKind, classify};
use crate::registry::spcs_sql::{ImageListing, SqlLister};
use crate::registry::{RegistryClient, RegistryError, TagListing};
use crate::state::{
    Batch, ImageRecord, ImageStatus, IndexRecord, MAX_TAG_HISTORY, PreviousDigest, StateError,
    Store, TagRecord, tag_ref,
};

/// Consecutive unreachable-registry failures after which a pass gives up.
pub const UNREACHABLE_LIMIT: usize = 8;

/// `last_seen` of an unchanged tag is rewritten at most this often, so an idle cycle
/// does not rewrite every tag record.
const LAST_SEEN_RESOLUTION: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// A pass failed as a whole; nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("listing repositories failed")]
    Listing(#[source] RegistryError),
    #[error("registry unreachable: gave up after {UNREACHABLE_LIMIT} consecutive failures")]
    Unreachable(#[source] RegistryError),
    #[error("state store")]
    State(#[from] StateError),
    #[error("writing the inventory record")]
    Output(#[from] OutputError),
    #[error("stopped by shutdown")]
    Cancelled,
    #[error(
        "repository {0:?} is not watched (registry.repositories, image_repositories, include, exclude)"
    )]
    NotWatched(String),
}

/// One tag change, as written to `inventory/<timestamp>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct InventoryRecord {
    pub repository: String,
    pub tag: String,
    /// The image scanned for the tag (the platform manifest for an index).
    pub digest: String,
    /// The index the tag points at, if it points at one.
    pub index_digest: Option<String>,
    pub platform: Option<String>,
    /// `added`, `moved` or `removed`.
    pub change: String,
    /// For `moved`: the image the tag pointed at before.
    pub previous_digest: Option<String>,
    pub observed_at: DateTime<Utc>,
}

/// What a pass saw and did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub repositories: usize,
    pub tags: usize,
    pub added: usize,
    pub moved: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// New digests recorded as unsupported (signatures, charts ...).
    pub unsupported: usize,
    /// Repositories whose tags could not be listed, tags whose HEAD or resolution
    /// failed: left as they were, retried next cycle.
    pub errors: usize,
    /// Listings cut short by `max_tags_per_repository` or the page cap.
    pub truncated: usize,
    pub inventory_file: Option<String>,
    pub duration: Duration,
}

/// Observes the registry and keeps the store in step with it.
pub struct Watcher {
    registry: Arc<RegistryClient>,
    store: Arc<Store>,
    output: Output,
    platform: Platform,
    sql: Option<SqlListing>,
}

/// The SQL listing and what it has learnt about each image repository.
struct SqlListing {
    lister: SqlLister,
    verify_sample: usize,
    /// Full passes done, to rotate the sampled tags.
    passes: AtomicUsize,
    /// Image repositories whose SQL listing has been checked tag by tag.
    verified: std::sync::Mutex<BTreeSet<String>>,
    /// Image repositories whose SQL digests disagreed with the registry: registry API
    /// from then on (until restart).
    distrusted: std::sync::Mutex<BTreeSet<String>>,
}

impl SqlListing {
    fn is_distrusted(&self, image_repository: &str) -> bool {
        self.distrusted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(image_repository)
    }
}

/// How an image repository was observed in a SQL pass.
enum ImageRepoOutcome {
    Sql(Vec<RepoObservation>),
    Fallback,
}

struct RepoObservation {
    repository: String,
    listing: Result<TagListing, RegistryError>,
    heads: Vec<(String, Result<Digest, RegistryError>)>,
}

/// Counts consecutive "registry unreachable" failures across concurrent requests.
#[derive(Default)]
struct Breaker {
    consecutive: AtomicUsize,
    open: AtomicBool,
}

impl Breaker {
    fn record<T>(&self, result: &Result<T, RegistryError>) {
        match result {
            Err(e) if e.is_unreachable() => {
                if self.consecutive.fetch_add(1, Ordering::Relaxed) + 1 >= UNREACHABLE_LIMIT {
                    self.open.store(true, Ordering::Relaxed);
                }
            }
            _ => self.consecutive.store(0, Ordering::Relaxed),
        }
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }
}

/// Working copies of image and index records touched by a pass.
struct Working<'a> {
    store: &'a Store,
    images: HashMap<Digest, ImageRecord>,
    indexes: HashMap<Digest, IndexRecord>,
    dirty_images: BTreeSet<Digest>,
}

impl<'a> Working<'a> {
    fn image(&mut self, digest: &Digest) -> Result<Option<&mut ImageRecord>, StateError> {
        if !self.images.contains_key(digest) {
            match self.store.get_image(digest)? {
                Some(record) => {
                    self.images.insert(digest.clone(), record);
                }
                None => return Ok(None),
            }
        }
        Ok(self.images.get_mut(digest))
    }

    fn index(&mut self, digest: &Digest) -> Result<Option<IndexRecord>, StateError> {
        if let Some(i) = self.indexes.get(digest) {
            return Ok(Some(i.clone()));
        }
        self.store.get_index(digest)
    }

    fn touch(&mut self, digest: &Digest) {
        self.dirty_images.insert(digest.clone());
    }
}

/// Where a tag's digest leads.
struct Resolved {
    image_digest: Digest,
    index_digest: Option<Digest>,
    platform: Option<String>,
}

impl Watcher {
    pub fn new(
        registry: Arc<RegistryClient>,
        store: Arc<Store>,
        output: Output,
        platform: Platform,
    ) -> Self {
        let sql = match SqlLister::new(registry.config()) {
            Ok(Some(lister)) => {
                let verify_sample = match registry.config().listing {
                    Listing::Sql { verify_sample, .. } => verify_sample,
                    Listing::Registry => 0,
                };
                Some(SqlListing {
                    lister,
                    verify_sample,
                    passes: AtomicUsize::new(0),
                    verified: Default::default(),
                    distrusted: Default::default(),
                })
            }
            Ok(None) => None,
            Err(e) => {
                warn!(error = %crate::scanner::error_chain(&e), "cannot set up the SQL listing; using the registry API");
                None
            }
        };
        Watcher {
            registry,
            store,
            output,
            platform,
            sql,
        }
    }

    /// One pass over every configured repository.
    pub async fn pass(&self, cancel: &CancellationToken) -> Result<PassReport, WatchError> {
        let started = Instant::now();
        if let Some(sql) = &self.sql {
            return self.sql_pass(sql, started, cancel).await;
        }
        let repositories = tokio::select! {
            r = self.registry.list_repositories() => r.map_err(WatchError::Listing)?,
            _ = cancel.cancelled() => return Err(WatchError::Cancelled),
        };
        self.pass_over(repositories, true, started, cancel).await
    }

    /// A pass over one repository (a registry event, an operator's rescan): the same
    /// as a full pass for that repository, and nothing else is touched. A repository
    /// the config does not watch is not listed.
    pub async fn pass_repository(
        &self,
        repository: &str,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        if !self.registry.watches(repository) {
            return Err(WatchError::NotWatched(repository.to_string()));
        }
        self.pass_over(vec![repository.to_string()], false, Instant::now(), cancel)
            .await
    }

    async fn pass_over(
        &self,
        repositories: Vec<String>,
        full: bool,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        let breaker = Breaker::default();
        let concurrency = self.registry.config().concurrency;
        let observations: Vec<RepoObservation> = tokio::select! {
            o = futures::stream::iter(repositories.iter().cloned())
                .map(|repo| self.observe(repo, &breaker))
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>() => o,
            _ = cancel.cancelled() => return Err(WatchError::Cancelled),
        };
        self.finish(repositories, observations, &breaker, full, started, cancel)
            .await
    }

    /// Fails the pass if the registry went away, else applies the observations.
    async fn finish(
        &self,
        repositories: Vec<String>,
        observations: Vec<RepoObservation>,
        breaker: &Breaker,
        full: bool,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        if breaker.is_open() {
            let last = observations
                .into_iter()
                .flat_map(|o| {
                    let listing_err = o.listing.err();
                    listing_err
                        .into_iter()
                        .chain(o.heads.into_iter().filter_map(|(_, r)| r.err()))
                })
                .find(RegistryError::is_unreachable);
            return Err(WatchError::Unreachable(last.unwrap_or(
                RegistryError::Invalid {
                    host: self.registry.config().host.clone(),
                    method: "GET",
                    path: String::new(),
                    reason: "unreachable".into(),
                },
            )));
        }
        let mut report = self.apply(repositories, observations, full, cancel).await?;
        report.duration = started.elapsed();
        Ok(report)
    }

    /// A full pass with the SQL listing: one `SHOW IMAGES` per image repository; the
    /// registry API for those where it fails or is not trusted. Observations come out
    /// as the registry path's would, so [`Watcher::apply`] is shared.
    async fn sql_pass(
        &self,
        sql: &SqlListing,
        started: Instant,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        let pass_number = sql.passes.fetch_add(1, Ordering::Relaxed);
        let cfg = self.registry.config();
        let sql_before = sql.lister.requests();
        let outcomes: Vec<(String, ImageRepoOutcome)> = tokio::select! {
            o = futures::stream::iter(cfg.image_repositories.iter().cloned())
                .map(|ir| async move {
                    let outcome = self.observe_sql(sql, &ir, pass_number).await;
                    (ir, outcome)
                })
                .buffer_unordered(cfg.concurrency)
                .collect::<Vec<_>>() => o,
            _ = cancel.cancelled() => return Err(WatchError::Cancelled),
        };
        let mut observations = Vec::new();
        let mut fallback = BTreeSet::new();
        for (image_repository, outcome) in outcomes {
            match outcome {
                ImageRepoOutcome::Sql(obs) => observations.extend(obs),
                ImageRepoOutcome::Fallback => {
                    fallback.insert(image_repository);
                }
            }
        }
        let breaker = Breaker::default();
        if !fallback.is_empty() {
            // The registry client lists every image repository's catalog at once; one
            // catalog page per image repository is cheap next to the tag lists and
            // HEADs, which are done only for the fallback ones.
            let all = tokio::select! {
                r = self.registry.list_repositories() => r.map_err(WatchError::Listing)?,
                _ = cancel.cancelled() => return Err(WatchError::Cancelled),
            };
            let names: Vec<String> = all
                .into_iter()
                .filter(|name| fallback.iter().any(|ir| is_under(name, ir)))
                .collect();
            let more: Vec<RepoObservation> = tokio::select! {
                o = futures::stream::iter(names)
                    .map(|repo| self.observe(repo, &breaker))
                    .buffer_unordered(cfg.concurrency)
                    .collect::<Vec<_>>() => o,
                _ = cancel.cancelled() => return Err(WatchError::Cancelled),
            };
            observations.extend(more);
        }
        let mut repositories: Vec<String> =
            observations.iter().map(|o| o.repository.clone()).collect();
        repositories.sort();
        repositories.dedup();
        info!(
            image_repositories = cfg.image_repositories.len(),
            sql_requests = sql.lister.requests() - sql_before,
            registry_fallbacks = fallback.len(),
            "SQL listing done"
        );
        self.finish(repositories, observations, &breaker, true, started, cancel)
            .await
    }

    /// One image repository through SHOW IMAGES, checked against registry HEADs: every
    /// tag the first time, then `verify_sample` tags per pass (rotating).
    async fn observe_sql(
        &self,
        sql: &SqlListing,
        image_repository: &str,
        pass_number: usize,
    ) -> ImageRepoOutcome {
        if sql.is_distrusted(image_repository) {
            return ImageRepoOutcome::Fallback;
        }
        let listing = match sql.lister.list_images(image_repository).await {
            Ok(l) => l,
            Err(e) => {
                warn!(image_repository, error = %crate::scanner::error_chain(&e), "SQL listing failed; using the registry API for this image repository");
                return ImageRepoOutcome::Fallback;
            }
        };
        if listing.skipped > 0 {
            warn!(
                image_repository,
                skipped = listing.skipped,
                rows = listing.rows,
                "skipped invalid rows or tags from SHOW IMAGES"
            );
        }
        let observations = self.sql_observations(listing);

        let first = !sql
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(image_repository);
        let candidates: Vec<(String, String, Digest)> = observations
            .iter()
            .flat_map(|o| {
                o.heads.iter().filter_map(|(tag, r)| {
                    r.as_ref()
                        .ok()
                        .map(|d| (o.repository.clone(), tag.clone(), d.clone()))
                })
            })
            .collect();
        let sample: Vec<(String, String, Digest)> = if first {
            candidates
        } else {
            let n = candidates.len();
            let k = sql.verify_sample.min(n);
            (0..k)
                .map(|i| candidates[(pass_number.wrapping_mul(k) + i) % n].clone())
                .collect()
        };
        let concurrency = self.registry.config().concurrency;
        let checks: Vec<_> = futures::stream::iter(sample)
            .map(|(repository, tag, sql_digest)| async move {
                let head = self.registry.head_manifest(&repository, &tag).await;
                (repository, tag, sql_digest, head)
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut mismatch = false;
        let mut unchecked = 0;
        let compared = checks.len();
        for (repository, tag, sql_digest, head) in checks {
            match head {
                Ok(registry_digest) if registry_digest == sql_digest => {}
                Ok(registry_digest) => {
                    warn!(
                        image_repository,
                        repository,
                        tag,
                        sql_digest = %sql_digest,
                        registry_digest = %registry_digest,
                        "SHOW IMAGES digest differs from the registry's manifest digest; using the registry API for this image repository until restart"
                    );
                    mismatch = true;
                }
                // Gone since the listing: nothing to compare.
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    debug!(repository, tag, error = %crate::scanner::error_chain(&e), "cannot check the SQL digest against the registry");
                    unchecked += 1;
                }
            }
        }
        if mismatch {
            sql.distrusted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(image_repository.to_string());
            return ImageRepoOutcome::Fallback;
        }
        // A first check cut short by registry errors is done again next pass.
        if first && unchecked == 0 {
            sql.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(image_repository.to_string());
        }
        debug!(
            image_repository,
            compared, unchecked, first, "SQL digests checked against registry HEADs"
        );
        ImageRepoOutcome::Sql(observations)
    }

    /// A SHOW IMAGES listing as the registry path's observations: watched repositories
    /// only, tag filters and `max_tags_per_repository` applied, a tag listed with two
    /// digests left unresolved (kept as known, retried next cycle).
    fn sql_observations(&self, listing: ImageListing) -> Vec<RepoObservation> {
        let cfg = self.registry.config();
        let ImageListing {
            images, conflicts, ..
        } = listing;
        let mut out = Vec::new();
        for (repository, tags) in images {
            if !self.registry.watches(&repository) {
                continue;
            }
            let conflicted = conflicts.get(&repository);
            let mut kept = TagListing::default();
            let mut heads = Vec::new();
            for (tag, digest) in tags {
                if !cfg.tags_include.matches(&tag) || cfg.tags_exclude.matches(&tag) {
                    continue;
                }
                if kept.tags.len() == cfg.max_tags_per_repository {
                    kept.truncated = true;
                    break;
                }
                let head = if conflicted.is_some_and(|c| c.contains(&tag)) {
                    Err(RegistryError::Invalid {
                        host: cfg.host.clone(),
                        method: "SQL",
                        path: format!("/v2/{repository}/manifests/{tag}"),
                        reason: "SHOW IMAGES lists the tag with two digests".into(),
                    })
                } else {
                    Ok(digest)
                };
                kept.tags.push(tag.clone());
                heads.push((tag, head));
            }
            out.push(RepoObservation {
                repository,
                listing: Ok(kept),
                heads,
            });
        }
        out
    }

    /// Lists one repository's tags and HEADs each (bounded by the registry client).
    async fn observe(&self, repository: String, breaker: &Breaker) -> RepoObservation {
        if breaker.is_open() {
            return RepoObservation {
                listing: Err(self.skipped(&repository)),
                repository,
                heads: Vec::new(),
            };
        }
        let listing = match self.registry.list_tags(&repository).await {
            // A repository that no longer exists has no tags.
            Err(e) if e.is_not_found() => Ok(TagListing::default()),
            other => other,
        };
        breaker.record(&listing);
        let heads = match &listing {
            Ok(l) => {
                let concurrency = self.registry.config().concurrency;
                futures::stream::iter(l.tags.iter().cloned())
                    .map(|tag| {
                        let repository = repository.clone();
                        async move {
                            if breaker.is_open() {
                                return (tag, Err(self.skipped(&repository)));
                            }
                            let result = self.registry.head_manifest(&repository, &tag).await;
                            breaker.record(&result);
                            (tag, result)
                        }
                    })
                    .buffer_unordered(concurrency)
                    .collect()
                    .await
            }
            Err(_) => Vec::new(),
        };
        RepoObservation {
            repository,
            listing,
            heads,
        }
    }

    fn skipped(&self, repository: &str) -> RegistryError {
        RegistryError::Invalid {
            host: self.registry.config().host.clone(),
            method: "HEAD",
            path: format!("/v2/{repository}/"),
            reason: "skipped: registry unreachable".into(),
        }
    }

    /// Diffs the observations against the store, resolves new digests, writes the
    /// inventory record and commits.
    async fn apply(
        &self,
        repositories: Vec<String>,
        mut observations: Vec<RepoObservation>,
        full: bool,
        cancel: &CancellationToken,
    ) -> Result<PassReport, WatchError> {
        observations.sort_by(|a, b| a.repository.cmp(&b.repository));
        let now = Utc::now();
        let mut report = PassReport {
            repositories: repositories.len(),
            ..PassReport::default()
        };
        let mut batch = Batch::default();
        let mut work = Working {
            store: &self.store,
            images: HashMap::new(),
            indexes: HashMap::new(),
            dirty_images: BTreeSet::new(),
        };
        let mut changes: Vec<InventoryRecord> = Vec::new();

        for obs in observations {
            if cancel.is_cancelled() {
                return Err(WatchError::Cancelled);
            }
            let repository = obs.repository;
            let listing = match obs.listing {
                Ok(l) => l,
                Err(e) => {
                    warn!(repository, error = %crate::scanner::error_chain(&e), "cannot list tags; keeping what is known");
                    report.errors += 1;
                    continue;
                }
            };
            if listing.truncated {
                report.truncated += 1;
                warn!(
                    repository,
                    kept = listing.tags.len(),
                    "tag listing cut short (registry.max_tags_per_repository)"
                );
            }
            let mut known: BTreeMap<String, TagRecord> = self
                .store
                .tags_in(&repository)?
                .into_iter()
                .map(|t| (t.tag.clone(), t))
                .collect();
            let mut heads = obs.heads;
            heads.sort_by(|a, b| a.0.cmp(&b.0));
            for (tag, head) in heads {
                let digest = match head {
                    Ok(d) => d,
                    // Gone between listing and HEAD: handled as absent below.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        warn!(repository, tag, error = %crate::scanner::error_chain(&e), "cannot resolve tag; keeping what is known");
                        report.errors += 1;
                        known.remove(&tag);
                        continue;
                    }
                };
                report.tags += 1;
                let previous = known.remove(&tag);
                if let Some(prev) = &previous {
                    if prev.digest == digest {
                        report.unchanged += 1;
                        if now - prev.last_seen >= LAST_SEEN_RESOLUTION {
                            let mut updated = prev.clone();
                            updated.last_seen = now;
                            batch.put_tag(&updated);
                        }
                        continue;
                    }
                }
                let resolved = match self
                    .resolve(&repository, &digest, &mut work, now, &mut report)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(repository, tag, digest = %digest, error = %crate::scanner::error_chain(&e), "cannot read manifest; retrying next cycle");
                        report.errors += 1;
                        continue;
                    }
                };
                let reference = tag_ref(&repository, &tag);
                if let Some(image) = work.image(&resolved.image_digest)? {
                    image.tags.insert(reference.clone());
                    image.repositories.insert(repository.clone());
                }
                work.touch(&resolved.image_digest);
                let record = match previous {
                    None => {
                        report.added += 1;
                        changes.push(inventory(&repository, &tag, &resolved, "added", None, now));
                        TagRecord {
                            repository: repository.clone(),
                            tag: tag.clone(),
                            digest: digest.clone(),
                            image_digest: resolved.image_digest.clone(),
                            platform: resolved.platform.clone(),
                            first_seen: now,
                            last_seen: now,
                            changed_at: now,
                            previous: Vec::new(),
                        }
                    }
                    Some(prev) => {
                        report.moved += 1;
                        if prev.image_digest != resolved.image_digest {
                            if let Some(old) = work.image(&prev.image_digest)? {
                                old.tags.remove(&reference);
                            }
                            work.touch(&prev.image_digest);
                        }
                        changes.push(inventory(
                            &repository,
                            &tag,
                            &resolved,
                            "moved",
                            Some(prev.image_digest.to_string()),
                            now,
                        ));
                        let mut history = prev.previous.clone();
                        history.insert(
                            0,
                            PreviousDigest {
                                digest: prev.digest.clone(),
                                image_digest: prev.image_digest.clone(),
                                until: now,
                            },
                        );
                        history.truncate(MAX_TAG_HISTORY);
                        TagRecord {
                            digest: digest.clone(),
                            image_digest: resolved.image_digest.clone(),
                            platform: resolved.platform.clone(),
                            last_seen: now,
                            changed_at: now,
                            previous: history,
                            ..prev
                        }
                    }
                };
                batch.put_tag(&record);
            }
            // Whatever is left in `known` was listed before and is gone now.
            for (_, gone) in known {
                self.remove_tag(&gone, &mut work, &mut batch, &mut changes, now)?;
                report.removed += 1;
            }
        }

        // Repositories that disappeared from the listing lose their tags (only a full
        // pass lists them all).
        let listed: BTreeSet<&String> = repositories.iter().collect();
        let known = if full {
            self.store.tagged_repositories()?
        } else {
            BTreeSet::new()
        };
        for repository in known {
            if listed.contains(&repository) {
                continue;
            }
            for gone in self.store.tags_in(&repository)? {
                self.remove_tag(&gone, &mut work, &mut batch, &mut changes, now)?;
                report.removed += 1;
            }
        }

        for digest in &work.dirty_images {
            if let Some(image) = work.images.get(digest) {
                batch.put_image(image);
            }
        }
        for index in work.indexes.values() {
            batch.put_index(index);
        }

        if !changes.is_empty() {
            let bytes = serde_json::to_vec_pretty(&changes).unwrap_or_default();
            let written = self
                .output
                .write_new(&Output::inventory_name(now), &bytes)?;
            debug!(file = %written.name, records = changes.len(), "inventory record written");
            report.inventory_file = Some(written.name);
        }
        self.store.commit(batch).await?;

        Ok(report)
    }

    fn remove_tag(
        &self,
        gone: &TagRecord,
        work: &mut Working<'_>,
        batch: &mut Batch,
        changes: &mut Vec<InventoryRecord>,
        now: DateTime<Utc>,
    ) -> Result<(), StateError> {
        batch.remove_tag(&gone.repository, &gone.tag);
        if let Some(image) = work.image(&gone.image_digest)? {
            image.tags.remove(&gone.reference());
        }
        work.touch(&gone.image_digest);
        let index_digest = (gone.digest != gone.image_digest).then(|| gone.digest.to_string());
        changes.push(InventoryRecord {
            repository: gone.repository.clone(),
            tag: gone.tag.clone(),
            digest: gone.image_digest.to_string(),
            index_digest,
            platform: gone.platform.clone(),
            change: "removed".into(),
            previous_digest: None,
            observed_at: now,
        });
        info!(repository = %gone.repository, tag = %gone.tag, digest = %gone.image_digest, "tag removed");
        Ok(())
    }

    /// Where `digest` (a tag's target) leads; fetches manifests only for digests not
    /// known yet, and records what it learns in `work`.
    async fn resolve(
        &self,
        repository: &str,
        digest: &Digest,
        work: &mut Working<'_>,
        now: DateTime<Utc>,
        report: &mut PassReport,
    ) -> Result<Resolved, WatchError> {
        if let Some(index) = work.index(digest)? {
            let image_digest = index.child.clone().unwrap_or_else(|| digest.clone());
            return Ok(Resolved {
                image_digest,
                index_digest: Some(digest.clone()),
                platform: index.child.as_ref().map(|_| index.platform.clone()),
            });
        }
        if work.image(digest)?.is_some() {
            return Ok(Resolved {
                image_digest: digest.clone(),
                index_digest: None,
                platform: None,
            });
        }
        let bytes = self
            .registry
            .get_manifest(repository, digest)
            .await
            .map_err(WatchError::Listing)?;
        match classify(&bytes, &self.platform) {
            ManifestKind::Image { media_type } => {
                let record = ImageRecord::new(digest.clone(), media_type, now);
                work.images.insert(digest.clone(), record);
                Ok(Resolved {
                    image_digest: digest.clone(),
                    index_digest: None,
                    platform: None,
                })
            }
            ManifestKind::Unsupported { media_type, reason } => {
                info!(repository, digest = %digest, reason, "not a runnable image; recorded as unsupported");
                report.unsupported += 1;
                let mut record = ImageRecord::new(digest.clone(), media_type, now);
                record.status = ImageStatus::Unsupported;
                record.unsupported_reason = Some(reason);
                work.images.insert(digest.clone(), record);
                Ok(Resolved {
                    image_digest: digest.clone(),
                    index_digest: None,
                    platform: None,
                })
            }
            ManifestKind::Index { media_type, child } => {
                let platform = self.platform.to_string();
                let index = IndexRecord {
                    digest: digest.clone(),
                    media_type: media_type.clone(),
                    platform: platform.clone(),
                    child: child.clone(),
                    first_seen: now,
                };
                work.indexes.insert(digest.clone(), index);
                let Some(child) = child else {
                    info!(repository, digest = %digest, platform, "index has no image for the platform; recorded as unsupported");
                    report.unsupported += 1;
                    let mut record = ImageRecord::new(digest.clone(), media_type, now);
                    record.status = ImageStatus::Unsupported;
                    record.unsupported_reason = Some(format!("index has no {platform} image"));
                    work.images.insert(digest.clone(), record);
                    return Ok(Resolved {
                        image_digest: digest.clone(),
                        index_digest: Some(digest.clone()),
                        platform: None,
                    });
                };
                if work.image(&child)?.is_none() {
                    let child_bytes = self
                        .registry
                        .get_manifest(repository, &child)
                        .await
                        .map_err(WatchError::Listing)?;
                    let mut record = match classify(&child_bytes, &self.platform) {
                        ManifestKind::Image { media_type } => {
                            ImageRecord::new(child.clone(), media_type, now)
                        }
                        ManifestKind::Unsupported { media_type, reason } => {
                            report.unsupported += 1;
                            let mut r = ImageRecord::new(child.clone(), media_type, now);
                            r.status = ImageStatus::Unsupported;
                            r.unsupported_reason = Some(reason);
                            r
                        }
                        ManifestKind::Index { media_type, .. } => {
                            report.unsupported += 1;
                            let mut r = ImageRecord::new(child.clone(), media_type, now);
                            r.status = ImageStatus::Unsupported;
                            r.unsupported_reason = Some("nested index".into());
                            r
                        }
                    };
                    record.platform = Some(platform.clone());
                    work.images.insert(child.clone(), record);
                }
                if let Some(record) = work.image(&child)? {
                    record.index_digests.insert(digest.clone());
                    if record.platform.is_none() {
                        record.platform = Some(platform.clone());
                    }
                }
                work.touch(&child);
                Ok(Resolved {
                    image_digest: child,
                    index_digest: Some(digest.clone()),
                    platform: Some(platform),
                })
            }
        }
    }
}

/// True when `repository` is an image of `image_repository` (`db/schema/repo/...`).
fn is_under(repository: &str, image_repository: &str) -> bool {
    repository
        .strip_prefix(image_repository)
        .is_some_and(|rest| rest.starts_with('/'))
}

fn inventory(
    repository: &str,
    tag: &str,
    resolved: &Resolved,
    change: &str,
    previous_digest: Option<String>,
    now: DateTime<Utc>,
) -> InventoryRecord {
    InventoryRecord {
        repository: repository.to_string(),
        tag: tag.to_string(),
        digest: resolved.image_digest.to_string(),
        index_digest: resolved.index_digest.as_ref().map(ToString::to_string),
        platform: resolved.platform.clone(),
        change: change.to_string(),
        previous_digest,
        observed_at: now,
    }
}
