//! The CLI commands that work on the state and the DB directly, not through a running
//! daemon: `report`, `state rebuild`, `db status`, `db update`, `db import`.
//!
//! The store admits one process at a time, so `report`, `state rebuild`, `db update` and
//! `db import` refuse to run next to a daemon on the same `state.dir` (exit 64; an update
//! must not replace the DB under the daemon's scans). A store that is damaged, has a
//! corrupt record or was written by a newer version is refused the same way, with the
//! store's path and what is wrong. `db status` only reads grype's status and works anyway.

use std::path::Path;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::scanner::{error_chain, passthrough_env};
use crate::state::{StateError, Store};
use crate::vulndb::{DbState, Readiness, UpdateOutcome, VulnDb};

/// A command's failure: the message for stderr and whether it is a usage/set-up error
/// (exit 64) or a runtime one (exit 1).
#[derive(Debug)]
pub struct CommandError {
    pub message: String,
    pub setup: bool,
}

impl CommandError {
    fn runtime(e: &dyn std::error::Error) -> Self {
        CommandError {
            message: error_chain(e),
            setup: false,
        }
    }

    fn store(e: StateError) -> Self {
        let setup = e.is_unusable_store();
        let mut message = error_chain(&e);
        if matches!(e, StateError::Locked { .. }) {
            message.push_str("; stop the daemon first (or use its API)");
        }
        CommandError { message, setup }
    }
}

/// `report`: the store as a table or JSON lines.
pub fn report(config: &Config, json: bool) -> Result<String, CommandError> {
    let store = Store::open(&config.state_dir).map_err(CommandError::store)?;
    let images = store.all_images().map_err(CommandError::store)?;
    if json {
        let mut out = String::new();
        for image in &images {
            out.push_str(&serde_json::to_string(image).unwrap_or_default());
            out.push('\n');
        }
        Ok(out)
    } else {
        Ok(crate::report::render_table(&images))
    }
}

/// `state rebuild`: a new store from the output dir and the SBOM cache
/// ([`crate::rebuild`]). Exit 64 when another process holds the store, 1 when nothing
/// could be rebuilt from a non-empty output dir.
pub async fn state_rebuild(config: &Config) -> Result<String, CommandError> {
    match crate::rebuild::rebuild(config, Utc::now()).await {
        Ok(summary) => Ok(summary.render()),
        Err(crate::rebuild::RebuildError::State(e)) => Err(CommandError::store(e)),
        Err(e) => {
            let mut message = error_chain(&e);
            if let crate::rebuild::RebuildError::Nothing { summary, .. } = &e {
                message.push('\n');
                message.push_str(summary.render().trim_end());
            }
            Err(CommandError {
                message,
                setup: e.is_setup_error(),
            })
        }
    }
}

/// What `db status --json` prints.
#[derive(Debug, Serialize)]
struct StatusView {
    cache_dir: String,
    identity: Option<crate::vulndb::DbIdentity>,
    age_seconds: Option<i64>,
    ready: bool,
    readiness: String,
    checked_at: Option<chrono::DateTime<Utc>>,
    updated_at: Option<chrono::DateTime<Utc>>,
    last_error: Option<String>,
    last_error_at: Option<chrono::DateTime<Utc>>,
}

/// `db status`: identity, age, readiness and the last update outcome.
pub async fn db_status(config: &Config, json: bool) -> Result<(String, bool), CommandError> {
    // The recorded update history, when the store is free; the live status either way.
    let recorded = Store::open(&config.state_dir)
        .ok()
        .and_then(|s| s.vulndb_state().ok());
    let vulndb = VulnDb::new(
        config,
        passthrough_env(std::env::vars()),
        recorded.unwrap_or_default(),
    );
    let cancel = CancellationToken::new();
    let identity = vulndb
        .refresh_status(&cancel)
        .await
        .map_err(|e| CommandError::runtime(&e))?;
    let now = Utc::now();
    let readiness = vulndb.readiness(now).await;
    let state = vulndb.state().await;
    let ready = readiness.can_match();
    let view = StatusView {
        cache_dir: vulndb.cache_dir().display().to_string(),
        age_seconds: identity.age(now).map(|a| a.num_seconds()),
        identity: Some(identity.clone()),
        ready,
        readiness: describe(&readiness),
        checked_at: state.checked_at,
        updated_at: state.updated_at,
        last_error: state.last_error.clone(),
        last_error_at: state.last_error_at,
    };
    if json {
        return Ok((
            serde_json::to_string_pretty(&view).unwrap_or_default() + "\n",
            ready,
        ));
    }
    let mut out = String::new();
    out.push_str(&format!("DB directory:   {}\n", view.cache_dir));
    out.push_str(&format!(
        "built:          {}{}\n",
        identity.built.as_deref().unwrap_or("-"),
        view.age_seconds
            .map(|s| format!(
                " ({} ago)",
                humantime::format_duration(std::time::Duration::from_secs(
                    s.max(0) as u64 / 60 * 60
                ))
            ))
            .unwrap_or_default()
    ));
    out.push_str(&format!(
        "schema:         {}\n",
        identity.schema_version.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!(
        "from:           {}\n",
        identity.from.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!(
        "valid:          {}{}\n",
        identity.valid,
        identity
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    ));
    out.push_str(&format!("scans:          {}\n", view.readiness));
    out.push_str(&format!("last check:     {}\n", fmt_time(state.checked_at)));
    out.push_str(&format!("last update:    {}\n", fmt_time(state.updated_at)));
    if let Some(e) = &state.last_error {
        out.push_str(&format!(
            "last failure:   {} at {}\n",
            e,
            fmt_time(state.last_error_at)
        ));
    }
    Ok((out, ready))
}

fn fmt_time(t: Option<chrono::DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
}

fn describe(readiness: &Readiness) -> String {
    match readiness {
        Readiness::SbomOnly => "SBOM-only mode (scanner.grype is empty): no DB needed".into(),
        Readiness::Ready { stale: false, .. } => "ready".into(),
        Readiness::Ready { stale: true, .. } => {
            "ready, but past vulndb.max_age: results are flagged stale_db".into()
        }
        Readiness::NoDb(m) | Readiness::Held(m) => m.clone(),
    }
}

/// `db update`: check and apply an update, record the outcome.
pub async fn db_update(config: &Config) -> Result<String, CommandError> {
    let (store, vulndb) = owned(config)?;
    let cancel = CancellationToken::new();
    let _ = vulndb.refresh_status(&cancel).await;
    let outcome = vulndb.update(&cancel).await;
    save(&store, &vulndb.state().await).await?;
    match outcome {
        UpdateOutcome::Updated { from, to } => Ok(format!(
            "vulnerability DB updated: {} -> {}\n",
            from.as_deref().unwrap_or("none"),
            to.as_deref().unwrap_or("unknown")
        )),
        UpdateOutcome::UpToDate => Ok("vulnerability DB is up to date\n".into()),
        UpdateOutcome::Failed(e) => Err(CommandError {
            message: format!("update failed, the current DB is kept: {e}"),
            setup: false,
        }),
        UpdateOutcome::NotApplicable => Err(CommandError {
            message: "scanner.grype is empty (SBOM-only mode): there is no DB to update".into(),
            setup: true,
        }),
    }
}

/// `db import FILE`: install a DB archive (air-gapped installs).
pub async fn db_import(config: &Config, file: &Path) -> Result<String, CommandError> {
    let (store, vulndb) = owned(config)?;
    let cancel = CancellationToken::new();
    let identity = vulndb
        .import(file, &cancel)
        .await
        .map_err(|e| CommandError::runtime(&e))?;
    save(&store, &vulndb.state().await).await?;
    Ok(format!(
        "imported {}: DB built {}, schema {}\n",
        file.display(),
        identity.built.as_deref().unwrap_or("unknown"),
        identity.schema_version.as_deref().unwrap_or("unknown")
    ))
}

/// The store (proving no daemon runs on it) and a DB owner seeded from it.
fn owned(config: &Config) -> Result<(Store, VulnDb), CommandError> {
    let store = Store::open(&config.state_dir).map_err(CommandError::store)?;
    let state = store.vulndb_state().map_err(CommandError::store)?;
    let vulndb = VulnDb::new(config, passthrough_env(std::env::vars()), state);
    Ok((store, vulndb))
}

async fn save(store: &Store, state: &DbState) -> Result<(), CommandError> {
    store
        .put_vulndb_state(state)
        .await
        .map_err(CommandError::store)
}
