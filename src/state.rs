//! The state store: what the daemon knows about tags and digests, in sled under
//! `state.dir/db`.
//!
//! Everything sled-specific stays in this module (open, get, atomic batch, prefix scan,
//! flush), so the engine can be swapped. Keys:
//! - `meta/schema` → the schema version ([`SCHEMA_VERSION`]);
//! - `meta/commit` → the number of the last commit (also kept in the file
//!   `state.dir/db/spcs-commit`, to tell a log cut short from a complete one);
//! - `tag/<repository>\0<tag>` → [`TagRecord`];
//! - `img/<digest>` → [`ImageRecord`] (what is scanned, or recorded as unsupported);
//! - `idx/<digest>` → [`IndexRecord`] (an index resolved to its platform child).
//!
//! Invariants:
//! - A batch is applied atomically and flushed before [`Store::commit`] returns: sled
//!   buffers writes for up to 500 ms, and a crash must not lose a committed change.
//! - One process per store (sled's file lock): a second opener gets
//!   [`StateError::Locked`].
//! - A store written by a newer schema is refused, never rewritten.
//! - A store that sled cannot read (garbage over its files, a truncated file) or whose
//!   records do not parse is refused at [`Store::open`] with [`StateError::Damaged`] or
//!   [`StateError::Corrupt`], naming the path: open reads every record once, so a damaged
//!   page is found at start-up, not in the middle of a cycle. A panic inside sled while
//!   opening or reading is caught and reported the same way. `state rebuild`
//!   ([`crate::rebuild`]) moves such a store aside ([`retire`]) and rebuilds a new one.
//!   The one exception is a store with no commit marker whose files sled cannot read:
//!   its set-up never finished (the daemon was killed during its first start, before
//!   anything was committed), or it was written by a version before the marker. It is
//!   moved aside the same way and set up again at once, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::changes::ChangeRecord;
use crate::digest::Digest;
use crate::vulndb::DbState;

/// Version of the record layout. Bump it, and migrate in [`Store::open`], when a change
/// would make old records unreadable.
pub const SCHEMA_VERSION: u32 = 1;

const SCHEMA_KEY: &[u8] = b"meta/schema";
const TAG_PREFIX: &str = "tag/";
const IMAGE_PREFIX: &str = "img/";
const INDEX_PREFIX: &str = "idx/";
const CHANGE_PREFIX: &str = "chg/";
const VULNDB_KEY: &[u8] = b"meta/vulndb";
const CHANGES_FLUSH_KEY: &[u8] = b"meta/changes_flush";
/// The number of the last commit, written in every commit's batch.
const COMMIT_KEY: &[u8] = b"meta/commit";
/// The same number in a file next to sled's (inside `state.dir/db`, so it moves with the
/// store), written once the store is set up and after each commit is flushed. sled, with
/// no snapshot, reads a log cut short (a truncated file, garbage over its tail) as "it
/// ends here" and opens without an error, fewer records in it: a store whose commit
/// number is behind the file's lost committed records, and is refused.
const COMMIT_MARKER: &str = "spcs-commit";

/// Tries, and the wait between them, before a locked store is reported as held by
/// another process (about one second in all).
const LOCK_RETRIES: u32 = 20;
const LOCK_RETRY_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Previous digests kept per tag, newest first.
pub const MAX_TAG_HISTORY: usize = 50;

/// The store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process holds the store.
    #[error(
        "state {path}: locked by another process (is another spcs-image-scanner running on this state.dir?)"
    )]
    Locked { path: PathBuf },
    /// sled failed (I/O, corruption).
    #[error("state {path}: storage error")]
    Storage {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The store was written by a newer version.
    #[error(
        "state {path}: schema version {found} is newer than this build understands ({SCHEMA_VERSION}); upgrade spcs-image-scanner"
    )]
    NewerSchema { path: PathBuf, found: u32 },
    /// A record does not parse.
    #[error("state {path}: record {key} is corrupt")]
    Corrupt {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// sled cannot read the store: its files are damaged (garbage, truncated), or were
    /// written by an incompatible sled; or sled panicked reading them.
    #[error(
        "state {path}: the store is damaged and cannot be read ({detail}); run `spcs-image-scanner state rebuild` to move it aside and rebuild it from output.dir"
    )]
    Damaged { path: PathBuf, detail: String },
    /// The old store cannot be moved aside (`state rebuild`).
    #[error("state {from}: cannot move it aside to {to}")]
    Retire {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state directory cannot be created.
    #[error("state {path}: cannot create directory")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StateError {
    /// True when the store itself cannot be used as it is (held by another process,
    /// newer, damaged, a record corrupt): the operator must act, so commands exit 64
    /// rather than 1.
    pub fn is_unusable_store(&self) -> bool {
        matches!(
            self,
            StateError::Locked { .. }
                | StateError::NewerSchema { .. }
                | StateError::Corrupt { .. }
                | StateError::Damaged { .. }
        )
    }
}

/// Where a digest is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStatus {
    /// Known, not scanned yet.
    Pending,
    /// A scan is running (left so by a crash: back to `Pending` at start-up).
    Scanning,
    /// Scanned; `last_scan` says with what.
    Scanned,
    /// The last scan failed; retried after `next_retry`.
    Failed,
    /// Not a runnable image (signature, attestation, chart ...); never scanned.
    Unsupported,
}

impl ImageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStatus::Pending => "pending",
            ImageStatus::Scanning => "scanning",
            ImageStatus::Scanned => "scanned",
            ImageStatus::Failed => "failed",
            ImageStatus::Unsupported => "unsupported",
        }
    }
}

/// Whether a scan matched vulnerabilities or only produced an SBOM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScanMode {
    /// syft then grype.
    Full,
    /// syft only (`scanner.grype = ""`): inventory and SBOM, no matching.
    SbomOnly,
}

/// One finished scan of a digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanRecord {
    pub finished_at: DateTime<Utc>,
    pub mode: ScanMode,
    pub syft_version: String,
    pub grype_version: Option<String>,
    /// grype's DB build time (RFC 3339), when known.
    pub db_build: Option<String>,
    pub db_schema: Option<String>,
    /// The grype document, relative to `output.dir`; `None` in SBOM-only mode.
    pub result_file: Option<String>,
    /// The SBOM, relative to `output.dir`.
    pub sbom_file: String,
    pub packages: usize,
    pub matches: usize,
    /// Matches per severity (`Critical`, `High`, ...).
    pub severities: BTreeMap<String, usize>,
    /// Warnings about this result: `stale_db` (matched with a DB past `vulndb.max_age`),
    /// `empty_sbom` (syft found no package: not a clean image, scanned again sooner).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// Flag: matched with a DB older than `vulndb.max_age`.
pub const FLAG_STALE_DB: &str = "stale_db";
/// Flag: the SBOM lists no package.
pub const FLAG_EMPTY_SBOM: &str = "empty_sbom";

impl ScanRecord {
    /// True when `flag` is set.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// A changes file about to be written, and the change records it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesFlush {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub keys: Vec<String>,
}

/// An output file and what it must contain when complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    /// Relative to `output.dir`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// Output files about to be written: recorded (and committed) before the first byte is
/// copied, so that a crash during the copies is recognised at start-up: complete files
/// are adopted, partial ones deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingWrite {
    /// The SBOM, copied first (only if no file has that name yet); `None` for a
    /// re-match, which reuses the SBOM.
    pub sbom: Option<FileCheck>,
    /// The grype document, copied last; `None` in SBOM-only mode.
    pub result: Option<FileCheck>,
    /// The scan record to adopt when the files are complete.
    pub scan: ScanRecord,
    /// For a re-match: what changed against the previous result, queued for
    /// `changes/` when the files are adopted.
    #[serde(default)]
    pub change: Option<ChangeRecord>,
}

/// What the daemon knows about one digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub digest: Digest,
    pub status: ImageStatus,
    pub media_type: String,
    /// The platform it was resolved for, when it came from an index.
    pub platform: Option<String>,
    /// `repository:tag` currently pointing at it (directly or through an index).
    pub tags: BTreeSet<String>,
    /// Every repository it was seen in (a by-digest pull works from any of them).
    pub repositories: BTreeSet<String>,
    /// Indexes that resolve to it.
    pub index_digests: BTreeSet<Digest>,
    pub unsupported_reason: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_retry: Option<DateTime<Utc>>,
    pub first_seen: DateTime<Utc>,
    pub last_scan: Option<ScanRecord>,
    pub pending_write: Option<PendingWrite>,
}

impl ImageRecord {
    /// A new record for a digest seen for the first time.
    pub fn new(digest: Digest, media_type: String, now: DateTime<Utc>) -> Self {
        ImageRecord {
            digest,
            status: ImageStatus::Pending,
            media_type,
            platform: None,
            tags: BTreeSet::new(),
            repositories: BTreeSet::new(),
            index_digests: BTreeSet::new(),
            unsupported_reason: None,
            attempts: 0,
            last_error: None,
            next_retry: None,
            first_seen: now,
            last_scan: None,
            pending_write: None,
        }
    }

    /// True when this digest should get a full scan now: never scanned, failed and due,
    /// or scanned with an empty SBOM and due again; and still referenced by a tag.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        is_due(
            !self.tags.is_empty(),
            self.status,
            self.next_retry,
            self.last_scan
                .as_ref()
                .is_some_and(|s| s.has_flag(FLAG_EMPTY_SBOM)),
            now,
        )
    }
}

/// A previous target of a tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousDigest {
    pub digest: Digest,
    pub image_digest: Digest,
    /// When the tag moved away from it.
    pub until: DateTime<Utc>,
}

/// [`ImageRecord::is_due`] and [`ImagePlanView::is_due`].
fn is_due(
    tagged: bool,
    status: ImageStatus,
    next_retry: Option<DateTime<Utc>>,
    empty_sbom: bool,
    now: DateTime<Utc>,
) -> bool {
    if !tagged {
        return false;
    }
    match status {
        ImageStatus::Pending => true,
        ImageStatus::Failed => next_retry.is_none_or(|t| t <= now),
        // An empty SBOM is not a clean image: scanned again once its retry is due.
        ImageStatus::Scanned => empty_sbom && next_retry.is_some_and(|t| t <= now),
        ImageStatus::Scanning | ImageStatus::Unsupported => false,
    }
}

/// The fields of an [`ImageRecord`] that planning a cycle reads, deserialized from the
/// same stored JSON without the rest (tags are counted, not collected). Planning reads
/// every record every cycle; building each whole was the largest per-tag cost of an idle
/// cycle in the profile (`docs/performance.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImagePlanView {
    pub digest: Digest,
    pub status: ImageStatus,
    /// How many `repository:tag` point at it.
    #[serde(deserialize_with = "count_seq")]
    pub tags: usize,
    pub next_retry: Option<DateTime<Utc>>,
    pub last_scan: Option<ScanPlanView>,
}

/// The fields of a [`ScanRecord`] that planning reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ScanPlanView {
    pub finished_at: DateTime<Utc>,
    pub mode: ScanMode,
    pub db_build: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl ImagePlanView {
    /// As [`ImageRecord::is_due`].
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        is_due(
            self.tags > 0,
            self.status,
            self.next_retry,
            self.last_scan
                .as_ref()
                .is_some_and(|s| s.flags.iter().any(|f| f == FLAG_EMPTY_SBOM)),
            now,
        )
    }
}

impl From<&ImageRecord> for ImagePlanView {
    fn from(r: &ImageRecord) -> Self {
        ImagePlanView {
            digest: r.digest.clone(),
            status: r.status,
            tags: r.tags.len(),
            next_retry: r.next_retry,
            last_scan: r.last_scan.as_ref().map(|s| ScanPlanView {
                finished_at: s.finished_at,
                mode: s.mode,
                db_build: s.db_build.clone(),
                flags: s.flags.clone(),
            }),
        }
    }
}

/// The fields of a [`TagRecord`] that planning reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TagPlanView {
    pub image_digest: Digest,
    pub last_seen: DateTime<Utc>,
}

impl From<&TagRecord> for TagPlanView {
    fn from(t: &TagRecord) -> Self {
        TagPlanView {
            image_digest: t.image_digest.clone(),
            last_seen: t.last_seen,
        }
    }
}

/// The length of a JSON array, its items skipped unread.
fn count_seq<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct Count;
    impl<'de> serde::de::Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    d.deserialize_seq(Count)
}

/// What a `repository:tag` points at, and what it pointed at before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagRecord {
    pub repository: String,
    pub tag: String,
    /// What the tag points at (`Docker-Content-Digest`): an image or an index.
    pub digest: Digest,
    /// The image that is scanned for it: `digest` itself, or the platform child of the
    /// index (or the index itself when it has no usable child, recorded `unsupported`).
    pub image_digest: Digest,
    /// Set when resolved from an index.
    pub platform: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub changed_at: DateTime<Utc>,
    /// Newest first, at most [`MAX_TAG_HISTORY`].
    pub previous: Vec<PreviousDigest>,
}

impl TagRecord {
    /// `repository:tag`.
    pub fn reference(&self) -> String {
        tag_ref(&self.repository, &self.tag)
    }
}

/// An index and the child chosen for the configured platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexRecord {
    pub digest: Digest,
    pub media_type: String,
    pub platform: String,
    /// `None` when the index has no image for the platform.
    pub child: Option<Digest>,
    pub first_seen: DateTime<Utc>,
}

/// `repository:tag` (neither part can hold `:`).
pub fn tag_ref(repository: &str, tag: &str) -> String {
    format!("{repository}:{tag}")
}

/// Splits `repository:tag`.
pub fn split_tag_ref(reference: &str) -> Option<(&str, &str)> {
    reference.rsplit_once(':')
}

/// Counts for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    pub tags: usize,
    pub images: BTreeMap<String, usize>,
}

/// The sled store.
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// The last commit's number; held across a commit so numbers follow the order in
    /// which batches are applied.
    commits: tokio::sync::Mutex<u64>,
}

/// Changes applied together by [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    inner: sled::Batch,
    len: usize,
}

impl Batch {
    pub fn put_tag(&mut self, record: &TagRecord) {
        self.put(tag_key(&record.repository, &record.tag), record);
    }

    pub fn remove_tag(&mut self, repository: &str, tag: &str) {
        self.inner.remove(tag_key(repository, tag).into_bytes());
        self.len += 1;
    }

    pub fn put_image(&mut self, record: &ImageRecord) {
        self.put(format!("{IMAGE_PREFIX}{}", record.digest), record);
    }

    pub fn put_index(&mut self, record: &IndexRecord) {
        self.put(format!("{INDEX_PREFIX}{}", record.digest), record);
    }

    /// Queues a change record for the next `changes/` file.
    pub fn put_change(&mut self, record: &ChangeRecord) {
        let hex = record
            .digest
            .split_once(':')
            .map(|(_, h)| h)
            .unwrap_or(&record.digest);
        let key = format!(
            "{CHANGE_PREFIX}{}-{hex}",
            crate::output::timestamp(record.observed_at)
        );
        self.put(key, record);
    }

    /// Number of operations queued.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn put<T: Serialize>(&mut self, key: String, value: &T) {
        // Serializing these plain structs cannot fail.
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.inner.insert(key.into_bytes(), bytes);
        self.len += 1;
    }
}

fn tag_key(repository: &str, tag: &str) -> String {
    format!("{TAG_PREFIX}{repository}\0{tag}")
}

impl Store {
    /// Opens (or creates) the store in `dir/db`, checks its schema version and reads
    /// every record once (see the module docs).
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("db");
        // A store is set up by writing its schema version, flushing it, then the commit
        // marker: a store with a marker and no schema version lost its records (sled, with
        // no snapshot, reads garbage as "the log ends here" and opens empty). Without a
        // marker the set-up never finished (a kill during the first start): set up again.
        let existed = std::fs::symlink_metadata(path.join(COMMIT_MARKER)).is_ok();
        let db = match open_sled(&path) {
            Ok(db) => db,
            // A kill during the first start can also leave sled's own files half-written
            // (its `conf` is not written atomically), so that sled cannot open them.
            // Without a marker nothing was committed there (unless the store was written
            // by a version before the marker, which the warning covers): keep the files
            // aside (never deleted) and set up again.
            Err(StateError::Damaged { detail, .. }) if !existed => {
                let moved_to = match retire(dir, Utc::now())? {
                    Retired::Moved { to, .. } => Some(to.display().to_string()),
                    Retired::Absent => None,
                };
                tracing::warn!(
                    path = %path.display(),
                    moved_to,
                    detail,
                    hint = "a store written by a version before the commit marker had records: `spcs-image-scanner state rebuild` recovers them from output.dir instead of scanning again",
                    "the store was never completely set up (no commit marker) and sled cannot read its files; moved them aside and setting up a new store"
                );
                open_sled(&path)?
            }
            Err(e) => return Err(e),
        };
        let mut store = Store {
            db,
            path,
            commits: tokio::sync::Mutex::new(0),
        };
        match store.raw_get(SCHEMA_KEY)? {
            None if existed => {
                return Err(StateError::Damaged {
                    path: store.path.clone(),
                    detail: "its files hold no readable record, not even the schema version, though the store was set up before".into(),
                });
            }
            None => {
                store.raw_insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
                store.flush_blocking()?;
            }
            Some(bytes) => {
                let found: u32 = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| StateError::Damaged {
                        path: store.path.clone(),
                        detail: format!(
                            "the schema version {:?} is not a number",
                            String::from_utf8_lossy(&bytes.as_ref()[..bytes.len().min(40)])
                        ),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StateError::NewerSchema {
                        path: store.path.clone(),
                        found,
                    });
                }
                // Older versions: migrations go here when SCHEMA_VERSION is bumped.
            }
        }
        // After the schema check: records of a newer schema need not parse.
        store.verify()?;
        let last = store.check_commits()?;
        *store.commits.get_mut() = last;
        Ok(store)
    }

    /// The store's last commit number, refused when it is behind the marker file (see
    /// [`COMMIT_MARKER`]).
    fn check_commits(&self) -> Result<u64, StateError> {
        let damaged = |detail: String| StateError::Damaged {
            path: self.path.clone(),
            detail,
        };
        let stored = match self.raw_get(COMMIT_KEY)? {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| damaged("its commit number is not a number".into()))?,
        };
        let marker = self.path.join(COMMIT_MARKER);
        match std::fs::read(&marker) {
            Ok(bytes) => {
                let done = std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        damaged(format!("{} is not a commit number", marker.display()))
                    })?;
                if done > stored {
                    return Err(damaged(format!(
                        "it ends at commit {stored}, but commit {done} was completed: committed records are missing (a truncated or overwritten log)"
                    )));
                }
            }
            // Just set up, or from a version before the marker: tracking starts now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.write_marker(stored),
            Err(e) => return Err(damaged(format!("{}: {e}", marker.display()))),
        }
        Ok(stored)
    }

    /// Reads every record and parses the known kinds: sled checks each page's CRC when
    /// it reads it, so a damaged page is found here rather than by a later cycle.
    fn verify(&self) -> Result<(), StateError> {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for item in self.db.iter() {
                let (key, value) = item.map_err(|source| self.damaged_or_storage(source))?;
                let text = String::from_utf8_lossy(&key);
                let parsed = if text.starts_with(TAG_PREFIX) {
                    serde_json::from_slice::<TagRecord>(&value).map(drop)
                } else if text.starts_with(IMAGE_PREFIX) {
                    serde_json::from_slice::<ImageRecord>(&value).map(drop)
                } else if text.starts_with(INDEX_PREFIX) {
                    serde_json::from_slice::<IndexRecord>(&value).map(drop)
                } else if text.starts_with(CHANGE_PREFIX) {
                    serde_json::from_slice::<ChangeRecord>(&value).map(drop)
                } else if *key == *VULNDB_KEY {
                    serde_json::from_slice::<DbState>(&value).map(drop)
                } else if *key == *CHANGES_FLUSH_KEY {
                    serde_json::from_slice::<ChangesFlush>(&value).map(drop)
                } else {
                    Ok(())
                };
                parsed.map_err(|source| StateError::Corrupt {
                    path: self.path.clone(),
                    key: text.escape_debug().to_string(),
                    source,
                })?;
            }
            Ok(())
        }));
        caught.unwrap_or_else(|panic| {
            Err(StateError::Damaged {
                path: self.path.clone(),
                detail: format!("sled panicked reading it: {}", panic_text(&panic)),
            })
        })
    }

    /// The schema version stored.
    pub fn schema_version(&self) -> Result<u32, StateError> {
        Ok(self
            .raw_get(SCHEMA_KEY)?
            .and_then(|b| {
                std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .unwrap_or(0))
    }

    pub fn get_tag(&self, repository: &str, tag: &str) -> Result<Option<TagRecord>, StateError> {
        self.get_json(&tag_key(repository, tag))
    }

    /// Tags of one repository.
    pub fn tags_in(&self, repository: &str) -> Result<Vec<TagRecord>, StateError> {
        self.scan_json(&format!("{TAG_PREFIX}{repository}\0"))
    }

    /// Every tag.
    pub fn all_tags(&self) -> Result<Vec<TagRecord>, StateError> {
        self.scan_json(TAG_PREFIX)
    }

    /// Repositories that have at least one tag recorded.
    pub fn tagged_repositories(&self) -> Result<BTreeSet<String>, StateError> {
        let mut out = BTreeSet::new();
        for item in self.db.scan_prefix(TAG_PREFIX.as_bytes()).keys() {
            let key = item.map_err(|source| self.storage(source))?;
            let text = String::from_utf8_lossy(&key[TAG_PREFIX.len()..]).to_string();
            if let Some((repo, _)) = text.split_once('\0') {
                out.insert(repo.to_string());
            }
        }
        Ok(out)
    }

    pub fn get_image(&self, digest: &Digest) -> Result<Option<ImageRecord>, StateError> {
        self.get_json(&format!("{IMAGE_PREFIX}{digest}"))
    }

    pub fn all_images(&self) -> Result<Vec<ImageRecord>, StateError> {
        self.scan_json(IMAGE_PREFIX)
    }

    /// Whole records of the images a crash may have left mid-scan (`scanning`, or a
    /// pending write); the others are read only as far as their status.
    pub fn images_to_recover(&self) -> Result<Vec<ImageRecord>, StateError> {
        #[derive(Deserialize)]
        struct View {
            status: ImageStatus,
            pending_write: Option<serde::de::IgnoredAny>,
        }
        let mut out = Vec::new();
        for item in self.db.scan_prefix(IMAGE_PREFIX.as_bytes()) {
            let (key, value) = item.map_err(|source| self.storage(source))?;
            let corrupt = |source| StateError::Corrupt {
                path: self.path.clone(),
                key: String::from_utf8_lossy(&key).escape_debug().to_string(),
                source,
            };
            let view: View = serde_json::from_slice(&value).map_err(corrupt)?;
            if view.status == ImageStatus::Scanning || view.pending_write.is_some() {
                out.push(serde_json::from_slice(&value).map_err(corrupt)?);
            }
        }
        Ok(out)
    }

    /// Every image, as much of it as planning a cycle reads.
    pub fn image_plan_views(&self) -> Result<Vec<ImagePlanView>, StateError> {
        self.scan_json(IMAGE_PREFIX)
    }

    /// Every tag, as much of it as planning a cycle reads.
    pub fn tag_plan_views(&self) -> Result<Vec<TagPlanView>, StateError> {
        self.scan_json(TAG_PREFIX)
    }

    pub fn get_index(&self, digest: &Digest) -> Result<Option<IndexRecord>, StateError> {
        self.get_json(&format!("{INDEX_PREFIX}{digest}"))
    }

    /// Tag and image counts per status.
    pub fn counts(&self) -> Result<StatusCounts, StateError> {
        let mut counts = StatusCounts {
            tags: self.db.scan_prefix(TAG_PREFIX.as_bytes()).count(),
            ..StatusCounts::default()
        };
        for image in self.all_images()? {
            *counts
                .images
                .entry(image.status.as_str().to_string())
                .or_default() += 1;
        }
        Ok(counts)
    }

    /// What is known about the vulnerability DB.
    pub fn vulndb_state(&self) -> Result<DbState, StateError> {
        Ok(self
            .get_json(std::str::from_utf8(VULNDB_KEY).unwrap_or_default())?
            .unwrap_or_default())
    }

    /// Records what is known about the vulnerability DB.
    pub async fn put_vulndb_state(&self, state: &DbState) -> Result<(), StateError> {
        let mut batch = Batch::default();
        batch.put(String::from_utf8_lossy(VULNDB_KEY).to_string(), state);
        self.commit(batch).await
    }

    /// Change records not yet written to a file, oldest first, with their keys.
    pub fn pending_changes(&self) -> Result<Vec<(String, ChangeRecord)>, StateError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(CHANGE_PREFIX.as_bytes()) {
            let (key, value) = item.map_err(|source| self.storage(source))?;
            let key = String::from_utf8_lossy(&key).to_string();
            let record = serde_json::from_slice(&value).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                key: key.escape_debug().to_string(),
                source,
            })?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// An interrupted changes-file write.
    pub fn changes_flush_intent(&self) -> Result<Option<ChangesFlush>, StateError> {
        self.get_json(std::str::from_utf8(CHANGES_FLUSH_KEY).unwrap_or_default())
    }

    /// Records that `name` is about to be written with the records under `keys`.
    pub async fn begin_changes_flush(
        &self,
        name: &str,
        size: u64,
        sha256: &str,
        keys: &[String],
    ) -> Result<(), StateError> {
        let mut batch = Batch::default();
        let intent = ChangesFlush {
            name: name.to_string(),
            size,
            sha256: sha256.to_string(),
            keys: keys.to_vec(),
        };
        batch.put(
            String::from_utf8_lossy(CHANGES_FLUSH_KEY).to_string(),
            &intent,
        );
        self.commit(batch).await
    }

    /// The changes file is complete: drops its records and the intent.
    pub async fn finish_changes_flush(&self, keys: &[String]) -> Result<(), StateError> {
        let mut batch = Batch::default();
        for key in keys {
            batch.inner.remove(key.as_bytes());
        }
        batch.inner.remove(CHANGES_FLUSH_KEY);
        batch.len += keys.len() + 1;
        self.commit(batch).await
    }

    /// The changes file was not written: keeps the records, drops the intent.
    pub async fn abandon_changes_flush(&self) -> Result<(), StateError> {
        let mut batch = Batch::default();
        batch.inner.remove(CHANGES_FLUSH_KEY);
        batch.len += 1;
        self.commit(batch).await
    }

    /// Applies `batch` atomically, with the next commit number, flushes it to disk, then
    /// records the number in the marker file.
    pub async fn commit(&self, mut batch: Batch) -> Result<(), StateError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut last = self.commits.lock().await;
        let next = *last + 1;
        batch
            .inner
            .insert(COMMIT_KEY, next.to_string().into_bytes());
        self.db
            .apply_batch(batch.inner)
            .map_err(|source| self.storage(source))?;
        self.db
            .flush_async()
            .await
            .map_err(|source| self.storage(source))?;
        *last = next;
        // After the flush, so the marker is never ahead of what is on disk.
        self.write_marker(next);
        Ok(())
    }

    /// Records `commit` as completed (temp file and rename: never a torn number). Best
    /// effort: the commit is durable either way, and a stale marker only weakens the
    /// check in [`Store::open`].
    fn write_marker(&self, commit: u64) {
        let marker = self.path.join(COMMIT_MARKER);
        let tmp = self.path.join(format!("{COMMIT_MARKER}.tmp"));
        if std::fs::write(&tmp, commit.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &marker);
        }
    }

    /// Flushes everything written so far.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.db
            .flush_async()
            .await
            .map_err(|source| self.storage(source))?;
        Ok(())
    }

    fn flush_blocking(&self) -> Result<(), StateError> {
        self.db.flush().map_err(|source| self.storage(source))?;
        Ok(())
    }

    fn storage(&self, source: sled::Error) -> StateError {
        StateError::Storage {
            path: self.path.clone(),
            source,
        }
    }

    fn damaged_or_storage(&self, source: sled::Error) -> StateError {
        classify(&self.path, source)
    }

    fn raw_get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StateError> {
        self.db.get(key).map_err(|source| self.storage(source))
    }

    fn raw_insert(&self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.db
            .insert(key, value)
            .map_err(|source| self.storage(source))?;
        Ok(())
    }

    fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        match self.raw_get(key.as_bytes())? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StateError::Corrupt {
                        path: self.path.clone(),
                        key: key.escape_debug().to_string(),
                        source,
                    })
            }
        }
    }

    fn scan_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StateError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (key, value) = item.map_err(|source| self.storage(source))?;
            let record = serde_json::from_slice(&value).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                key: String::from_utf8_lossy(&key).escape_debug().to_string(),
                source,
            })?;
            out.push(record);
        }
        Ok(out)
    }
}

/// Opens sled at `path`, telling a lock held by another process, damaged files and a
/// panic inside sled apart from other I/O errors.
fn open_sled(path: &Path) -> Result<sled::Db, StateError> {
    let mut tries = 0;
    loop {
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(path).open());
        match opened {
            Ok(Ok(db)) => return Ok(db),
            // sled releases its file lock from a background thread shortly after the
            // last handle is dropped: a store closed a moment ago may still look
            // locked. Wait a little before calling it held by another process.
            Ok(Err(e)) if is_lock_error(&e) => {
                tries += 1;
                if tries >= LOCK_RETRIES {
                    return Err(StateError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(LOCK_RETRY_WAIT);
            }
            Ok(Err(e)) => return Err(classify(path, e)),
            Err(panic) => {
                return Err(StateError::Damaged {
                    path: path.to_path_buf(),
                    detail: format!("sled panicked opening it: {}", panic_text(&panic)),
                });
            }
        }
    }
}

fn is_lock_error(e: &sled::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// sled's verdict on its files: corruption, an incompatible format or an internal bug
/// say the files are damaged; an I/O error that means "the bytes are not what was
/// written" (short file, invalid data) too. Other I/O errors (permissions, disk) stay
/// storage errors.
fn classify(path: &Path, source: sled::Error) -> StateError {
    let damaged = match &source {
        sled::Error::Corruption { .. }
        | sled::Error::Unsupported(_)
        | sled::Error::ReportableBug(_) => true,
        sled::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    };
    if damaged {
        StateError::Damaged {
            path: path.to_path_buf(),
            detail: format!("sled: {source}"),
        }
    } else {
        StateError::Storage {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// What [`retire`] did with an old store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retired {
    /// There was no `state.dir/db`.
    Absent,
    /// Moved to `to`; `damaged` says why it could not be opened, if it could not.
    Moved {
        to: PathBuf,
        damaged: Option<String>,
    },
}

/// Fails with [`StateError::Locked`] when another process holds the store in `dir/db`;
/// a missing or unreadable store is not held by anyone. Nothing is created or moved.
pub fn ensure_not_locked(dir: &Path) -> Result<(), StateError> {
    let path = dir.join("db");
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(());
    }
    match open_sled(&path) {
        Err(e @ StateError::Locked { .. }) => Err(e),
        _ => Ok(()),
    }
}

/// Moves the store `dir/db` aside to `dir/db.corrupt-<UTC timestamp>` (never deletes
/// it), unless another process holds it ([`StateError::Locked`]). A readable store is
/// kept open (and so locked) while it is renamed, so no daemon can start on it in
/// between.
pub fn retire(dir: &Path, now: DateTime<Utc>) -> Result<Retired, StateError> {
    let path = dir.join("db");
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(Retired::Absent);
    }
    let (held, damaged) = match open_sled(&path) {
        Ok(db) => (Some(db), None),
        Err(e @ StateError::Locked { .. }) => return Err(e),
        Err(e) => (None, Some(crate::scanner::error_chain(&e))),
    };
    let stamp = crate::output::timestamp(now);
    let mut to = dir.join(format!("db.corrupt-{stamp}"));
    let mut n = 1;
    while std::fs::symlink_metadata(&to).is_ok() {
        to = dir.join(format!("db.corrupt-{stamp}-{n}"));
        n += 1;
    }
    let renamed = std::fs::rename(&path, &to);
    drop(held);
    renamed.map_err(|source| StateError::Retire {
        from: path.clone(),
        to: to.clone(),
        source,
    })?;
    Ok(Retired::Moved { to, damaged })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[tokio::test]
    async fn committed_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut batch = Batch::default();
            let mut img = ImageRecord::new(digest('a'), "m".into(), now);
            img.tags.insert("demo/x:1".into());
            batch.put_image(&img);
            batch.put_tag(&TagRecord {
                repository: "demo/x".into(),
                tag: "1".into(),
                digest: digest('a'),
                image_digest: digest('a'),
                platform: None,
                first_seen: now,
                last_seen: now,
                changed_at: now,
                previous: vec![],
            });
            store.commit(batch).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.tags_in("demo/x").unwrap().len(), 1);
        assert!(
            store.tags_in("demo").unwrap().is_empty(),
            "prefix scan must not match a longer repository name"
        );
        assert_eq!(
            store.get_image(&digest('a')).unwrap().unwrap().tags.len(),
            1
        );
        assert_eq!(
            store
                .tagged_repositories()
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["demo/x"]
        );
        let counts = store.counts().unwrap();
        assert_eq!(counts.tags, 1);
        assert_eq!(counts.images.get("pending"), Some(&1));
    }

    #[test]
    fn second_opener_gets_locked_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another process"), "{err}");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.raw_insert(SCHEMA_KEY, b"999").unwrap();
            store.flush_blocking().unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(
            matches!(err, StateError::NewerSchema { found: 999, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_store_behind_its_commit_marker_is_refused_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut batch = Batch::default();
            batch.put_image(&ImageRecord::new(digest('c'), "m".into(), Utc::now()));
            store.commit(batch).await.unwrap();
        }
        let marker = dir.path().join("db").join(COMMIT_MARKER);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "1");
        // As if the log had lost its last commits.
        std::fs::write(&marker, "3").unwrap();
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("commit 3"), "{err}");
        assert!(err.is_unusable_store());
    }

    /// sled's `conf` cut short, as a kill while sled writes it leaves it.
    fn cut_conf(dir: &Path) {
        let conf = dir.join("db").join("conf");
        let text = std::fs::read(&conf).unwrap();
        std::fs::write(&conf, &text[..text.len() / 2]).unwrap();
    }

    #[tokio::test]
    async fn unreadable_files_of_a_store_never_set_up_are_moved_aside_and_set_up_again() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        // A kill during the first start: no marker yet, sled's conf half-written.
        std::fs::remove_file(dir.path().join("db").join(COMMIT_MARKER)).unwrap();
        cut_conf(dir.path());
        let store = Store::open(dir.path()).expect("set up again");
        let mut batch = Batch::default();
        batch.put_image(&ImageRecord::new(digest('d'), "m".into(), Utc::now()));
        store.commit(batch).await.unwrap();
        assert!(store.get_image(&digest('d')).unwrap().is_some());
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("db.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the old files are kept aside: {aside:?}");

        // The same damage to a store that was set up (it has its marker) is refused.
        drop(store);
        cut_conf(dir.path());
        let err = Store::open(dir.path()).err().expect("refused");
        assert!(matches!(err, StateError::Damaged { .. }), "{err}");
        assert!(err.is_unusable_store());
    }

    #[test]
    fn retire_moves_a_store_aside_and_refuses_a_held_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(retire(dir.path(), Utc::now()).unwrap(), Retired::Absent);
        let held = Store::open(dir.path()).unwrap();
        assert!(matches!(
            retire(dir.path(), Utc::now()),
            Err(StateError::Locked { .. })
        ));
        assert!(ensure_not_locked(dir.path()).is_err());
        drop(held);
        let Retired::Moved { to, damaged } = retire(dir.path(), Utc::now()).unwrap() else {
            panic!("moved");
        };
        assert_eq!(damaged, None);
        assert!(to.join("conf").exists() && !dir.path().join("db").exists());
        assert!(
            to.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("db.corrupt-")
        );
    }

    #[test]
    fn due_only_when_referenced_and_not_scanned() {
        let now = Utc::now();
        let mut img = ImageRecord::new(digest('b'), "m".into(), now);
        assert!(!img.is_due(now), "untagged images are not scanned");
        img.tags.insert("r:t".into());
        assert!(img.is_due(now));
        img.status = ImageStatus::Failed;
        img.next_retry = Some(now + chrono::Duration::minutes(5));
        assert!(!img.is_due(now));
        assert!(img.is_due(now + chrono::Duration::minutes(6)));
        img.status = ImageStatus::Scanned;
        assert!(!img.is_due(now + chrono::Duration::days(1)));
    }

    fn scan_record(at: DateTime<Utc>, flags: &[&str]) -> ScanRecord {
        ScanRecord {
            finished_at: at,
            mode: ScanMode::Full,
            syft_version: "1.18.1".into(),
            grype_version: Some("0.97.0".into()),
            db_build: Some("2026-12-01T00:00:00Z".into()),
            db_schema: Some("v6.0.2".into()),
            result_file: Some("results/x.json".into()),
            sbom_file: "sboms/x.json".into(),
            packages: 3,
            matches: 2,
            severities: [("High".to_string(), 2)].into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Records of every shape planning meets: the views read from their stored JSON
    /// agree with the whole records, field by field and in `is_due`.
    fn varied_records(now: DateTime<Utc>) -> Vec<ImageRecord> {
        let mut out = Vec::new();
        let mut pending = ImageRecord::new(digest('a'), "m".into(), now);
        pending.tags.extend(["r:1".to_string(), "r:2".to_string()]);
        out.push(pending.clone());
        let mut untagged = pending.clone();
        untagged.digest = digest('b');
        untagged.tags.clear();
        out.push(untagged);
        let mut failed = pending.clone();
        failed.digest = digest('c');
        failed.status = ImageStatus::Failed;
        failed.next_retry = Some(now + chrono::Duration::minutes(5));
        failed.last_error = Some("boom".into());
        out.push(failed);
        let mut empty = pending.clone();
        empty.digest = digest('d');
        empty.status = ImageStatus::Scanned;
        empty.next_retry = Some(now - chrono::Duration::minutes(1));
        empty.last_scan = Some(scan_record(now, &[FLAG_EMPTY_SBOM]));
        out.push(empty);
        let mut scanning = pending.clone();
        scanning.digest = digest('e');
        scanning.status = ImageStatus::Scanning;
        scanning.last_scan = Some(scan_record(now, &[]));
        scanning.pending_write = Some(PendingWrite {
            sbom: None,
            result: Some(FileCheck {
                path: "results/e.json".into(),
                sha256: "0".repeat(64),
                size: 1,
            }),
            scan: scan_record(now, &[FLAG_STALE_DB]),
            change: None,
        });
        out.push(scanning);
        out
    }

    #[test]
    fn plan_views_read_from_stored_json_agree_with_whole_records() {
        let now = Utc::now();
        for record in varied_records(now) {
            let stored = serde_json::to_vec(&record).unwrap();
            let view: ImagePlanView = serde_json::from_slice(&stored).unwrap();
            assert_eq!(view, ImagePlanView::from(&record), "{}", record.digest);
            for at in [now, now + chrono::Duration::minutes(10)] {
                assert_eq!(view.is_due(at), record.is_due(at), "{}", record.digest);
            }
        }
    }

    #[tokio::test]
    async fn only_images_left_mid_scan_are_read_for_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now();
        let records = varied_records(now);
        let mut batch = Batch::default();
        for r in &records {
            batch.put_image(r);
        }
        store.commit(batch).await.unwrap();
        let recover = store.images_to_recover().unwrap();
        assert_eq!(
            recover.iter().map(|r| r.digest.clone()).collect::<Vec<_>>(),
            vec![digest('e')]
        );
        assert_eq!(recover[0], records[4], "read whole");
        assert_eq!(store.image_plan_views().unwrap().len(), records.len());
    }
}
