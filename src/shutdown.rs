//! Signals: SIGTERM or SIGINT cancels the root [`CancellationToken`] (stop taking work,
//! kill running scanners, put their digests back, flush state); a second signal resolves
//! the future returned by [`listen`], after which `main` exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Starts listening. The returned future completes on a second signal (forced stop).
pub fn listen(root: CancellationToken) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = first,
            "stopping: no new work, running scans are stopped and put back (send it again to force)"
        );
        root.cancel();
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(signal = second, "second signal: exiting now");
    })
}
