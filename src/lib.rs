//! `spcs-image-scanner`: a daemon that watches an OCI registry (in Snowpark Container
//! Services, the account's `registry-local`), notices new or changed images by manifest
//! digest, and scans only those with syft (SBOM) and grype (vulnerabilities).
//!
//! How a tag becomes a scan, module by module:
//!
//! | module | job |
//! |---|---|
//! | [`config`] | TOML + `SCANNER__*` environment, validated before anything starts |
//! | [`registry`] | catalog and tag listing, manifest HEAD/GET, auth (none, basic, SPCS token file) |
//! | [`registry::manifest`] | index → platform image; signatures, charts, artifacts → `unsupported` |
//! | [`state`] | the sled store: tags, digests, statuses, history |
//! | [`watcher`] | one pass: list, HEAD, diff against the store, inventory record, due digests |
//! | [`queue`] | lanes: manual, new images, re-matches; one entry per digest |
//! | [`worker`] | one job: scan or re-match, write result files, commit state (crash-safe order) |
//! | [`vulndb`] | grype's DB: status, update, import, staleness, the update/scan lock |
//! | [`changes`] | findings added, removed, changed between two results of a digest |
//! | [`scanner`] | syft and grype as child processes (explicit env, timeout, process group) |
//! | [`output`] | write-once result files under `output.dir` (a stage mount in SPCS) |
//! | [`daemon`] | start-up recovery, cycles on a cron schedule, graceful stop |
//! | [`shutdown`] | signals → one cancellation token; a second signal forces |
//! | [`control`] | rescan requests (HTTP, SQL, signals, registry events), coalesced; running figures |
//! | [`api`] | the HTTP API and status page (axum) |
//! | [`client`] | `status` and `rescan` from the command line, over the API |
//! | [`logging`] | text on a terminal, JSON lines otherwise |
//! | [`report`] | a readable table of what the store knows |
//! | [`commands`] | `report` and `db status/update/import` from the command line |
//! | [`rebuild`] | `state rebuild`: a new store from the output dir and SBOM cache |
//!
//! Data flows one way: schedule tick → watcher pass → due digests → worker → result
//! files → state. State is committed only after the file it refers to is complete.

pub mod api;
pub mod changes;
pub mod client;
pub mod commands;
pub mod config;
pub mod control;
pub mod current;
pub mod daemon;
pub mod digest;
pub mod failures;
pub mod logging;
pub mod output;
pub mod queue;
pub mod rebuild;
pub mod registry;
pub mod report;
pub mod scanner;
pub mod shutdown;
pub mod state;
pub mod vulndb;
pub mod watcher;
pub mod worker;
