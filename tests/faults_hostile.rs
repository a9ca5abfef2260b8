//! Hostile registry data through the real binary (issue 6, item 7), against a scripted
//! loopback registry (a real `docker-registry` will not serve such names): catalog and
//! tag names with `..`, `%2e%2e`, `/` tricks, unicode, control characters and 256+
//! characters; 50,000 tags in one repository (paged and in one page); manifests over
//! 4 MiB (announced, and streamed without end); a `Docker-Content-Digest` that does not
//! match the body; unknown media types; indexes with 100 platforms; catalogs whose
//! pagination loops or never ends.
//!
//! Each test asserts on the store, the files under the temp root (every path listed
//! before and after: nothing outside `state.dir`/`output.dir`, no file name holding
//! registry-supplied text), the requests the registry received, the daemon's peak memory
//! (VmHWM) where the input is large, and that the scanner was never started for
//! anything refused. `tests/registry_client.rs` covers the client alone; these go
//! through the binary.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spcs_image_scanner::digest::Digest;
use spcs_image_scanner::state::{ImageStatus, Store};
use support::daemon::{RunningDaemon, tree, wait_with_timeout};
use support::http1::read_request;
use tokio::io::AsyncWriteExt as _;

/// A generous bound on the daemon's peak resident memory.
const MAX_HWM_KB: u64 = 150 * 1024;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

// ---------------------------------------------------------------- the scripted registry

/// A request as received (path and query split, query decoded).
#[derive(Debug, Clone)]
struct Received {
    method: String,
    target: String,
    path: String,
    query: BTreeMap<String, String>,
}

/// What the registry answers.
enum Answer {
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A body of `total` bytes without `Content-Length`, written until the client stops
    /// reading (or `total` is reached); the bytes written are counted.
    Stream {
        headers: Vec<(String, String)>,
        total: u64,
    },
}

fn json_answer(value: &Value) -> Answer {
    Answer::Full {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: value.to_string().into_bytes(),
    }
}

fn not_found() -> Answer {
    Answer::Full {
        status: 404,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#.to_vec(),
    }
}

/// A manifest answer: its bytes, and the digest the headers claim.
fn manifest_answer(body: &[u8], media_type: &str, claimed: &Digest) -> Answer {
    Answer::Full {
        status: 200,
        headers: vec![
            ("Content-Type".into(), media_type.into()),
            ("Docker-Content-Digest".into(), claimed.to_string()),
        ],
        body: body.to_vec(),
    }
}

type Handler = dyn Fn(&Received) -> Answer + Send + Sync;

struct Registry {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    streamed: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Registry {
    /// A registry on a free loopback port, on its own runtime (the tests themselves
    /// block on the daemon).
    fn start(handler: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> Registry {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let streamed = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (log, count) = (received.clone(), streamed.clone());
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handler, log, count) = (handler.clone(), log.clone(), count.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = tokio::io::BufReader::new(read);
                    loop {
                        let Some(request) = read_request(&mut reader).await else {
                            return;
                        };
                        let (method, target) = (request.method, request.target);
                        let url = url::Url::parse(&format!("http://x{target}"))
                            .unwrap_or_else(|_| url::Url::parse("http://x/").expect("url"));
                        let request = Received {
                            method,
                            target: target.clone(),
                            path: url.path().to_string(),
                            query: url.query_pairs().into_owned().collect(),
                        };
                        log.lock().expect("log").push(request.clone());
                        let head_only = request.method == "HEAD";
                        match handler(&request) {
                            Answer::Full {
                                status,
                                headers,
                                body,
                            } => {
                                let mut text = format!("HTTP/1.1 {status} X\r\n");
                                for (k, v) in &headers {
                                    text.push_str(&format!("{k}: {v}\r\n"));
                                }
                                text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                                let mut bytes = text.into_bytes();
                                if !head_only {
                                    bytes.extend_from_slice(&body);
                                }
                                if write.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Answer::Stream { headers, total } => {
                                let mut text =
                                    "HTTP/1.1 200 OK\r\nConnection: close\r\n".to_string();
                                for (k, v) in &headers {
                                    text.push_str(&format!("{k}: {v}\r\n"));
                                }
                                text.push_str("\r\n");
                                if write.write_all(text.as_bytes()).await.is_err() || head_only {
                                    return;
                                }
                                let chunk = vec![b' '; 64 * 1024];
                                let mut sent = 0u64;
                                while sent < total {
                                    // A reader that stopped reading leaves this write
                                    // pending: bounded by a timeout, then the connection
                                    // is dropped.
                                    match tokio::time::timeout(
                                        Duration::from_secs(20),
                                        write.write_all(&chunk),
                                    )
                                    .await
                                    {
                                        Ok(Ok(())) => {
                                            sent += chunk.len() as u64;
                                            count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                                        }
                                        _ => return,
                                    }
                                }
                                return;
                            }
                        }
                    }
                });
            }
        });
        Registry {
            port,
            received,
            streamed,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("log").clone()
    }

    /// Requests with `method` whose path satisfies `pred`.
    fn count(&self, method: &str, pred: impl Fn(&str) -> bool) -> usize {
        self.received()
            .iter()
            .filter(|r| r.method == method && pred(&r.path))
            .count()
    }
}

/// Answers the catalog from `repositories` and the tag lists from `tags`, honouring
/// `n` and `last` with `Link` headers, the way docker-registry pages.
fn paged(names: &[String], query: &BTreeMap<String, String>, path: &str, field: &str) -> Answer {
    let n: usize = query.get("n").and_then(|n| n.parse().ok()).unwrap_or(100);
    let start = match query.get("last") {
        Some(last) => names
            .iter()
            .position(|x| x == last)
            .map_or(names.len(), |i| i + 1),
        None => 0,
    };
    let page: Vec<&String> = names.iter().skip(start).take(n).collect();
    let mut value = json!({ field: page });
    if field == "tags" {
        value["name"] = json!(path);
    }
    let mut answer = json_answer(&value);
    if start + n < names.len() {
        if let (Answer::Full { headers, .. }, Some(last)) = (&mut answer, page.last()) {
            headers.push((
                "Link".into(),
                format!("<{path}?n={n}&last={last}>; rel=\"next\""),
            ));
        }
    }
    answer
}

// ----------------------------------------------------------------------- manifests

fn sha(i: u8) -> String {
    format!("sha256:{}", format!("{i:02x}").repeat(32))
}

/// A Helm chart in an OCI manifest: recorded `unsupported`, never scanned.
fn helm_chart(marker: &str) -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": sha(1), "size": 2},
        "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": sha(2), "size": 3}],
        "annotations": {"marker": marker},
    })
    .to_string()
    .into_bytes()
}

/// A runnable image manifest (its blobs are never served: a scan of it fails).
fn image_manifest(marker: &str) -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(3), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(4), "size": 3}],
        "annotations": {"marker": marker},
    })
    .to_string()
    .into_bytes()
}

// ------------------------------------------------------------------ the daemon's side

/// A temp root with the config, state and output nested three levels down, so a
/// `../../..` escape would still land inside the root, where the test sees it.
struct Setup {
    root: tempfile::TempDir,
    registry_url: String,
    /// More `[registry]` lines.
    registry: String,
    syft: PathBuf,
    syft_log: PathBuf,
}

impl Setup {
    fn new(registry_url: &str, registry: &str) -> Setup {
        let root = tempfile::tempdir().expect("temp dir");
        let tools = root.path().join("tools");
        std::fs::create_dir_all(&tools).expect("tools dir");
        let syft_log = tools.join("syft-invocations");
        // syft that records each scan and fails it: nothing here may be scanned except
        // where a test says so (the blobs are never served). `version` passes through.
        let syft = support::daemon::wrapper_script(
            &tools,
            "syft-recording",
            &format!(
                "echo \"$@\" >> {:?}; exit 3",
                syft_log.display().to_string()
            ),
            &support::daemon::syft(),
        );
        Setup {
            root,
            registry_url: registry_url.to_string(),
            registry: registry.to_string(),
            syft,
            syft_log,
        }
    }

    fn base(&self) -> PathBuf {
        self.root.path().join("a/b/c")
    }

    fn state_dir(&self) -> PathBuf {
        self.base().join("state")
    }

    fn output_dir(&self) -> PathBuf {
        self.base().join("output")
    }

    fn config_path(&self) -> PathBuf {
        self.root.path().join("scanner.toml")
    }

    fn write_config(&self) {
        let text = format!(
            "[registry]\nurl = {url:?}\nmax_retries = 0\nrequest_timeout = \"10s\"\n{registry}\n\
             [schedule]\ncron = \"0 0 0 1 1 *\"\n\
             [scanner]\nsyft = {syft:?}\ngrype = \"\"\nconcurrency = 2\ntimeout = \"60s\"\n\
             [vulndb]\nupdate_cron = \"\"\n\
             [state]\ndir = {state:?}\n[output]\ndir = {output:?}\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n[api]\nlisten = \"\"\n",
            url = self.registry_url,
            registry = self.registry,
            syft = self.syft.display().to_string(),
            state = self.state_dir().display().to_string(),
            output = self.output_dir().display().to_string(),
        );
        std::fs::create_dir_all(self.base()).expect("base dir");
        std::fs::write(self.config_path(), text).expect("write config");
    }

    fn command(&self, sub: &str) -> Command {
        self.write_config();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"));
        cmd.arg("--config")
            .arg(self.config_path())
            .arg(sub)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("SCANNER__") || name == "RUST_LOG" {
                cmd.env_remove(name);
            }
        }
        cmd.env_remove("SPCS_IMAGE_SCANNER_CONFIG");
        cmd
    }

    /// `once`, bounded.
    fn once(&self) -> Ran {
        let child = self.command("once").spawn().expect("spawn once");
        let out = wait_with_timeout(child, Duration::from_secs(120));
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }

    /// `run` until its first cycle finished; returns the daemon's VmHWM then, after
    /// stopping it with SIGTERM, and its output.
    fn run_first_cycle(&self) -> (u64, Ran) {
        let mut daemon = RunningDaemon::spawn(self.command("run"));
        let deadline = Instant::now() + Duration::from_secs(120);
        let ended = |d: &RunningDaemon| {
            d.output()
                .lines()
                .any(|l| l.contains("\"cycle finished\"") || l.contains("\"cycle failed"))
        };
        while !ended(&daemon) {
            assert!(
                daemon.is_running(),
                "daemon exited before its first cycle ended\n{}",
                daemon.output()
            );
            assert!(
                Instant::now() < deadline,
                "no cycle within 120 s\n{}",
                daemon.output()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        let hwm = daemon.peak_rss_kib();
        let code = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(daemon.stop(Duration::from_secs(30)));
        let ran = Ran {
            code,
            stdout: daemon.output(),
            stderr: String::new(),
        };
        (hwm, ran)
    }

    fn store(&self) -> Store {
        Store::open(&self.state_dir()).expect("open state")
    }

    /// How often the scanner was started.
    fn scans_started(&self) -> usize {
        std::fs::read_to_string(&self.syft_log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn events(&self, message: &str) -> Vec<Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    fn summary(&self) -> Value {
        let mut s = self.events("cycle finished");
        assert_eq!(
            s.len(),
            1,
            "one cycle summary\n{}\n{}",
            self.stdout,
            self.stderr
        );
        s.remove(0)
    }

    fn show(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

/// Asserts that every path created under the root since `before` lies under
/// `state.dir` or `output.dir`, and that no path component holds any of `fragments`
/// (registry-supplied text).
fn assert_contained(setup: &Setup, before: &BTreeSet<PathBuf>, fragments: &[&str]) {
    let after = tree(setup.root.path());
    let base = setup.base();
    let rel = |p: PathBuf| {
        p.strip_prefix(setup.root.path())
            .expect("under root")
            .to_path_buf()
    };
    let (state, output) = (rel(setup.state_dir()), rel(setup.output_dir()));
    let tools = PathBuf::from("tools");
    for path in after.difference(before) {
        assert!(
            path.starts_with(&state) || path.starts_with(&output) || path.starts_with(&tools),
            "{} was created outside state.dir and output.dir ({})",
            path.display(),
            base.display()
        );
    }
    for path in &after {
        for component in path.components() {
            let name = component.as_os_str().to_string_lossy();
            for f in fragments {
                assert!(
                    !name.contains(f),
                    "{}: a file name holds registry text {f:?}",
                    path.display()
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------ tests

#[test]
fn hostile_repository_and_tag_names_never_reach_a_path_a_request_or_the_store() {
    let chart = helm_chart("sentinel");
    let digest = Digest::sha256_of(&chart);
    let hostile_repos: Vec<String> = vec![
        "../../../../escape-dotdot".into(),
        "sentinel-ok/../../escape-up".into(),
        "%2e%2e/%2e%2e/escape-pct".into(),
        "sentinel-ok/%2F..%2Fescape-slash".into(),
        "/absolute/escape".into(),
        "sentinel-ok//escape-empty".into(),
        "./escape-dot".into(),
        "sentinel-ok/./escape-dot2".into(),
        "Escape-Upper/x".into(),
        "escape-ünïcode/ü".into(),
        "escape\u{0}nul".into(),
        "escape\nnewline".into(),
        "escape\ttab".into(),
        "escape\u{1b}[31mansi".into(),
        "escape\\backslash".into(),
        "escape\u{202e}bidi".into(),
        format!("escape{}", "x".repeat(250)),
        format!("sentinel-ok/escape{}", "y".repeat(400)),
        "escape?query=1".into(),
        "escape#fragment".into(),
        "escape:5000/x".into(),
        "escape/ x".into(),
    ];
    let hostile_tags: Vec<String> = vec![
        "../escape-tag".into(),
        "escape/tag".into(),
        "ü-escape".into(),
        "escape\u{0}".into(),
        "escape\r\nX-Injected: 1".into(),
        format!("escape{}", "x".repeat(200)),
        ".escape".into(),
        "-escape".into(),
        "escape%2f..".into(),
        "".into(),
    ];
    let mut catalog = hostile_repos.clone();
    catalog.push("sentinel-ok/app".into());
    let mut tags = hostile_tags.clone();
    tags.push("v1".into());
    let (c, t, body, d) = (catalog.clone(), tags.clone(), chart.clone(), digest.clone());
    let registry = Registry::start(move |req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => paged(&c, &req.query, "/v2/_catalog", "repositories"),
        "/v2/sentinel-ok/app/tags/list" => {
            paged(&t, &req.query, "/v2/sentinel-ok/app/tags/list", "tags")
        }
        p if p == "/v2/sentinel-ok/app/manifests/v1"
            || p == format!("/v2/sentinel-ok/app/manifests/{d}") =>
        {
            manifest_answer(&body, OCI_MANIFEST, &d)
        }
        _ => not_found(),
    });
    let setup = Setup::new(&registry.url(), "");
    setup.write_config();
    let before = tree(setup.root.path());
    let out = setup.once();
    assert_eq!(out.code, Some(0), "{}", out.show());
    let summary = out.summary();
    assert_eq!(summary["repositories"], 1, "{summary}");
    assert_eq!(summary["tags"], 1, "{summary}");
    assert_eq!(summary["unsupported"], 1, "{summary}");

    // The registry was asked about the valid repository and tag only.
    for r in registry.received() {
        let decoded = percent_decode(&r.target);
        assert!(
            !decoded.contains("escape") && !r.target.contains("escape"),
            "a hostile name reached a request: {} {}",
            r.method,
            r.target
        );
        assert!(
            r.path == "/v2/"
                || r.path == "/v2/_catalog"
                || r.path.starts_with("/v2/sentinel-ok/app/"),
            "unexpected request {} {}",
            r.method,
            r.target
        );
    }
    assert_eq!(registry.count("HEAD", |p| p.contains("/manifests/")), 1);

    // The store knows the one valid tag and nothing else.
    let store = setup.store();
    let known: Vec<String> = store
        .all_tags()
        .expect("tags")
        .iter()
        .map(|t| format!("{}:{}", t.repository, t.tag))
        .collect();
    assert_eq!(known, vec!["sentinel-ok/app:v1"]);
    let images = store.all_images().expect("images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].digest, digest);
    assert_eq!(images[0].status, ImageStatus::Unsupported);
    assert!(
        images[0]
            .repositories
            .iter()
            .all(|r| r == "sentinel-ok/app")
    );
    drop(store);

    // The inventory names only the valid tag; no file or directory escaped, and none is
    // named after registry text.
    let inventory_dir = setup.output_dir().join("inventory");
    for entry in std::fs::read_dir(&inventory_dir)
        .expect("inventory dir")
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).expect("inventory");
        assert!(!text.contains("escape"), "{text}");
        assert!(text.contains("sentinel-ok/app"), "{text}");
    }
    assert_contained(
        &setup,
        &before,
        &["escape", "sentinel", "..", "%2", "\u{0}", "ü", "app", "v1"],
    );
    assert_eq!(setup.scans_started(), 0, "nothing was scanned");
    // Each skipped name is logged escaped: no raw control character reaches the log.
    assert!(
        !out.stdout.contains('\u{1b}') && !out.stdout.contains('\u{202e}'),
        "raw control characters in the log"
    );
    for name in &hostile_repos {
        support::reliability::record(support::reliability::Tried {
            area: "hostile",
            fault: &format!(
                "catalog lists repository {:?}",
                name.chars().take(40).collect::<String>()
            ),
            runs: 1,
            outcome: "skipped before any request; no path, store record or file name from it",
            lost: 0,
            test: "faults_hostile::hostile_repository_and_tag_names_never_reach_a_path_a_request_or_the_store",
        });
    }
    for tag in &hostile_tags {
        support::reliability::record(support::reliability::Tried {
            area: "hostile",
            fault: &format!(
                "tag list holds {:?}",
                tag.chars().take(40).collect::<String>()
            ),
            runs: 1,
            outcome: "skipped before any HEAD; the valid tag beside it recorded",
            lost: 0,
            test: "faults_hostile::hostile_repository_and_tag_names_never_reach_a_path_a_request_or_the_store",
        });
    }
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[test]
fn fifty_thousand_tags_are_paged_capped_and_listed_in_bounded_memory() {
    let chart = helm_chart("many");
    let digest = Digest::sha256_of(&chart);
    let tags: Arc<Vec<String>> = Arc::new((0..50_000).map(|i| format!("t{i:05}")).collect());
    let (t, body, d) = (tags.clone(), chart.clone(), digest.clone());
    let registry = Registry::start(move |req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => json_answer(&json!({"repositories": ["many/paged", "many/onepage"]})),
        "/v2/many/paged/tags/list" => paged(&t, &req.query, "/v2/many/paged/tags/list", "tags"),
        // A registry that ignores `n`: all 50,000 in one answer.
        "/v2/many/onepage/tags/list" => json_answer(&json!({"name": "many/onepage", "tags": *t})),
        p if p.contains("/manifests/") => manifest_answer(&body, OCI_MANIFEST, &d),
        _ => not_found(),
    });
    let setup = Setup::new(&registry.url(), "max_tags_per_repository = 300");
    let (hwm, out) = setup.run_first_cycle();
    assert_eq!(out.code, Some(0), "{}", out.show());
    let summary = out.summary();
    assert_eq!(summary["tags"], 600, "{summary}");
    assert_eq!(
        out.events("tag listing cut short (registry.max_tags_per_repository)")
            .len(),
        2,
        "{}",
        out.show()
    );
    let pages = registry.count("GET", |p| p == "/v2/many/paged/tags/list");
    assert!(
        (1..=51).contains(&pages),
        "50,000 tags at n=1000 are at most 50 pages (and one that brings nothing): {pages}"
    );
    assert_eq!(
        registry.count("GET", |p| p == "/v2/many/onepage/tags/list"),
        1
    );
    assert_eq!(
        registry.count("HEAD", |p| p.contains("/manifests/")),
        600,
        "one HEAD per kept tag, none for the 49,700 beyond the cap per repository"
    );
    assert_eq!(
        registry.count("GET", |p| p.contains("/manifests/")),
        1,
        "one digest, fetched once"
    );
    assert!(hwm < MAX_HWM_KB, "VmHWM {hwm} kB");
    let store = setup.store();
    let by_repo = store.all_tags().expect("tags").iter().fold(
        BTreeMap::<String, usize>::new(),
        |mut m, t| {
            *m.entry(t.repository.clone()).or_default() += 1;
            m
        },
    );
    assert_eq!(
        by_repo,
        BTreeMap::from([
            ("many/onepage".to_string(), 300),
            ("many/paged".to_string(), 300)
        ])
    );
    assert_eq!(setup.scans_started(), 0);
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "50,000 tags in one repository, paged by n/last and in one page (max_tags_per_repository 300)",
        runs: 2,
        outcome: &format!(
            "{pages} pages; 300 tags kept per repository, 600 HEADs; VmHWM {} MB",
            hwm / 1024
        ),
        lost: 0,
        test: "faults_hostile::fifty_thousand_tags_are_paged_capped_and_listed_in_bounded_memory",
    });
}

#[test]
fn a_manifest_over_4_mib_is_refused_and_not_read_past_the_cap() {
    // 5 MiB of valid JSON whose digest is what the HEAD says: refused for its size only.
    let mut announced = image_manifest("big").to_vec();
    announced.pop();
    announced.extend_from_slice(format!(",\"pad\":\"{}\"}}", "p".repeat(5 << 20)).as_bytes());
    let announced_digest = Digest::sha256_of(&announced);
    let streamed_digest = Digest::parse(&sha(9)).expect("digest");
    let (a, ad, sd) = (
        announced.clone(),
        announced_digest.clone(),
        streamed_digest.clone(),
    );
    let registry = Registry::start(move |req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => json_answer(&json!({"repositories": ["big/manifest"]})),
        "/v2/big/manifest/tags/list" => {
            json_answer(&json!({"name": "big/manifest", "tags": ["announced", "streamed"]}))
        }
        "/v2/big/manifest/manifests/announced" => manifest_answer(b"", OCI_MANIFEST, &ad),
        "/v2/big/manifest/manifests/streamed" => manifest_answer(b"", OCI_MANIFEST, &sd),
        p if p == format!("/v2/big/manifest/manifests/{ad}") => {
            manifest_answer(&a, OCI_MANIFEST, &ad)
        }
        // 512 MiB without Content-Length, until the client stops reading.
        p if p == format!("/v2/big/manifest/manifests/{sd}") => Answer::Stream {
            headers: vec![
                ("Content-Type".into(), OCI_MANIFEST.into()),
                ("Docker-Content-Digest".into(), sd.to_string()),
            ],
            total: 512 << 20,
        },
        _ => not_found(),
    });
    let setup = Setup::new(&registry.url(), "");
    let (hwm, out) = setup.run_first_cycle();
    let summary = out.summary();
    assert_eq!(summary["errors"], 2, "{summary}\n{}", out.show());
    // Both tags answered their HEAD; neither got into the store.
    assert_eq!(summary["tags"], 2, "{summary}");
    let streamed = registry.streamed.load(Ordering::SeqCst);
    assert!(
        streamed < 64 << 20,
        "the daemon read {streamed} bytes of an endless manifest: it must stop at the 4 MiB cap"
    );
    assert!(hwm < MAX_HWM_KB, "VmHWM {hwm} kB");
    let store = setup.store();
    assert!(store.all_images().expect("images").is_empty());
    assert!(store.all_tags().expect("tags").is_empty());
    assert_eq!(setup.scans_started(), 0);
    assert!(
        out.stdout.contains("4194304"),
        "the refusal names the limit\n{}",
        out.show()
    );
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "a 5 MiB manifest whose digest matches",
        runs: 1,
        outcome: "refused for its size; no image, no tag, no scan",
        lost: 0,
        test: "faults_hostile::a_manifest_over_4_mib_is_refused_and_not_read_past_the_cap",
    });
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "a manifest streamed without Content-Length and without end (512 MiB offered)",
        runs: 1,
        outcome: &format!(
            "refused; {} MiB sent before the daemon stopped reading; VmHWM {} MB",
            streamed >> 20,
            hwm / 1024
        ),
        lost: 0,
        test: "faults_hostile::a_manifest_over_4_mib_is_refused_and_not_read_past_the_cap",
    });
}

#[test]
fn a_digest_that_does_not_match_the_manifest_is_refused_and_nothing_is_scanned() {
    // Two tags point at two digests; asked for either, the registry sends other bytes.
    // For `header-lies` its Docker-Content-Digest repeats the digest asked for; for
    // `header-honest` it names the bytes sent (which are still not what was asked).
    let lies = Digest::sha256_of(&image_manifest("real-1"));
    let honest = Digest::sha256_of(&image_manifest("real-2"));
    let served = image_manifest("swapped");
    let served_digest = Digest::sha256_of(&served);
    let (s, l, h, sd) = (
        served.clone(),
        lies.clone(),
        honest.clone(),
        served_digest.clone(),
    );
    let registry = Registry::start(move |req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => json_answer(&json!({"repositories": ["lying/registry"]})),
        "/v2/lying/registry/tags/list" => json_answer(
            &json!({"name": "lying/registry", "tags": ["header-lies", "header-honest"]}),
        ),
        "/v2/lying/registry/manifests/header-lies" => manifest_answer(b"", OCI_MANIFEST, &l),
        "/v2/lying/registry/manifests/header-honest" => manifest_answer(b"", OCI_MANIFEST, &h),
        p if p == format!("/v2/lying/registry/manifests/{l}") => {
            manifest_answer(&s, OCI_MANIFEST, &l)
        }
        p if p == format!("/v2/lying/registry/manifests/{h}") => {
            manifest_answer(&s, OCI_MANIFEST, &sd)
        }
        _ => not_found(),
    });
    let setup = Setup::new(&registry.url(), "");
    let out = setup.once();
    let summary = out.summary();
    assert_eq!(summary["errors"], 2, "{summary}\n{}", out.show());
    // Both tags answered their HEAD; neither got into the store.
    assert_eq!(summary["tags"], 2, "{summary}");
    assert!(
        out.stdout.contains("digest"),
        "the refusal says why\n{}",
        out.show()
    );
    let store = setup.store();
    assert!(
        store.all_images().expect("images").is_empty(),
        "nothing recorded"
    );
    assert!(store.all_tags().expect("tags").is_empty());
    assert!(store.get_image(&served_digest).expect("get").is_none());
    drop(store);
    assert_eq!(setup.scans_started(), 0, "nothing scanned");
    assert_eq!(
        registry.count("GET", |p| p.contains("/manifests/sha256:")),
        2,
        "each manifest fetched once"
    );
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "GET by digest returns other bytes (Docker-Content-Digest repeats the asked digest)",
        runs: 2,
        outcome: "refused on the digest check; no image or tag recorded; no scan; retried next cycle",
        lost: 0,
        test: "faults_hostile::a_digest_that_does_not_match_the_manifest_is_refused_and_nothing_is_scanned",
    });
}

#[test]
fn unknown_media_types_are_recorded_unsupported_and_never_scanned() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown-manifest-type",
            json!({"schemaVersion": 2, "mediaType": "application/vnd.example.thing.v1+json", "layers": []})
                .to_string()
                .into_bytes(),
        ),
        (
            "unknown-config-type",
            json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.example.config+json", "digest": sha(5), "size": 1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(6), "size": 1}],
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "unknown-layer-type",
            json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(5), "size": 1},
                "layers": [{"mediaType": "application/x-totally-unknown", "digest": sha(6), "size": 1}],
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "artifact-type",
            json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha(7), "size": 2},
                "layers": [{"mediaType": "application/vnd.example.sbom", "digest": sha(8), "size": 1}],
            })
            .to_string()
            .into_bytes(),
        ),
        (
            "schema1",
            json!({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []})
                .to_string()
                .into_bytes(),
        ),
        (
            "media-type-not-a-string",
            br#"{"schemaVersion": 2, "mediaType": {"a": 1}}"#.to_vec(),
        ),
        ("not-json", b"<html>not a manifest</html>".to_vec()),
        (
            "control-chars-in-type",
            json!({"schemaVersion": 2, "mediaType": "application/\u{1b}[31mevil\u{0}"})
                .to_string()
                .into_bytes(),
        ),
    ];
    let by_tag: Arc<BTreeMap<String, (Vec<u8>, Digest)>> = Arc::new(
        cases
            .iter()
            .map(|(tag, body)| (tag.to_string(), (body.clone(), Digest::sha256_of(body))))
            .collect(),
    );
    let tag_names: Vec<String> = by_tag.keys().cloned().collect();
    let b = by_tag.clone();
    let registry = Registry::start(move |req| {
        let p = req.path.as_str();
        if p == "/v2/" {
            return json_answer(&json!({}));
        }
        if p == "/v2/_catalog" {
            return json_answer(&json!({"repositories": ["odd/types"]}));
        }
        if p == "/v2/odd/types/tags/list" {
            return json_answer(&json!({"name": "odd/types", "tags": tag_names}));
        }
        let Some(reference) = p.strip_prefix("/v2/odd/types/manifests/") else {
            return not_found();
        };
        let found = b
            .iter()
            .find(|(tag, (_, d))| tag.as_str() == reference || d.as_str() == reference);
        match found {
            Some((_, (body, d))) => manifest_answer(body, "application/octet-stream", d),
            None => not_found(),
        }
    });
    let setup = Setup::new(&registry.url(), "");
    let out = setup.once();
    assert_eq!(out.code, Some(0), "{}", out.show());
    let summary = out.summary();
    assert_eq!(summary["unsupported"], cases.len(), "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    let store = setup.store();
    for (tag, (_, digest)) in by_tag.iter() {
        let image = store
            .get_image(digest)
            .expect("get")
            .unwrap_or_else(|| panic!("{tag}: recorded"));
        assert_eq!(image.status, ImageStatus::Unsupported, "{tag}");
        let reason = image.unsupported_reason.clone().unwrap_or_default();
        assert!(!reason.is_empty(), "{tag}: a reason");
        assert!(
            !reason.contains('\u{1b}') && !reason.contains('\u{0}'),
            "{tag}: control characters kept in the reason: {reason:?}"
        );
    }
    drop(store);
    assert_eq!(setup.scans_started(), 0, "nothing scanned");
    assert!(
        setup.output_dir().join("scans").read_dir().is_err()
            || tree(&setup.output_dir().join("scans")).is_empty()
    );
    for (tag, _) in &cases {
        support::reliability::record(support::reliability::Tried {
            area: "hostile",
            fault: &format!("manifest of kind {tag}"),
            runs: 1,
            outcome: "recorded unsupported with a reason; not scanned",
            lost: 0,
            test: "faults_hostile::unknown_media_types_are_recorded_unsupported_and_never_scanned",
        });
    }
}

#[test]
fn an_index_of_100_platforms_resolves_to_the_configured_one_with_bounded_work() {
    let child = image_manifest("the-amd64-one");
    let child_digest = Digest::sha256_of(&child);
    let entry = |os: &str, arch: &str, digest: &str| {
        json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 100,
               "platform": {"os": os, "architecture": arch}})
    };
    // 99 decoys (other architectures, attestations, other OSes), and the one wanted at
    // position 57.
    let mut with: Vec<Value> = (0..99)
        .map(|i| match i % 3 {
            0 => entry("linux", &format!("arch{i}"), &sha(10 + (i % 200) as u8)),
            1 => entry("windows", "amd64", &sha(10 + (i % 200) as u8)),
            _ => json!({"mediaType": OCI_MANIFEST, "digest": sha(10 + (i % 200) as u8), "size": 1,
                        "platform": {"os": "unknown", "architecture": "unknown"},
                        "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}),
        })
        .collect();
    with.insert(57, entry("linux", "amd64", child_digest.as_str()));
    let without: Vec<Value> = (0..100)
        .map(|i| entry("linux", &format!("other{i}"), &sha(10 + (i % 200) as u8)))
        .collect();
    let index_with = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": with})
        .to_string()
        .into_bytes();
    let index_without = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": without})
        .to_string()
        .into_bytes();
    let (dw, dwo) = (
        Digest::sha256_of(&index_with),
        Digest::sha256_of(&index_without),
    );
    let (iw, iwo, c, cd, dw2, dwo2) = (
        index_with.clone(),
        index_without.clone(),
        child.clone(),
        child_digest.clone(),
        dw.clone(),
        dwo.clone(),
    );
    let registry = Registry::start(move |req| {
        let p = req.path.as_str();
        match p {
            "/v2/" => json_answer(&json!({})),
            "/v2/_catalog" => json_answer(&json!({"repositories": ["multi/arch"]})),
            "/v2/multi/arch/tags/list" => {
                json_answer(&json!({"name": "multi/arch", "tags": ["with-amd64", "without-amd64"]}))
            }
            "/v2/multi/arch/manifests/with-amd64" => manifest_answer(b"", OCI_INDEX, &dw2),
            "/v2/multi/arch/manifests/without-amd64" => manifest_answer(b"", OCI_INDEX, &dwo2),
            _ if p == format!("/v2/multi/arch/manifests/{dw2}") => {
                manifest_answer(&iw, OCI_INDEX, &dw2)
            }
            _ if p == format!("/v2/multi/arch/manifests/{dwo2}") => {
                manifest_answer(&iwo, OCI_INDEX, &dwo2)
            }
            _ if p == format!("/v2/multi/arch/manifests/{cd}") => {
                manifest_answer(&c, OCI_MANIFEST, &cd)
            }
            _ => not_found(),
        }
    });
    let setup = Setup::new(&registry.url(), "platform = \"linux/amd64\"");
    let out = setup.once();
    // The picked image is scanned (and the scan fails: this registry serves no blobs).
    assert_eq!(out.code, Some(1), "{}", out.show());
    let summary = out.summary();
    assert_eq!(summary["tags"], 2, "{summary}");
    assert_eq!(summary["unsupported"], 1, "{summary}");
    assert_eq!(
        registry.count("GET", |p| p.contains("/manifests/sha256:")),
        3,
        "the two indexes and the one child: none of the 198 other entries"
    );
    let store = setup.store();
    let picked = store.get_index(&dw).expect("get").expect("index recorded");
    assert_eq!(picked.child.as_ref(), Some(&child_digest));
    let image = store.get_image(&child_digest).expect("get").expect("child");
    assert_eq!(image.platform.as_deref(), Some("linux/amd64"));
    assert!(image.index_digests.contains(&dw));
    let absent = store.get_image(&dwo).expect("get").expect("recorded");
    assert_eq!(absent.status, ImageStatus::Unsupported);
    assert!(
        absent
            .unsupported_reason
            .as_deref()
            .is_some_and(|r| r.contains("linux/amd64")),
        "{:?}",
        absent.unsupported_reason
    );
    assert_eq!(store.all_images().expect("images").len(), 2);
    drop(store);
    let scans = std::fs::read_to_string(&setup.syft_log).unwrap_or_default();
    assert_eq!(setup.scans_started(), 1, "{scans}");
    assert!(scans.contains(child_digest.as_str()), "{scans}");
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "an index of 100 entries (decoy architectures, OSes, attestations) with linux/amd64 at 57",
        runs: 1,
        outcome: "the linux/amd64 child picked and scanned; 2 manifest GETs",
        lost: 0,
        test: "faults_hostile::an_index_of_100_platforms_resolves_to_the_configured_one_with_bounded_work",
    });
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "an index of 100 platforms without linux/amd64",
        runs: 1,
        outcome: "recorded unsupported naming the platform; 1 manifest GET; not scanned",
        lost: 0,
        test: "faults_hostile::an_index_of_100_platforms_resolves_to_the_configured_one_with_bounded_work",
    });
}

#[test]
fn a_catalog_whose_pagination_loops_or_never_ends_stops_after_a_bounded_number_of_requests() {
    // Loop: page 1 -> page 2 -> page 1 -> ...
    let looping = Registry::start(|req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => {
            let second = req.query.get("last").is_some_and(|l| l == "loop/b");
            let (names, next) = if second {
                (json!(["loop/c"]), "/v2/_catalog?n=2")
            } else {
                (json!(["loop/a", "loop/b"]), "/v2/_catalog?n=2&last=loop/b")
            };
            match json_answer(&json!({ "repositories": names })) {
                Answer::Full {
                    status,
                    mut headers,
                    body,
                } => {
                    headers.push(("Link".into(), format!("<{next}>; rel=\"next\"")));
                    Answer::Full {
                        status,
                        headers,
                        body,
                    }
                }
                other => other,
            }
        }
        p if p.ends_with("/tags/list") => json_answer(&json!({"tags": []})),
        _ => not_found(),
    });
    let setup = Setup::new(&looping.url(), "");
    let out = setup.once();
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(out.summary()["repositories"], 3);
    let catalog = looping.count("GET", |p| p == "/v2/_catalog");
    assert_eq!(
        catalog, 3,
        "page 1, page 2, page 1 again (nothing new): stop"
    );

    // Endless: every page brings one new name and links on.
    let endless = Registry::start(|req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/_catalog" => {
            let k: u64 = req
                .query
                .get("last")
                .and_then(|l| l.strip_prefix("endless/r"))
                .and_then(|n| n.parse().ok())
                .map_or(0, |n: u64| n + 1);
            let name = format!("endless/r{k:06}");
            match json_answer(&json!({ "repositories": [name] })) {
                Answer::Full {
                    status,
                    mut headers,
                    body,
                } => {
                    headers.push((
                        "Link".into(),
                        format!("</v2/_catalog?n=1000&last={name}>; rel=\"next\""),
                    ));
                    Answer::Full {
                        status,
                        headers,
                        body,
                    }
                }
                other => other,
            }
        }
        p if p.ends_with("/tags/list") => json_answer(&json!({"tags": []})),
        _ => not_found(),
    });
    let setup = Setup::new(&endless.url(), "concurrency = 32");
    let out = setup.once();
    assert_eq!(out.code, Some(0), "{}", out.show());
    let catalog = endless.count("GET", |p| p == "/v2/_catalog");
    assert_eq!(
        catalog,
        spcs_image_scanner::registry::MAX_PAGES,
        "the listing stops at the page cap"
    );
    assert!(
        !out.events("catalog cut short at 1000 pages").is_empty(),
        "the cut is logged\n{}",
        out.show()
    );
    let total = endless.received().len();
    assert!(
        total <= 2 * spcs_image_scanner::registry::MAX_PAGES + 10,
        "bounded: {total} requests"
    );
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "catalog pagination links back to its first page",
        runs: 1,
        outcome: "3 catalog requests, then stop; the 3 repositories listed",
        lost: 0,
        test: "faults_hostile::a_catalog_whose_pagination_loops_or_never_ends_stops_after_a_bounded_number_of_requests",
    });
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "catalog pagination never ends (each page one new name and a next Link)",
        runs: 1,
        outcome: &format!("stopped at {catalog} pages (the cap), logged; {total} requests in all"),
        lost: 0,
        test: "faults_hostile::a_catalog_whose_pagination_loops_or_never_ends_stops_after_a_bounded_number_of_requests",
    });
}

#[test]
fn digest_headers_that_are_not_digests_never_reach_a_path_or_the_store() {
    let bad: Vec<(&str, &str)> = vec![
        ("traversal", "sha256:../../../../escape-digest"),
        ("short", "sha256:abc"),
        (
            "uppercase",
            "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
        ),
        ("other-algorithm", "md5:d41d8cd98f00b204e9800998ecf8427e"),
        (
            "no-algorithm",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        (
            "trailing-path",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/../escape",
        ),
        ("empty", ""),
    ];
    let tags: Vec<String> = bad.iter().map(|(t, _)| t.to_string()).collect();
    let by_tag: Arc<BTreeMap<String, String>> = Arc::new(
        bad.iter()
            .map(|(t, d)| (t.to_string(), d.to_string()))
            .collect(),
    );
    let b = by_tag.clone();
    let registry = Registry::start(move |req| {
        let p = req.path.as_str();
        match p {
            "/v2/" => json_answer(&json!({})),
            "/v2/_catalog" => json_answer(&json!({"repositories": ["odd/digests"]})),
            "/v2/odd/digests/tags/list" => {
                json_answer(&json!({"name": "odd/digests", "tags": tags}))
            }
            _ => match p
                .strip_prefix("/v2/odd/digests/manifests/")
                .and_then(|t| b.get(t))
            {
                Some(d) => Answer::Full {
                    status: 200,
                    headers: vec![
                        ("Content-Type".into(), OCI_MANIFEST.into()),
                        ("Docker-Content-Digest".into(), d.clone()),
                    ],
                    body: image_manifest("escape").to_vec(),
                },
                None => not_found(),
            },
        }
    });
    let setup = Setup::new(&registry.url(), "");
    setup.write_config();
    let before = tree(setup.root.path());
    let out = setup.once();
    let summary = out.summary();
    let store = setup.store();
    let digests: Vec<String> = store
        .all_images()
        .expect("images")
        .iter()
        .map(|i| i.digest.to_string())
        .collect();
    for d in &digests {
        assert!(
            Digest::parse(d).is_ok() && !by_tag.values().any(|bad| bad == d),
            "a bad digest header reached the store: {d}"
        );
    }
    assert!(
        store
            .all_tags()
            .expect("tags")
            .iter()
            .all(|t| { !by_tag.values().any(|bad| bad == t.digest.as_str()) })
    );
    drop(store);
    for r in registry.received() {
        assert!(
            !percent_decode(&r.target).contains("escape"),
            "a bad digest became a request: {} {}",
            r.method,
            r.target
        );
    }
    assert_contained(&setup, &before, &["escape", "..", "abcdef"]);
    assert_eq!(summary["errors"], bad.len(), "each refused: {summary}");
    assert!(digests.is_empty(), "nothing recorded: {digests:?}");
    assert_eq!(setup.scans_started(), 0);
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "Docker-Content-Digest values that are not digests (traversal, short, uppercase, md5, bare hex, trailing path, empty)",
        runs: bad.len() as u64,
        outcome: &format!(
            "each refused ({} errors); nothing recorded, requested or scanned from them",
            summary["errors"]
        ),
        lost: 0,
        test: "faults_hostile::digest_headers_that_are_not_digests_never_reach_a_path_or_the_store",
    });
}

#[test]
fn hostile_names_in_an_spcs_image_repository_catalog_are_skipped_too() {
    let chart = helm_chart("spcs");
    let digest = Digest::sha256_of(&chart);
    let listed = json!({"repositories": [
        "baserepo/../../../../escape-up",
        "baserepo/%2e%2e/escape-pct",
        "baserepo//escape-empty",
        "baserepo/escape\u{0}nul",
        "baserepo/Escape-Upper",
        format!("baserepo/escape{}", "x".repeat(260)),
        "../escape-without-prefix",
        "baserepo/sentinel",
    ]});
    let (body, d) = (chart.clone(), digest.clone());
    let registry = Registry::start(move |req| match req.path.as_str() {
        "/v2/" => json_answer(&json!({})),
        "/v2/db/schema/repo/_catalog" => json_answer(&listed),
        "/v2/db/schema/repo/sentinel/tags/list" => {
            json_answer(&json!({"name": "db/schema/repo/sentinel", "tags": ["v1"]}))
        }
        p if p.starts_with("/v2/db/schema/repo/sentinel/manifests/") => {
            manifest_answer(&body, OCI_MANIFEST, &d)
        }
        _ => not_found(),
    });
    let setup = Setup::new(&registry.url(), "image_repositories = [\"db/schema/repo\"]");
    setup.write_config();
    let before = tree(setup.root.path());
    let out = setup.once();
    assert_eq!(out.code, Some(0), "{}", out.show());
    assert_eq!(out.summary()["repositories"], 1);
    for r in registry.received() {
        assert!(
            !percent_decode(&r.target).contains("escape"),
            "a hostile name reached a request: {} {}",
            r.method,
            r.target
        );
    }
    let store = setup.store();
    let known: Vec<String> = store
        .all_tags()
        .expect("tags")
        .iter()
        .map(|t| format!("{}:{}", t.repository, t.tag))
        .collect();
    assert_eq!(known, vec!["db/schema/repo/sentinel:v1"]);
    drop(store);
    assert_contained(&setup, &before, &["escape", "sentinel", "schema", ".."]);
    support::reliability::record(support::reliability::Tried {
        area: "hostile",
        fault: "an SPCS per-repository catalog listing baserepo/ names with .., %2e%2e, //, NUL, uppercase, 260+ chars",
        runs: 7,
        outcome: "each skipped before any request; the valid image beside them recorded; no path from them",
        lost: 0,
        test: "faults_hostile::hostile_names_in_an_spcs_image_repository_catalog_are_skipped_too",
    });
}
