//! Secrets (issue 6, item 9): a registry credential must reach syft through the one
//! channel the README documents (the `SYFT_REGISTRY_AUTH_PASSWORD` variable) and appear
//! nowhere else.
//!
//! Each test runs a full daemon life with a random sentinel credential, at
//! `RUST_LOG=trace`: several cycles, a scan, a failing scan whose syft wrapper prints its
//! whole environment and argv to stderr (and dumps them to a directory outside everything
//! checked, so the test sees what the child really got), every API endpoint, a forced
//! rescan, SIGHUP reload and SIGTERM; then `check-config`, `report` and `db status`.
//! Then it greps everything for the sentinel (and the base64 `user:password` of a Basic
//! header): the stdout and stderr of the daemon and of those commands, every file under
//! the scanner's directory (config, state including sled's files as bytes, output, scan
//! temp dirs), the daemon's own `TMPDIR`, every HTTP response's headers and body, and the
//! children's argv. In the children's environment it may appear only in
//! `SYFT_REGISTRY_AUTH_PASSWORD` of syft's scan invocations (and must appear there, or
//! the scan could not have pulled). Once in `spcs` mode (session token), once in `basic`
//! mode (password file).

mod support;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::Signal;
use support::daemon::{Auth, Scanner, files_under};
use support::oci::{DebianImage, ManifestFormat, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};

/// The variable README names as the credential channel to syft.
const CHANNEL: &str = "SYFT_REGISTRY_AUTH_PASSWORD";

fn sentinel(kind: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("SENTINEL-{kind}-{}-{nanos:09}", std::process::id())
}

/// The daemon at trace level, its stdout and stderr kept apart as raw bytes.
struct TraceDaemon {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl TraceDaemon {
    fn start(scanner: &Scanner, tmpdir: &Path) -> TraceDaemon {
        let config = scanner.write_config();
        let mut child = Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "trace")
            .env("TMPDIR", tmpdir)
            .env_remove("SPCS_IMAGE_SCANNER_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for (stream, sink) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                stdout.clone(),
            ),
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
                stderr.clone(),
            ),
        ] {
            readers.push(std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                    }
                }
            }));
        }
        TraceDaemon {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// JSON log lines with this message, so far.
    fn events(&self, message: &str) -> Vec<serde_json::Value> {
        let bytes = self.stdout.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    async fn wait_for(
        &mut self,
        message: &str,
        count: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let found: Vec<_> = self.events(message).into_iter().filter(&pred).collect();
            if found.len() >= count {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited ({status}) waiting for {message:?}");
            }
            assert!(
                Instant::now() < deadline,
                "no {count} x {message:?} within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = i32::try_from(self.child.id()).unwrap();
        assert!(pid > 1);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    }

    async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "daemon did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TraceDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scanner wrapper: dumps its argv and environment (NUL-separated) into `dumps`, then
/// for syft scans of `life/fail` prints both to stderr and fails; else runs `target`.
fn dumping_wrapper(dir: &Path, name: &str, dumps: &Path, target: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let text = format!(
        "#!/bin/sh\nf={dumps:?}/{name}.$$\nprintf '%s\\0' \"$0\" \"$@\" > \"$f.argv\"\nenv -0 > \"$f.env\"\n\
         case \"$*\" in *life/fail*)\n  echo \"argv: $*\" >&2\n  env >&2\n  exit 1;;\nesac\nexec {target:?} \"$@\"\n",
        dumps = dumps.display().to_string(),
        target = target.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One HTTP exchange, rendered as the bytes to grep.
async fn exchange(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, Vec<u8>, serde_json::Value) {
    let mut request = client.request(method.clone(), url);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let mut text = format!("{method} {url} -> {status}\n");
    for (k, v) in response.headers() {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let body = response.bytes().await.unwrap_or_default();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(&body);
    (status, bytes, json)
}

/// Every API endpoint, good requests; returns the rendered exchanges.
async fn call_every_endpoint(api: &str, digest: &str) -> Vec<(String, Vec<u8>)> {
    use reqwest::Method;
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let gets = [
        "/healthz".to_string(),
        "/readyz".to_string(),
        "/status".to_string(),
        "/images".to_string(),
        "/images?status=failed".to_string(),
        format!("/images/{digest}"),
        "/metrics".to_string(),
        "/".to_string(),
    ];
    for path in gets {
        let (status, bytes, _) =
            exchange(&client, Method::GET, &format!("{api}{path}"), None).await;
        assert!(status == 200 || path == "/readyz", "GET {path}: {status}");
        out.push((format!("GET {path}"), bytes));
    }
    let (status, bytes, json) = exchange(
        &client,
        Method::POST,
        &format!("{api}/rescan"),
        Some(serde_json::json!({"scope": "image", "target": "life/app:1", "force": true})),
    )
    .await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&bytes));
    out.push(("POST /rescan".into(), bytes));
    let id = json["request_id"].as_str().expect("request_id").to_string();
    // The forced rescan runs syft again with the credential: wait until it is done.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, bytes, json) =
            exchange(&client, Method::GET, &format!("{api}/rescan/{id}"), None).await;
        assert_eq!(status, 200);
        let state = json["state"]
            .as_str()
            .or(json["status"].as_str())
            .unwrap_or_default()
            .to_string();
        if state == "done" || state == "failed" {
            out.push((format!("GET /rescan/{id}"), bytes));
            break;
        }
        assert!(Instant::now() < deadline, "rescan {id} unfinished: {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, bytes, _) = exchange(
        &client,
        Method::POST,
        &format!("{api}/functions/rescan"),
        Some(serde_json::json!({"data": [[0, "life/app:1"], [1, "life/fail:1"]]})),
    )
    .await;
    assert_eq!(status, 200);
    out.push(("POST /functions/rescan".into(), bytes));
    let (status, bytes, _) = exchange(
        &client,
        Method::POST,
        &format!("{api}/events/registry"),
        Some(serde_json::json!({"events": [{"action": "push", "target": {
            "repository": "life/app", "tag": "1", "digest": digest,
            "mediaType": "application/vnd.oci.image.manifest.v1+json"}}]})),
    )
    .await;
    assert!(status < 300, "events: {status}");
    out.push(("POST /events/registry".into(), bytes));
    out
}

fn parse_nul(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}

/// What the children got: returns how many syft scan invocations carried the secret in
/// the channel variable. Panics if the secret is anywhere else in a child's argv or env.
fn check_children(dumps: &Path, secret: &str) -> (usize, usize) {
    let (mut carried, mut invocations) = (0, 0);
    for file in files_under(dumps) {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&file).unwrap();
        if name.ends_with(".argv") {
            invocations += 1;
            assert!(
                !contains(&bytes, secret.as_bytes()),
                "{name}: the credential is in a child's argv: {:?}",
                parse_nul(&bytes)
            );
            continue;
        }
        let argv = parse_nul(&std::fs::read(file.with_extension("argv")).unwrap_or_default());
        let scan = name.starts_with("syft") && argv.iter().any(|a| a.starts_with("registry:"));
        let env: BTreeMap<String, String> = parse_nul(&bytes)
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        let carrying: Vec<&String> = env
            .iter()
            .filter(|(_, v)| v.contains(secret))
            .map(|(k, _)| k)
            .collect();
        if scan {
            assert_eq!(
                carrying,
                vec![CHANNEL],
                "{name}: exactly {CHANNEL} carries the credential to syft"
            );
            assert_eq!(
                env[CHANNEL], secret,
                "{name}: the value is the credential itself"
            );
            carried += 1;
        } else {
            assert!(
                carrying.is_empty(),
                "{name} (argv {argv:?}): the credential reached a child that needs none via {carrying:?}"
            );
        }
    }
    (carried, invocations)
}

async fn full_life(spcs: bool, test: &str) {
    let secret = sentinel(if spcs { "TOKEN" } else { "PASSWORD" });
    let user = if spcs { "0auth2accesstoken" } else { "scanner" };
    let registry = TestRegistry::start(RegistryOptions::htpasswd(user, &secret)).await;
    let pusher = Pusher::new(&registry.url(), Some((user, &secret)));
    let app = pusher
        .push_image(
            "life/app",
            "1",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect("push app");
    pusher
        .push_image(
            "life/fail",
            "1",
            &DebianImage::default().with_file("etc/fail", b"1".to_vec()),
            ManifestFormat::Oci,
        )
        .await
        .expect("push fail");

    let outside = tempfile::tempdir().unwrap();
    let dumps = outside.path().join("dumps");
    let daemon_tmp = outside.path().join("daemon-tmp");
    std::fs::create_dir_all(&dumps).unwrap();
    std::fs::create_dir_all(&daemon_tmp).unwrap();
    let mut scanner = Scanner::new(&registry.url());
    scanner.auth = if spcs {
        Auth::Spcs {
            token: secret.clone(),
        }
    } else {
        Auth::Basic {
            username: user.into(),
            password: secret.clone(),
        }
    };
    scanner.cron = "*/2 * * * * *".into();
    scanner.syft = dumping_wrapper(scanner.dir.path(), "syft", &dumps, &support::daemon::syft());
    scanner.grype = Some(dumping_wrapper(
        scanner.dir.path(),
        "grype",
        &dumps,
        &support::daemon::grype(),
    ));

    let mut daemon = TraceDaemon::start(&scanner, &daemon_tmp);
    daemon
        .wait_for("cycle finished", 1, |e| {
            e["scanned"] == 1 && e["failed"] == 1
        })
        .await;
    let api = scanner.api_url();
    let mut responses = call_every_endpoint(&api, &app.digest).await;
    let cycles = daemon.events("cycle finished").len();
    daemon
        .wait_for("cycle finished", cycles + 1, |_| true)
        .await;

    // SIGHUP with a changed schedule: applied without a restart.
    scanner.cron = "*/3 * * * * *".into();
    scanner.write_config();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_for("config reloaded", 1, |_| true).await;
    let cycles = daemon.events("cycle finished").len();
    daemon
        .wait_for("cycle finished", cycles + 1, |_| true)
        .await;
    let client = reqwest::Client::new();
    for path in ["/status", "/metrics", "/images?status=failed"] {
        let (_, bytes, _) =
            exchange(&client, reqwest::Method::GET, &format!("{api}{path}"), None).await;
        responses.push((format!("GET {path} after reload"), bytes));
    }
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit().await, Some(0), "SIGTERM stops cleanly");

    // The scenario happened: a scan, a failure recorded with the wrapper's stderr (its
    // environment, credential included, before redaction), trace logging on.
    assert_eq!(scanner.result_files().len(), 1, "one image scanned");
    let failures = scanner.failure_records();
    assert!(!failures.is_empty(), "the failing scan was recorded");
    let error = failures[0].1["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains(&format!("{CHANNEL}=[redacted]")),
        "the child's dump reached the record, redacted: {error}"
    );
    let stdout = daemon.stdout.lock().unwrap().clone();
    let stderr = daemon.stderr.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let traced: std::collections::BTreeSet<String> = lines
        .iter()
        .filter(|l| l["level"] == "TRACE" || l["level"] == "DEBUG")
        .filter_map(|l| l["target"].as_str().map(str::to_string))
        .collect();
    assert!(!traced.is_empty(), "trace level was on");
    eprintln!("{} log lines; debug/trace targets: {traced:?}", lines.len());

    // Grep everything.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
    let needles = [secret.clone(), basic];
    let mut places = 0u64;
    let mut check = |what: &str, bytes: &[u8]| {
        places += 1;
        for needle in &needles {
            assert!(
                !contains(bytes, needle.as_bytes()),
                "{what} contains the credential ({})",
                if needle == &secret {
                    "plain"
                } else {
                    "as a Basic header"
                }
            );
        }
    };
    check("daemon stdout", &stdout);
    check("daemon stderr", &stderr);
    // The commands an operator runs next to it print config and state: at trace level too.
    for args in [
        &["check-config"][..],
        &["report", "--json"][..],
        &["report"][..],
        &["db", "status", "--json"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
            .arg("--config")
            .arg(scanner.config_path())
            .args(args)
            .env("RUST_LOG", "trace")
            .env("TMPDIR", &daemon_tmp)
            .output()
            .expect("run command");
        assert!(
            out.status.code().is_some_and(|c| c == 0 || c == 1),
            "{args:?}: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{args:?} printed something");
        check(&format!("{args:?} stdout"), &out.stdout);
        check(&format!("{args:?} stderr"), &out.stderr);
    }
    let secret_file = scanner.secret_path();
    let mut files = files_under(scanner.dir.path());
    files.extend(files_under(&daemon_tmp));
    let sled_files = files
        .iter()
        .filter(|f| f.starts_with(scanner.state_dir().join("db")))
        .count();
    assert!(sled_files > 0, "sled's files were found");
    for file in files.iter().filter(|f| **f != secret_file) {
        let bytes = std::fs::read(file).unwrap_or_default();
        check(&file.display().to_string(), &bytes);
    }
    for (what, bytes) in &responses {
        check(what, bytes);
    }
    let (carried, invocations) = check_children(&dumps, &secret);
    assert!(
        carried >= 2,
        "syft's scans (first scan, failure, forced rescan) got the credential: {carried}"
    );
    let outcome = format!(
        "found only in {CHANNEL} of {carried} syft scan invocations; absent from {invocations} \
         children's argv, the other children's environments, stdout ({} lines, trace level) and \
         stderr, {} files (state with sled's, output, temp dirs) and {} HTTP responses",
        lines.len(),
        files.len() - 1,
        responses.len()
    );
    record(Tried {
        area: "secrets",
        fault: &format!(
            "a sentinel {} through a full daemon life at RUST_LOG=trace: cycles, a scan, a failing scan printing its env and argv, every API endpoint, a forced rescan, SIGHUP, SIGTERM",
            if spcs {
                "SPCS session token (auth = spcs)"
            } else {
                "password (auth = basic)"
            }
        ),
        runs: places + invocations as u64,
        outcome: &outcome,
        lost: 0,
        test,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spcs_token_reaches_only_syfts_password_variable_through_a_full_daemon_life_at_trace_level()
 {
    full_life(
        true,
        "faults_secrets::a_spcs_token_reaches_only_syfts_password_variable_through_a_full_daemon_life_at_trace_level",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_password_reaches_only_syfts_password_variable_through_a_full_daemon_life_at_trace_level()
 {
    full_life(
        false,
        "faults_secrets::a_basic_password_reaches_only_syfts_password_variable_through_a_full_daemon_life_at_trace_level",
    )
    .await;
}
