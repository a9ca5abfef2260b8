//! The fault suite's own record of what it tried (issue: reliability report).
//!
//! Every fault test calls [`record`] once per fault or input it tried, after its
//! assertions passed, so a line exists only for an outcome that was checked. Lines are
//! JSON, appended to `$CARGO_TARGET_TMPDIR/reliability.jsonl` (one file for every test
//! binary of a run); `scripts/reliability-report` empties it, runs the fault suite and
//! renders `docs/reliability.md` from it. Nothing in it is typed in by hand.

use std::io::Write as _;
use std::path::PathBuf;

/// Where the lines go.
pub fn log_path() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reliability.jsonl")
}

/// One fault or hostile input, as tried and checked.
pub struct Tried<'a> {
    /// The area: `network`, `crash`, `token`, `scanner`, `disk`, `state`, `hostile`,
    /// `config`, `secrets`, `api`.
    pub area: &'a str,
    /// What was done, e.g. `registry answers 503 to every manifest HEAD`.
    pub fault: &'a str,
    /// How many times it was tried (runs, requests, kills).
    pub runs: u64,
    /// What the daemon did, as asserted, e.g. `cycle failed cleanly; 4 requests; retried`.
    pub outcome: &'a str,
    /// Images, results or records lost: counted by the test, must be 0.
    pub lost: u64,
    /// The test that checked it (`module::function`).
    pub test: &'a str,
}

/// Appends one line for `tried`. A failing write fails the test: a report with a hole in
/// it would claim less than was run.
pub fn record(tried: Tried<'_>) {
    let line = serde_json::json!({
        "area": tried.area,
        "fault": tried.fault,
        "runs": tried.runs,
        "outcome": tried.outcome,
        "lost": tried.lost,
        "test": tried.test,
    });
    let path = log_path();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // One write per line: appends of a few hundred bytes from concurrent tests do not
    // interleave.
    file.write_all(format!("{line}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
