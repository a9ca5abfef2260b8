//! Signals: SIGTERM or SIGINT cancels the root [`CancellationToken`] (stop taking work,
//! kill running scanners, put their digests back, flush state); a second signal resolves
//! the future returned by [`listen`], after which `main` exits at once.
//!
//! SIGXFSZ (a write past the file-size limit, `RLIMIT_FSIZE`) would kill the daemon by
//! default and leave a cut file behind; [`listen`] catches it, so such a write fails with
//! `EFBIG` like any other write error, and the scan is recorded as failed and retried.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Starts listening. The returned future completes on a second signal (forced stop).
pub fn listen(root: CancellationToken) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Installing a handler replaces the default action (terminate); it stays installed
    // for the life of the process. Children get the default action back on exec.
    let mut xfsz = signal(SignalKind::from_raw(
        nix::sys::signal::Signal::SIGXFSZ as i32,
    ))?;
    tokio::spawn(async move {
        while xfsz.recv().await.is_some() {
            warn!("a write went past the file-size limit (SIGXFSZ); it fails with EFBIG");
        }
    });
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
