//! Logging with `tracing`: readable text on a terminal, JSON lines otherwise (SPCS sends a
//! container's stdout to the account's event table, one JSON object per line).
//!
//! `RUST_LOG`, when set, overrides `log.level`. Nothing secret is ever a field: the
//! registry client and scanner keep credentials in [`crate::registry::auth::Secret`],
//! whose `Debug` is redacted.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(config: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&config.level));
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.with_target(false).init();
    }
}
