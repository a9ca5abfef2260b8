//! End-to-end scenarios of the control plane against the running binary: the HTTP API
//! (good and bad input), the CLI clients, the status page in headless Chromium,
//! Prometheus metrics, registry push notifications from a real `docker-registry`,
//! SIGHUP, SIGUSR1, SIGTERM during a scan, and a burst of 1,000 rescan requests.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use spcs_image_scanner::state::ImageStatus;
use support::daemon::{
    Auth, Gated, RunningDaemon, Scanner, gated_wrapper, hanging_wrapper, using_standin,
    wait_for_file, wait_for_pid,
};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};

fn http() -> reqwest::Client {
    support::oci::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

async fn get(url: &str) -> (u16, String) {
    let r = http().get(url).send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

async fn get_json(url: &str) -> (u16, Value) {
    let (status, body) = get(url).await;
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"));
    (status, v)
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// Starts the daemon; returns once its first cycle scanned `scanned` images and the API
/// answers.
async fn start(scanner: &Scanner, scanned: u64) -> RunningDaemon {
    let mut daemon = scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(180), |e| {
            e["scanned"] == scanned
        })
        .await;
    daemon.wait_api(&scanner.api_url()).await;
    daemon
}

/// Waits (bounded) until a rescan request has ended; returns it.
async fn wait_request(api: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, r) = get_json(&format!("{api}/rescan/{id}")).await;
        assert_eq!(status, 200, "{r}");
        if r["state"] == "done" || r["state"] == "failed" {
            return r;
        }
        assert!(Instant::now() < deadline, "request {id} did not end: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Findings per severity in a grype document.
fn severities_in(result: &Path) -> BTreeMap<String, u64> {
    let doc: Value = serde_json::from_slice(&std::fs::read(result).expect("result")).expect("json");
    let mut out = BTreeMap::new();
    for m in doc["matches"].as_array().expect("matches") {
        let s = m["vulnerability"]["severity"].as_str().unwrap_or("Unknown");
        *out.entry(s.to_string()).or_default() += 1;
    }
    out
}

async fn push(pusher: &Pusher, repo: &str, tag: &str, marker: &[u8]) -> PushedManifest {
    pusher
        .push_image(
            repo,
            tag,
            &DebianImage::default().with_file("etc/marker", marker.to_vec()),
            ManifestFormat::Oci,
        )
        .await
        .expect("push image")
}

/// A registry holding `repository:1`, and a scanner set up for it.
async fn one_image(repository: &str) -> (TestRegistry, PushedManifest, Scanner) {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let image = push(&pusher, repository, "1", repository.as_bytes()).await;
    let scanner = Scanner::new(&registry.url());
    (registry, image, scanner)
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .args(args)
        .env_remove("SPCS_IMAGE_SCANNER_ENDPOINT")
        .output()
        .expect("run cli")
}

#[tokio::test]
async fn api_endpoints_cli_metrics_and_status_page() {
    const PASSWORD: &str = "s3cret-registry-password-9d1f";
    let registry = TestRegistry::start(RegistryOptions::htpasswd("ci", PASSWORD)).await;
    let pusher = Pusher::new(&registry.url(), Some(("ci", PASSWORD)));
    let one = push(&pusher, "demo/app", "1", b"one").await;
    let two = push(&pusher, "demo/app", "2", b"two").await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.auth = Auth::Basic {
        username: "ci".into(),
        password: PASSWORD.into(),
    };
    scanner.api = "max_body_bytes = 4096\nrequest_timeout = \"2s\"".into();
    let api = scanner.api_url();
    let mut daemon = start(&scanner, 2).await;

    // Health and readiness.
    assert_eq!(
        get_json(&format!("{api}/healthz")).await,
        (200, json!({"status": "alive"}))
    );
    let (code, ready) = get_json(&format!("{api}/readyz")).await;
    assert_eq!((code, &ready["ready"]), (200, &json!(true)), "{ready}");

    // Status: figures, config without secrets.
    let (code, body) = get(&format!("{api}/status")).await;
    assert_eq!(code, 200);
    assert!(!body.contains(PASSWORD), "the password leaked into /status");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["config"]["registry"]["url"], registry.url());
    assert_eq!(status["config"]["registry"]["auth"], "basic");
    assert_eq!(status["images"]["by_status"]["scanned"], 2);
    assert_eq!(status["repositories"]["demo/app"]["scanned"], 2);
    assert_eq!(status["last_cycle"]["scanned"], 2);
    assert_eq!(status["last_cycle"]["tags"], 2);
    assert_eq!(
        status["queue"]["depth"],
        json!({"manual": 0, "new": 0, "rematch": 0})
    );
    if using_standin() {
        assert!(status["vulndb"]["built"].is_string(), "{status}");
        let age = status["vulndb"]["age_seconds"].as_i64().unwrap();
        assert!((86_000..90_000).contains(&age), "seeded a day ago: {age}");
    }

    // Images: list, filters, one, unknown, malformed.
    let (code, images) = get_json(&format!("{api}/images")).await;
    assert_eq!((code, images["count"].as_u64()), (200, Some(2)));
    for image in images["images"].as_array().unwrap() {
        let result = image["result_file"].as_str().expect("result file");
        let want = severities_in(&scanner.output_dir().join(result));
        let got: BTreeMap<String, u64> =
            serde_json::from_value(image["severities"].clone()).unwrap();
        assert_eq!(got, want, "severity counts of {}", image["digest"]);
    }
    let (_, filtered) = get_json(&format!("{api}/images?status=failed")).await;
    assert_eq!(filtered["count"], 0);
    let (_, filtered) = get_json(&format!("{api}/images?repository=demo/app&status=scanned")).await;
    assert_eq!(filtered["count"], 2);
    let (code, bad) = get_json(&format!("{api}/images?status=bogus")).await;
    assert_eq!(
        (code, bad["field"].as_str()),
        (400, Some("status")),
        "{bad}"
    );
    let (code, bad) = get_json(&format!("{api}/images?colour=red")).await;
    assert_eq!((code, bad["field"].as_str()), (400, Some("query")), "{bad}");
    let (code, one_json) = get_json(&format!("{api}/images/{}", one.digest)).await;
    assert_eq!(code, 200);
    assert_eq!(one_json["tags"], json!(["demo/app:1"]));
    assert_eq!(one_json["status"], "scanned");
    assert!(one_json["last_scan"]["finished_at"].is_string());
    let unknown = format!("sha256:{}", "0".repeat(64));
    let (code, bad) = get_json(&format!("{api}/images/{unknown}")).await;
    assert_eq!((code, bad["field"].as_str()), (404, Some("digest")));
    let (code, bad) = get_json(&format!("{api}/images/not-a-digest")).await;
    assert_eq!((code, bad["field"].as_str()), (400, Some("digest")));
    let (code, _) = get(&format!("{api}/no/such/thing")).await;
    assert_eq!(code, 404);

    // Rescan: bad input names the field.
    let rescan = format!("{api}/rescan");
    for (body, code, field) in [
        ("{not json", 400, "body"),
        (r#"{"target": "demo/app:1"}"#, 400, "scope"),
        (r#"{"scope": "everything"}"#, 400, "scope"),
        (r#"{"scope": "all", "force": "yes"}"#, 400, "force"),
        (r#"{"scope": "all", "colour": 1}"#, 400, "colour"),
        (r#"{"scope": "image", "target": "demo/app"}"#, 400, "target"),
        (
            r#"{"scope": "repository", "target": "../../etc"}"#,
            400,
            "target",
        ),
        (
            r#"{"scope": "repository", "target": "other/repo"}"#,
            202,
            "",
        ),
        (
            r#"{"scope": "image", "target": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#,
            404,
            "target",
        ),
    ] {
        let (got, answer) = post(&rescan, body).await;
        assert_eq!(got, code, "{body}: {answer}");
        if code != 202 {
            assert_eq!(answer["field"], field, "{body}: {answer}");
        }
    }
    let (code, _) = post(&rescan, vec![b' '; 5000]).await;
    assert_eq!(code, 413, "body over api.max_body_bytes");
    let (code, _) = get(&rescan).await;
    assert_eq!(code, 405);
    // A client that never finishes its body gets 408 after api.request_timeout.
    assert_eq!(stalled_request(scanner.api_port).await, 408);
    let (code, _) = get_json(&format!("{api}/rescan/no-such-request")).await;
    assert_eq!(code, 404);

    // Rescan: an up-to-date image without force queues nothing; with force it gets a
    // fresh scan (a second result file), answered at once with a request id.
    let before = scanner.result_files()[&hex(&one.digest)].len();
    let (code, answer) = post(
        &rescan,
        json!({"scope": "image", "target": "demo/app:1"}).to_string(),
    )
    .await;
    assert_eq!(code, 202, "{answer}");
    let done = wait_request(&api, answer["request_id"].as_str().unwrap()).await;
    assert_eq!(
        (done["state"].as_str(), done["jobs"].as_u64()),
        (Some("done"), Some(0)),
        "{done}"
    );
    let (code, answer) = post(
        &rescan,
        json!({"scope": "image", "target": format!("{}/demo/app:1", registry.host()), "force": true}).to_string(),
    )
    .await;
    assert_eq!(code, 202, "{answer}");
    let done = wait_request(&api, answer["request_id"].as_str().unwrap()).await;
    assert_eq!(done["outcomes"], json!({"scanned": 1}), "{done}");
    assert_eq!(scanner.result_files()[&hex(&one.digest)].len(), before + 1);
    assert_eq!(
        scanner.result_files()[&hex(&two.digest)].len(),
        1,
        "only the asked-for image"
    );

    // The service-function protocol: one result per row, a bad row does not fail others.
    let (code, answer) = post(
        &format!("{api}/functions/rescan"),
        json!({"data": [[0, "demo/app:2"], [1, "demo/app"], [2, ""], [3, null]]}).to_string(),
    )
    .await;
    assert_eq!(code, 200, "{answer}");
    let rows = answer["data"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0][0], 0);
    assert!(rows[0][1]["request_id"].is_string(), "{answer}");
    assert_eq!(rows[1][1]["scope"], "repository:demo/app");
    assert!(
        rows[2][1]["error"].is_string() && rows[3][1]["error"].is_string(),
        "{answer}"
    );
    let (code, bad) = post(&format!("{api}/functions/rescan"), r#"{"data": "x"}"#).await;
    assert_eq!(code, 400, "{bad}");
    let (code, bad) = post(
        &format!("{api}/functions/rescan"),
        r#"{"data": [["a", "x"]]}"#,
    )
    .await;
    assert_eq!(
        (code, bad["field"].as_str()),
        (400, Some("data[0][0]")),
        "{bad}"
    );
    wait_request(&api, rows[0][1]["request_id"].as_str().unwrap()).await;
    wait_request(&api, rows[1][1]["request_id"].as_str().unwrap()).await;

    // Registry events: malformed envelope; no secret configured here, so accepted.
    let (code, _) = post(&format!("{api}/events/registry"), r#"{"events": 3}"#).await;
    assert_eq!(code, 400);
    let (code, answer) = post(
        &format!("{api}/events/registry"),
        json!({"events": [
            {"action": "pull", "target": {"repository": "demo/app", "mediaType": "application/vnd.oci.image.manifest.v1+json"}},
            {"action": "push", "target": {"repository": "demo/app", "mediaType": "application/octet-stream"}},
            {"action": "push", "target": {"repository": "Bad Name"}}
        ]})
        .to_string(),
    )
    .await;
    assert_eq!(
        (code, &answer["accepted"], &answer["ignored"]),
        (202, &json!(0), &json!(3)),
        "{answer}"
    );

    // Metrics parse as Prometheus text and agree with the store.
    let (code, text) = get(&format!("{api}/metrics")).await;
    assert_eq!(code, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    assert_eq!(value("spcs_scanner_images", &[("status", "scanned")]), 2.0);
    assert!(
        value(
            "spcs_scanner_cycles_total",
            &[("scope", "all"), ("result", "ok")]
        ) >= 1.0
    );
    assert!(value("spcs_scanner_registry_requests_total", &[("status", "200")]) > 0.0);
    assert!(
        value("spcs_scanner_registry_requests_total", &[("status", "401")]) > 0.0,
        "basic-auth challenge"
    );
    assert!(
        value(
            "spcs_scanner_jobs_total",
            &[("kind", "scan"), ("outcome", "scanned")]
        ) >= 3.0
    );
    for lane in ["manual", "new", "rematch"] {
        assert_eq!(value("spcs_scanner_queue_depth", &[("lane", lane)]), 0.0);
    }
    if using_standin() {
        assert!(value("spcs_scanner_vulndb_age_seconds", &[]) > 86_000.0);
    }
    assert!(!text.contains(PASSWORD));

    // The CLI clients.
    let out = cli(&["status", "--endpoint", &api]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("demo/app "))
        .unwrap_or_else(|| panic!("{stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["demo/app", "0", "0", "2", "0", "0"], "{stdout}");
    let out = cli(&["status", "--endpoint", &api, "--json"]);
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(parsed["images"]["total"], 2);
    let config = scanner.config_path().display().to_string();
    let out = cli(&["--config", &config, "rescan", "--image", "demo/app:2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("accepted: request "),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["rescan", "--image", "demo/app", "--endpoint", &api]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(field target)"));
    let out = cli(&["rescan", "--endpoint", &api]);
    assert_eq!(out.status.code(), Some(64), "a scope is required");

    // The status page in headless Chromium: the images table with the right counts.
    let dom = chromium_dom(&format!("{api}/"), scanner.dir.path());
    let rows = table_rows(&dom);
    assert_eq!(rows.len(), 2, "{dom}");
    let (_, images) = get_json(&format!("{api}/images")).await;
    let mut nonzero = 0;
    for image in images["images"].as_array().unwrap() {
        let digest = image["digest"].as_str().unwrap();
        let cells = &rows[digest];
        assert_eq!(cells["status"], "scanned");
        for (severity, count) in image["severities"].as_object().unwrap() {
            assert_eq!(
                cells[&severity.to_lowercase()],
                count.to_string(),
                "{severity} of {digest}"
            );
            nonzero += count.as_u64().unwrap();
        }
    }
    if using_standin() {
        assert!(nonzero > 0, "the fixture advisories match zlib1g");
    }
    assert!(dom.contains("Vulnerability DB") && dom.contains("Last cycle"));

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let out = cli(&["status", "--endpoint", &api]);
    assert_eq!(out.status.code(), Some(1), "no daemon: a runtime error");
}

/// Sends a request whose body never comes; returns the status the server answers with
/// (bounded wait).
async fn stalled_request(port: u16) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"POST /rescan HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{head}"))
}

/// Processes of group `pgid` that are not zombies, from /proc.
fn live_in_group(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// The DOM after load, from Debian's chromium in headless mode.
fn chromium_dom(url: &str, scratch: &Path) -> String {
    let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let out = Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", scratch.join("chromium").display()),
            "--dump-dom",
            url,
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {bin} (Debian package chromium; scripts/setup installs it): {e}")
        });
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Rows of `table#images` by digest: status and severity cells (as rendered).
fn table_rows(dom: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let table = dom
        .split("<table id=\"images\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no images table in\n{dom}"));
    let mut rows = BTreeMap::new();
    for row in table.split("<tr data-digest=\"").skip(1) {
        let digest = row.split('"').next().unwrap().to_string();
        let mut cells = BTreeMap::new();
        let status = row
            .split("data-status=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        cells.insert("status".to_string(), status.to_string());
        for cell in row.split("data-severity=\"").skip(1) {
            let (name, rest) = cell.split_once('"').unwrap();
            let value = rest
                .split_once('>')
                .and_then(|(_, r)| r.split_once('<'))
                .map(|(v, _)| v)
                .unwrap();
            cells.insert(name.to_string(), value.to_string());
        }
        rows.insert(digest, cells);
    }
    rows
}

#[tokio::test]
async fn a_registry_push_notification_scans_without_waiting_for_the_cron_tick() {
    const SECRET: &str = "event-secret-7c2e";
    // The daemon's API port is chosen first: the registry is told where to notify.
    let mut scanner = Scanner::new("http://127.0.0.1:1");
    let events_url = format!("{}/events/registry", scanner.api_url());
    let registry =
        TestRegistry::start(RegistryOptions::anonymous().notifying(&events_url, Some(SECRET)))
            .await;
    scanner.registry_url = registry.url();
    let secret_file = scanner.dir.path().join("event-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    scanner.api = format!(
        "event_secret_file = {:?}",
        secret_file.display().to_string()
    );
    let api = scanner.api_url();
    let mut daemon = scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |_| true)
        .await;
    daemon.wait_api(&api).await;

    // Without the secret, events are refused.
    let envelope = json!({"events": [{"action": "push", "target": {"repository": "demo/pushed", "tag": "1"}}]}).to_string();
    let (code, answer) = post(&format!("{api}/events/registry"), envelope.clone()).await;
    assert_eq!(
        (code, answer["field"].as_str()),
        (401, Some("Authorization")),
        "{answer}"
    );
    let r = http()
        .post(format!("{api}/events/registry"))
        .header("authorization", "Bearer wrong")
        .body(envelope)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A push: the registry notifies, the daemon lists that repository and scans.
    let pusher = Pusher::new(&registry.url(), None);
    let pushed_at = Instant::now();
    let image = push(&pusher, "demo/pushed", "1", b"pushed").await;
    let finished = daemon
        .wait_for("scan finished", 1, Duration::from_secs(120), |e| {
            e["digest"] == image.digest.as_str()
        })
        .await;
    let latency = pushed_at.elapsed();
    eprintln!("push-to-result latency: {} ms", latency.as_millis());
    let result = finished[0]["result"].as_str().expect("result file");
    assert!(scanner.output_dir().join(result).is_file());
    let scoped = daemon.events("scoped cycle finished");
    assert!(
        scoped
            .iter()
            .any(|e| e["scope"] == "repository:demo/pushed" && e["added"] == 1),
        "{}",
        daemon.output()
    );
    assert_eq!(
        daemon.events("cycle finished").len(),
        1,
        "no scheduled cycle ran (the cron is yearly)"
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        scanner.image(&image.digest).unwrap().status,
        ImageStatus::Scanned
    );
}

#[tokio::test]
async fn sighup_applies_a_good_config_keeps_a_broken_one_out_and_sigusr1_rescans() {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    push(&pusher, "demo/a", "1", b"a").await;
    let b = push(&pusher, "demo/b", "1", b"b").await;
    let mut scanner = Scanner::new(&registry.url());
    let api = scanner.api_url();
    let mut daemon = start(&scanner, 2).await;

    // A broken config: the reload fails, the daemon runs on with the old one.
    scanner.concurrency = 0;
    scanner.write_config();
    daemon.signal(Signal::SIGHUP);
    let failed = daemon
        .wait_for(
            "config reload failed; keeping the running config",
            1,
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("scanner.concurrency"),
        "{}",
        failed[0]
    );
    assert!(daemon.is_running());
    let (_, status) = get_json(&format!("{api}/status")).await;
    assert_eq!(status["config"]["scanner"]["concurrency"], 2);

    // A good one: schedule, filters and concurrency apply; log.level needs a restart.
    scanner.concurrency = 1;
    scanner.cron = "0 0 0 1 2 *".into();
    let text = std::fs::read_to_string(scanner.write_config()).unwrap();
    let text = text
        .replacen(
            "max_retries = 1\n",
            "max_retries = 1\nexclude = [\"demo/b\"]\n",
            1,
        )
        .replacen("level = \"info\"", "level = \"debug\"", 1);
    std::fs::write(scanner.config_path(), text).unwrap();
    daemon.signal(Signal::SIGHUP);
    let reloaded = daemon
        .wait_for("config reloaded", 1, Duration::from_secs(30), |_| true)
        .await;
    let applied: BTreeSet<String> = reloaded[0]["applied"]
        .as_str()
        .unwrap()
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|k| k.trim_matches('"').to_string())
        .collect();
    assert_eq!(
        applied,
        ["registry.exclude", "scanner.concurrency", "schedule.cron"]
            .map(String::from)
            .into(),
        "{}",
        reloaded[0]
    );
    assert!(
        reloaded[0]["needs_restart"]
            .as_str()
            .unwrap()
            .contains("log.level")
    );
    let (_, status) = get_json(&format!("{api}/status")).await;
    assert_eq!(status["config"]["scanner"]["concurrency"], 1);
    assert_eq!(status["config"]["schedule"]["cron"], "0 0 0 1 2 *");
    assert_eq!(
        status["config"]["log"]["level"], "info",
        "not applied without a restart"
    );
    let (code, answer) = post(
        &format!("{api}/rescan"),
        json!({"scope": "repository", "target": "demo/b"}).to_string(),
    )
    .await;
    assert_eq!(
        (code, answer["field"].as_str()),
        (400, Some("target")),
        "{answer}"
    );

    // SIGUSR1: a rescan of all, listing with the new filter: demo/b's tag is gone.
    daemon.signal(Signal::SIGUSR1);
    let cycle = daemon
        .wait_for("scoped cycle finished", 1, Duration::from_secs(60), |e| {
            e["scope"] == "all"
        })
        .await;
    assert_eq!(
        (cycle[0]["removed"].as_u64(), cycle[0]["tags"].as_u64()),
        (Some(1), Some(1)),
        "{}",
        cycle[0]
    );
    let (_, text) = get(&format!("{api}/metrics")).await;
    assert!(
        text.contains("spcs_scanner_config_reloads_total{result=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("spcs_scanner_config_reloads_total{result=\"failed\"} 1"),
        "{text}"
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert!(scanner.image(&b.digest).unwrap().tags.is_empty());
}

#[tokio::test]
async fn sigterm_during_a_scan_stops_in_time_leaves_no_scanner_and_the_digest_is_scanned_after_restart()
 {
    let (_registry, image, mut scanner) = one_image("demo/slow").await;
    // syft that announces its process group, then hangs with a child of its own.
    let hangs = hanging_wrapper(scanner.dir.path(), "syft-hangs", &support::daemon::syft());
    scanner.syft = hangs.script.clone();
    let mut daemon = scanner.spawn_run();
    wait_for_file(&hangs.started, Duration::from_secs(120)).await;
    let pgid = wait_for_pid(&hangs.pidfile, Duration::from_secs(5)).await;
    let stop = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let code = daemon.wait_exit(Duration::from_secs(30)).await;
    let took = stop.elapsed();
    assert_eq!(code, Some(0), "{}", daemon.output());
    assert!(took < Duration::from_secs(25), "stopped in {took:?}");
    eprintln!("SIGTERM during a scan: exited in {} ms", took.as_millis());
    // Nothing of the scanner's process group is left running (SIGKILL is delivered
    // asynchronously: bounded wait). Zombies of orphans wait for init to reap them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_in_group(pgid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        live_in_group(pgid),
        Vec::<i32>::new(),
        "scanner group {pgid} still running"
    );
    assert!(
        !daemon
            .events("scan stopped by shutdown; back to pending")
            .is_empty(),
        "{}",
        daemon.output()
    );
    assert_eq!(
        scanner.image(&image.digest).unwrap().status,
        ImageStatus::Pending
    );
    assert!(scanner.result_files().is_empty());
    assert!(
        scanner.failure_records().is_empty(),
        "a scan stopped by shutdown is no failure"
    );

    // After a restart (real syft) the digest is scanned.
    scanner.syft = support::daemon::syft();
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["scanned"], 1);
    assert_eq!(scanner.result_files()[&hex(&image.digest)].len(), 1);
    assert!(scanner.failure_records().is_empty());
}

#[tokio::test]
async fn a_burst_of_1000_rescans_for_one_image_queues_one_job_and_the_api_stays_responsive() {
    let (_registry, image, mut scanner) = one_image("demo/burst").await;
    // grype waits (bounded: 120 s) for the test while the gate file exists.
    let Gated {
        script,
        gate,
        started,
        release,
    } = gated_wrapper(scanner.dir.path(), "grype-gated", &support::daemon::grype());
    scanner.grype = Some(script);
    let api = scanner.api_url();
    let mut daemon = start(&scanner, 1).await;
    std::fs::write(&gate, b"").unwrap();

    let client = http();
    let body = json!({"scope": "image", "target": "demo/burst:1", "force": true}).to_string();
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..1000)
        .map(|_| {
            let client = client.clone();
            let body = body.clone();
            let url = format!("{api}/rescan");
            async move {
                let r = client.post(url).body(body).send().await.expect("POST");
                (r.status().as_u16(), r.json::<Value>().await.expect("json"))
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(answers.iter().all(|(code, _)| *code == 202));
    wait_for_file(&started, Duration::from_secs(120)).await;
    // Still answering while the scan runs.
    let (code, status) = get_json(&format!("{api}/status")).await;
    assert_eq!(code, 200);
    let ids: BTreeSet<&str> = answers
        .iter()
        .map(|(_, a)| a["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "the burst coalesced into one request: {ids:?}"
    );
    assert_eq!(status["queue"]["running"], 1, "{status}");
    std::fs::write(&release, b"go").unwrap();
    let id = ids.into_iter().next().unwrap();
    let done = wait_request(&api, id).await;
    assert_eq!(
        (
            done["coalesced"].as_u64(),
            done["jobs"].as_u64(),
            &done["outcomes"]
        ),
        (Some(999), Some(1), &json!({"scanned": 1})),
        "{done}"
    );
    let scans = daemon
        .events("scan started")
        .into_iter()
        .filter(|e| e["digest"] == image.digest.as_str())
        .count();
    assert_eq!(scans, 2, "one scan at start-up, one for the whole burst");
    assert_eq!(scanner.result_files()[&hex(&image.digest)].len(), 2);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn readyz_fails_without_a_usable_db_and_when_cycles_keep_failing() {
    // Nothing listens on the registry port: every cycle fails at once.
    let down = format!("http://127.0.0.1:{}", support::daemon::free_port());
    let mut scanner = Scanner::new(&down);
    scanner.cron = "* * * * * *".into();
    scanner.api = "ready_max_failing = \"2s\"".into();
    let api = scanner.api_url();
    let mut daemon = scanner.spawn_run();
    daemon.wait_api(&api).await;
    // The first failed cycle: not ready only once failing for longer than 2 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (code, ready) = loop {
        let (code, ready) = get_json(&format!("{api}/readyz")).await;
        if ready["checks"]["cycles"] != "ok" {
            break (code, ready);
        }
        assert!(Instant::now() < deadline, "no failed cycle: {ready}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        code, 200,
        "failing for less than ready_max_failing: {ready}"
    );
    assert!(
        ready["checks"]["cycles"]
            .as_str()
            .unwrap()
            .contains("within"),
        "{ready}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let (code, ready) = get_json(&format!("{api}/readyz")).await;
        if code == 503 {
            break ready;
        }
        assert!(Instant::now() < deadline, "still ready: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["ready"], false);
    assert!(
        ready["checks"]["cycles"]
            .as_str()
            .unwrap()
            .contains("ready_max_failing"),
        "{ready}"
    );
    assert_eq!(ready["checks"]["vulndb"], "ok");
    assert_eq!(
        get(&format!("{api}/healthz")).await.0,
        200,
        "alive all the same"
    );
    let (_, status) = get_json(&format!("{api}/status")).await;
    assert_eq!(status["last_cycle"]["ok"], false);
    assert!(
        status["recent_failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{status}"
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));

    // No DB at all: not ready, and the check says how to get one.
    if using_standin() {
        scanner.remove_db();
        scanner.cron = "0 0 0 1 1 *".into();
        let mut daemon = scanner.spawn_run();
        // After start-up has read the DB status (the first cycle follows it).
        daemon
            .wait_for(
                "cycle failed; will try again at the next tick",
                1,
                Duration::from_secs(60),
                |_| true,
            )
            .await;
        daemon.wait_api(&api).await;
        let (code, ready) = get_json(&format!("{api}/readyz")).await;
        assert_eq!(code, 503, "{ready}");
        assert!(
            ready["checks"]["vulndb"]
                .as_str()
                .unwrap()
                .contains("db import"),
            "{ready}"
        );
        assert_eq!(ready["checks"]["store"], "ok");
        daemon.signal(Signal::SIGTERM);
        assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    }
}
