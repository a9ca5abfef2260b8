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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Platform;
use crate::digest::Digest;
use crate::output::{Output, OutputError};
use crate::registry::manifest::{ManifestKind, classify};
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
        Watcher {
            registry,
            store,
            output,
            platform,
        }
    }

    /// One pass over every configured repository.
    pub async fn pass(&self, cancel: &CancellationToken) -> Result<PassReport, WatchError> {
        let started = Instant::now();
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
