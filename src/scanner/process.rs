//! Running a scanner as a child process, handled rather than hoped for.
//!
//! Invariants:
//! - Explicit argv (no shell) and an explicit environment (`env_clear`, then only what
//!   the caller lists). Secret values are passed only as environment variables and
//!   never appear in argv or in any message built here.
//! - The child leads its own process group; on timeout, on shutdown, and after it
//!   exits, the whole group is killed, so grandchildren cannot outlive a scan.
//! - stdout and stderr are drained concurrently and only their last
//!   [`CAPTURE_LIMIT`] bytes are kept, however much the child prints.
//! - The run ends when the child has ended and its group is killed: the pipes are read
//!   for at most [`DRAIN_GRACE`] more. A process that left the group (`setsid`) can hold
//!   them open as long as it lives; waiting for it would hang the scan past every
//!   timeout.
//! - A spawn failure, a timeout or a kill is an error value, never a panic.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::registry::auth::Secret;

/// Bytes of stdout/stderr kept per stream (the tail): enough for an error message,
/// bounded however much a broken scanner prints.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

/// How long stdout/stderr are still read after the child ended and its group was
/// killed. Once the group is gone the pipes close at once, unless a process outside it
/// holds them: then what was read so far is kept and the rest let go.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// An environment value; secret ones are never shown.
#[derive(Debug, Clone)]
pub enum EnvValue {
    Plain(String),
    Secret(Secret),
}

impl EnvValue {
    fn value(&self) -> &str {
        match self {
            EnvValue::Plain(s) => s,
            EnvValue::Secret(s) => s.expose(),
        }
    }
}

/// One child process to run.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, EnvValue)>,
    pub cwd: PathBuf,
}

impl Invocation {
    pub fn new(program: &Path, cwd: &Path) -> Self {
        Invocation {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: cwd.to_path_buf(),
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env
            .push((key.to_string(), EnvValue::Plain(value.into())));
        self
    }

    pub fn secret_env(mut self, key: &str, value: &Secret) -> Self {
        self.env
            .push((key.to_string(), EnvValue::Secret(value.clone())));
        self
    }

    /// The program name for messages.
    pub fn name(&self) -> String {
        self.program.display().to_string()
    }
}

/// The tail of one output stream.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// The last bytes written (at most [`CAPTURE_LIMIT`]).
    pub tail: Vec<u8>,
    /// Everything written, counted.
    pub total: u64,
}

impl Captured {
    /// True when more was written than kept.
    pub fn truncated(&self) -> bool {
        self.total > self.tail.len() as u64
    }
}

/// A child that ran to its end.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Finished {
    /// `Some(signal)` when the child was killed by a signal.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }
}

/// The child could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{program}: cannot start")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: no result within {timeout:?}; its process group was killed")]
    Timeout {
        program: String,
        timeout: Duration,
        stderr: Captured,
    },
    #[error("{program}: stopped by shutdown")]
    Cancelled { program: String },
}

/// Runs `inv` to its end, or kills its process group on `timeout` or `cancel`.
pub async fn run(
    inv: &Invocation,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Finished, ProcessError> {
    let mut cmd = tokio::process::Command::new(&inv.program);
    cmd.args(&inv.args)
        .env_clear()
        .current_dir(&inv.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (key, value) in &inv.env {
        cmd.env(key, value.value());
    }
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: inv.name(),
        source,
    })?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdout_tail = Arc::new(Mutex::new(Captured::default()));
    let stderr_tail = Arc::new(Mutex::new(Captured::default()));
    let mut stdout = tokio::spawn(capture(child.stdout.take(), stdout_tail.clone()));
    let mut stderr = tokio::spawn(capture(child.stderr.take(), stderr_tail.clone()));

    enum End {
        Exited(std::io::Result<ExitStatus>),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        _ = tokio::time::sleep(timeout) => End::TimedOut,
        _ = cancel.cancelled() => End::Cancelled,
    };
    // Kill the whole group in every case: whatever the scanner started must not outlive
    // it, and a killed group closes the pipes the capture tasks read.
    if let Some(pgid) = group {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let (status, stopped) = match end {
        End::Exited(status) => (status, None),
        End::TimedOut => (child.wait().await, Some(End::TimedOut)),
        End::Cancelled => (child.wait().await, Some(End::Cancelled)),
    };
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        let _ = (&mut stdout).await;
        let _ = (&mut stderr).await;
    })
    .await
    .is_ok();
    if !drained {
        stdout.abort();
        stderr.abort();
        warn!(
            program = %inv.name(),
            grace = ?DRAIN_GRACE,
            "scanner output still open after its process group was killed (a process outside the group holds it); stopped reading"
        );
    }
    let stdout = take_captured(&stdout_tail);
    let stderr = take_captured(&stderr_tail);
    match stopped {
        Some(End::TimedOut) => Err(ProcessError::Timeout {
            program: inv.name(),
            timeout,
            stderr,
        }),
        Some(_) => Err(ProcessError::Cancelled {
            program: inv.name(),
        }),
        None => match status {
            Ok(status) => Ok(Finished {
                status,
                stdout,
                stderr,
            }),
            Err(source) => Err(ProcessError::Spawn {
                program: inv.name(),
                source,
            }),
        },
    }
}

/// Reads `stream` to its end into `out`, shared so that what was read survives the
/// task being aborted.
async fn capture<R: AsyncRead + Unpin>(stream: Option<R>, out: Arc<Mutex<Captured>>) {
    let Some(mut stream) = stream else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let Ok(mut out) = out.lock() else {
                    break;
                };
                out.total += n as u64;
                out.tail.extend_from_slice(&buf[..n]);
                if out.tail.len() > CAPTURE_LIMIT {
                    let excess = out.tail.len() - CAPTURE_LIMIT;
                    out.tail.drain(..excess);
                }
            }
        }
    }
}

fn take_captured(shared: &Mutex<Captured>) -> Captured {
    shared
        .lock()
        .map(|mut c| std::mem::take(&mut *c))
        .unwrap_or_default()
}

/// Readable text of a captured stream: ANSI colour codes removed (syft and grype colour
/// their errors even when not on a terminal), whitespace trimmed, at most `max` chars
/// from the end.
pub fn readable_tail(captured: &Captured, max: usize) -> String {
    readable_tail_redacted(captured, max, None)
}

/// [`readable_tail`] with every occurrence of `secret` replaced by `[redacted]` before
/// anything is cut, so no cut can leave part of it behind. A capture that lost its
/// beginning may start with the end of the secret: that fragment goes too.
pub fn readable_tail_redacted(captured: &Captured, max: usize, secret: Option<&str>) -> String {
    let mut text = String::from_utf8_lossy(&captured.tail).into_owned();
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        text = text.replace(secret, REDACTED);
        if captured.truncated() {
            let fragment = secret
                .char_indices()
                .skip(1)
                .map(|(i, _)| &secret[i..])
                .find(|suffix| text.starts_with(suffix));
            if let Some(fragment) = fragment {
                text = format!("{REDACTED}{}", &text[fragment.len()..]);
            }
        }
    }
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        clean.push(c);
    }
    let trimmed = clean.trim();
    let count = trimmed.chars().count();
    if count <= max {
        trimmed.to_string()
    } else {
        let skip = count - max;
        format!("…{}", trimmed.chars().skip(skip).collect::<String>())
    }
}

/// What a secret is replaced with.
const REDACTED: &str = "[redacted]";

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation::new(Path::new("/bin/sh"), Path::new("/"))
            .arg("-c")
            .arg(script)
    }

    #[tokio::test]
    async fn environment_is_exactly_what_was_given() {
        let inv = sh("env")
            .env("ONLY", "this")
            .secret_env("PASS", &Secret::new("s3cret"));
        let done = run(&inv, Duration::from_secs(10), &CancellationToken::new())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&done.stdout.tail).to_string();
        let mut vars: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        vars.sort();
        assert_eq!(vars, vec!["ONLY=this", "PASS=s3cret"]);
        assert!(!format!("{inv:?}").contains("s3cret"));
    }

    /// True while `pid` is a live (not zombie) process.
    fn alive(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let err = run(
            &sh(&script),
            Duration::from_millis(500),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }), "{err}");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        // SIGKILL is delivered asynchronously: wait (bounded) for the grandchild to die.
        let mut tries = 0;
        while alive(&pid) && tries < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tries += 1;
        }
        assert!(!alive(&pid), "grandchild {pid} outlived the timeout");
    }

    #[tokio::test]
    async fn a_process_outside_the_group_holding_the_pipes_does_not_hold_up_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        // The sleeper gets a session of its own (out of reach of killpg) and keeps
        // stdout and stderr open; the shell writes its last words and exits 3.
        let script = format!(
            "setsid sh -c 'echo $$ > {p}; exec sleep 300' & \
             while [ ! -s {p} ]; do sleep 0.05; done; echo last words >&2; exit 3",
            p = pidfile.display()
        );
        let done = tokio::time::timeout(
            DRAIN_GRACE * 6,
            run(
                &sh(&script),
                Duration::from_secs(600),
                &CancellationToken::new(),
            ),
        )
        .await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(&pid.to_string()), "the sleeper outlived the group");
        if pid > 1 {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let done = done
            .expect("run returned while the pipes were still held")
            .unwrap();
        assert_eq!(done.status.code(), Some(3));
        assert_eq!(readable_tail(&done.stderr, 100), "last words");
    }

    #[tokio::test]
    async fn output_is_bounded_to_the_tail() {
        let script = "head -c 3000000 /dev/zero | tr '\\0' 'x'; echo END";
        let done = run(
            &sh(script),
            Duration::from_secs(30),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.stdout.total, 3_000_004);
        assert_eq!(done.stdout.tail.len(), CAPTURE_LIMIT);
        assert!(done.stdout.tail.ends_with(b"END\n"));
        assert!(done.stdout.truncated());
    }

    #[tokio::test]
    async fn missing_program_is_an_error_value() {
        let inv = Invocation::new(Path::new("/nonexistent/syft"), Path::new("/"));
        let err = run(&inv, Duration::from_secs(5), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }));
        assert!(err.to_string().contains("/nonexistent/syft"));
    }

    #[tokio::test]
    async fn cancel_kills_and_reports() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.cancel();
        });
        let err = run(&sh("sleep 30"), Duration::from_secs(60), &cancel)
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Cancelled { .. }));
    }

    #[tokio::test]
    async fn signal_death_is_visible() {
        let done = run(
            &sh("kill -TERM $$"),
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(done.signal(), Some(15));
    }

    #[test]
    fn ansi_codes_are_stripped() {
        let c = Captured {
            tail: b"\x1b[31m[0000] ERROR\x1b[0m could not fetch image\n".to_vec(),
            total: 40,
        };
        assert_eq!(readable_tail(&c, 100), "[0000] ERROR could not fetch image");
        assert_eq!(readable_tail(&c, 5), "…image");
    }

    #[test]
    fn a_secret_is_redacted_before_the_text_is_cut_and_a_cut_off_fragment_goes_too() {
        let secret = "s3cr3t-t0ken-value";
        // The secret straddles the 20-character cut: redacting after the cut would
        // leave "t0ken-value" behind.
        let text = format!("login as user:{secret} failed");
        let c = Captured {
            tail: text.clone().into_bytes(),
            total: text.len() as u64,
        };
        let out = readable_tail_redacted(&c, 20, Some(secret));
        assert!(!out.contains("t0ken") && !out.contains("value f"), "{out}");
        assert!(out.ends_with("[redacted] failed"), "{out}");
        // The capture kept only the end of the stream, which begins inside the secret.
        let c = Captured {
            tail: b"en-value failed again".to_vec(),
            total: 10_000,
        };
        let out = readable_tail_redacted(&c, 100, Some(secret));
        assert_eq!(out, "[redacted] failed again");
        // Not truncated: nothing at the start is taken for a fragment.
        let c = Captured {
            tail: b"value is fine".to_vec(),
            total: 13,
        };
        assert_eq!(
            readable_tail_redacted(&c, 100, Some(secret)),
            "value is fine"
        );
    }
}
