//! API abuse against the running binary (issue 6, item 10): oversized bodies (413, also
//! when only the header announces them), malformed, mistyped and deeply nested JSON,
//! wrong content types, a slowloris client trickling its headers (cut off by the request
//! timeout while other clients are served), and bursts of rescans: 1,100 distinct scopes
//! while the control loop is busy (exactly the documented 1,024 wait, the rest get 503)
//! and 1,000 requests over eight scopes of one image (they coalesce, one scan). The
//! daemon's peak memory (VmHWM) stays bounded and `/healthz` answers throughout.
//!
//! `tests/control_plane.rs` already proves that 1,000 identical rescans are one request
//! and one job; these add distinct scopes, the waiting-request cap, bad bodies and the
//! memory bound.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use support::daemon::{Gated, RunningDaemon, Scanner, free_port, gated_wrapper, wait_for_file};
use support::oci::{DebianImage, ManifestFormat, Pusher};
use support::registry::TestRegistry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A generous bound on the daemon's peak resident memory under abuse.
const MAX_HWM_KB: u64 = 150 * 1024;

fn http() -> reqwest::Client {
    support::oci::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(200)
        .build()
        .expect("http client")
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = client.get(url).send().await.expect("GET");
    let status = r.status().as_u16();
    let body = r.text().await.expect("body");
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"));
    (status, v)
}

/// A daemon whose registry is a closed loopback port: its cycles fail, its API serves.
async fn daemon_without_registry(api_lines: &str) -> (Scanner, RunningDaemon) {
    let mut scanner = Scanner::new(&format!("http://127.0.0.1:{}", free_port()));
    scanner.api = api_lines.to_string();
    let mut daemon = scanner.spawn_run();
    daemon.wait_api(&scanner.api_url()).await;
    (scanner, daemon)
}

/// Keeps asking `/healthz` until `stop`; counts answers that were 200 and those that
/// were not (or failed).
fn health_poller(
    api: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let mut ok = 0u64;
        let mut bad = Vec::new();
        // Bounded: at most 10,000 probes.
        for _ in 0..10_000 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            match client.get(format!("{api}/healthz")).send().await {
                Ok(r) if r.status() == 200 => ok += 1,
                Ok(r) => bad.push(format!("status {}", r.status())),
                Err(e) => bad.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, bad)
    })
}

/// One connection that sends `head` and then trickles header bytes, one every 100 ms,
/// never ending the header block. Returns how many bytes it got to send before the
/// server closed the connection (or answered), and what the server sent; `None` if it
/// was still open after `max_bytes` bytes (the bound of this client).
async fn slowloris(port: u16, max_bytes: usize) -> Option<(usize, String)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let closed = tokio::spawn(async move {
        let mut buf = vec![0u8; 1024];
        let mut got = Vec::new();
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ";
    let mut sent = 0;
    for &b in head.iter().chain(std::iter::repeat_n(&b'a', max_bytes)) {
        if closed.is_finished() || write.write_all(&[b]).await.is_err() {
            let got = closed.await.expect("reader");
            return Some((sent, String::from_utf8_lossy(&got).to_string()));
        }
        sent += 1;
        if sent > head.len() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    closed.abort();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_client_is_cut_off_by_the_request_timeout_and_others_are_still_served() {
    let (scanner, mut daemon) = daemon_without_registry("request_timeout = \"2s\"").await;
    let api = scanner.api_url();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = health_poller(api.clone(), stop.clone());
    // 40 trickling clients at once; each gives up after 400 bytes (40 s).
    let clients: Vec<_> = (0..40)
        .map(|_| tokio::spawn(slowloris(scanner.api_port, 400)))
        .collect();
    let mut cut = Vec::new();
    for c in clients {
        cut.push(c.await.expect("slowloris task"));
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, bad) = poller.await.expect("poller");
    for (i, c) in cut.iter().enumerate() {
        let Some((sent, answer)) = c else {
            panic!(
                "slowloris client {i} still connected after 40 s of trickled headers: \
                 api.request_timeout (2s) does not apply to reading the request head\n{}",
                daemon.output()
            );
        };
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "client {i} was cut off after {sent} bytes with {answer:?}"
        );
    }
    assert!(
        bad.is_empty(),
        "/healthz failed during the slowloris: {bad:?}"
    );
    assert!(ok >= 5, "/healthz kept answering: {ok} answers");
    assert!(daemon.is_running());
    let hwm = daemon.peak_rss_kib();
    assert!(hwm < MAX_HWM_KB, "VmHWM {hwm} kB");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    support::reliability::record(support::reliability::Tried {
        area: "api",
        fault: "40 slowloris clients trickle request headers one byte per 100 ms (api.request_timeout 2s)",
        runs: 40,
        outcome: &format!(
            "each connection closed by the daemon; /healthz answered {ok} times meanwhile; VmHWM {} MB",
            hwm / 1024
        ),
        lost: 0,
        test: "faults_api::a_slowloris_client_is_cut_off_by_the_request_timeout_and_others_are_still_served",
    });
}

/// A bad request and what it must get.
struct Bad {
    what: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// The `field` a 400 must name.
    field: Option<&'static str>,
}

/// A status and body, or why there was no answer.
type Answer = Result<(u16, String), String>;

fn nested(depth: usize, open: &str, close: &str) -> String {
    format!("{}{}", open.repeat(depth), close.repeat(depth))
}

fn bad_requests() -> Vec<Bad> {
    let j = Some("application/json");
    let b = |s: &str| s.as_bytes().to_vec();
    vec![
        Bad {
            what: "a body of 70,000 bytes (limit 65,536)",
            path: "/rescan",
            content_type: j,
            body: format!(
                "{{\"scope\":\"all\",\"target\":\"{}\"}}",
                "x".repeat(70_000)
            )
            .into_bytes(),
            status: 413,
            field: None,
        },
        Bad {
            what: "a service-function body of 1 MB",
            path: "/functions/rescan",
            content_type: j,
            body: format!("{{\"data\":[[0,\"{}\"]]}}", "y".repeat(1 << 20)).into_bytes(),
            status: 413,
            field: None,
        },
        Bad {
            what: "a registry event body of 200 kB",
            path: "/events/registry",
            content_type: j,
            body: format!("{{\"events\":[],\"pad\":\"{}\"}}", "z".repeat(200_000)).into_bytes(),
            status: 413,
            field: None,
        },
        Bad {
            what: "truncated JSON",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"all\""),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "not JSON at all",
            path: "/rescan",
            content_type: j,
            body: b("rescan everything please"),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "an empty body",
            path: "/rescan",
            content_type: j,
            body: Vec::new(),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "invalid UTF-8",
            path: "/rescan",
            content_type: j,
            body: vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "trailing garbage after the JSON",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\":\"all\"} {\"scope\":\"all\"}"),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "a JSON array instead of an object",
            path: "/rescan",
            content_type: j,
            body: b("[\"all\"]"),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "scope of the wrong type",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": 5}"),
            status: 400,
            field: Some("scope"),
        },
        Bad {
            what: "an unknown scope",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"galaxy\"}"),
            status: 400,
            field: Some("scope"),
        },
        Bad {
            what: "target of the wrong type",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"image\", \"target\": [\"a\"]}"),
            status: 400,
            field: Some("target"),
        },
        Bad {
            what: "force of the wrong type",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"all\", \"force\": \"yes\"}"),
            status: 400,
            field: Some("force"),
        },
        Bad {
            what: "a path-traversal target",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"repository\", \"target\": \"../../etc\"}"),
            status: 400,
            field: Some("target"),
        },
        Bad {
            what: "a target with control characters",
            path: "/rescan",
            content_type: j,
            body: b("{\"scope\": \"image\", \"target\": \"a/b:\\u0000\\n1\"}"),
            status: 400,
            field: Some("target"),
        },
        Bad {
            what: "arrays nested 20,000 deep in a field",
            path: "/rescan",
            content_type: j,
            body: format!("{{\"scope\":{}}}", nested(20_000, "[", "]")).into_bytes(),
            status: 400,
            field: None,
        },
        Bad {
            what: "objects nested 6,000 deep",
            path: "/rescan",
            content_type: j,
            body: format!("{}1{}", "{\"a\":".repeat(6_000), "}".repeat(6_000)).into_bytes(),
            status: 400,
            field: None,
        },
        Bad {
            what: "a service-function row nested 20,000 deep",
            path: "/functions/rescan",
            content_type: j,
            body: format!("{{\"data\":[[0,{}]]}}", nested(20_000, "[", "]")).into_bytes(),
            status: 400,
            field: None,
        },
        Bad {
            what: "a registry event nested 20,000 deep",
            path: "/events/registry",
            content_type: j,
            body: format!("{{\"events\":{}}}", nested(20_000, "[", "]")).into_bytes(),
            status: 400,
            field: None,
        },
        Bad {
            what: "a form-encoded body",
            path: "/rescan",
            content_type: Some("application/x-www-form-urlencoded"),
            body: b("scope=all&force=true"),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "a multipart body",
            path: "/rescan",
            content_type: Some("multipart/form-data; boundary=xyz"),
            body: b(
                "--xyz\r\nContent-Disposition: form-data; name=\"scope\"\r\n\r\nall\r\n--xyz--\r\n",
            ),
            status: 400,
            field: Some("body"),
        },
        Bad {
            what: "service-function data that is not a list",
            path: "/functions/rescan",
            content_type: j,
            body: b("{\"data\": \"all\"}"),
            status: 400,
            field: Some("data"),
        },
        Bad {
            what: "a service-function row without a row number",
            path: "/functions/rescan",
            content_type: j,
            body: b("{\"data\": [[\"all\"]]}"),
            status: 400,
            field: Some("data[0][0]"),
        },
        Bad {
            what: "registry events that are not a list",
            path: "/events/registry",
            content_type: j,
            body: b("{\"events\": {\"action\": \"push\"}}"),
            status: 400,
            field: Some("events"),
        },
        Bad {
            what: "an unknown endpoint",
            path: "/rescan/../../etc/passwd",
            content_type: j,
            body: b("{}"),
            status: 404,
            field: None,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_bodies_get_4xx_with_a_json_error_and_the_daemon_stays_up() {
    let (scanner, mut daemon) = daemon_without_registry("").await;
    let api = scanner.api_url();
    let client = http();
    let bad = bad_requests();
    const COPIES: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = health_poller(api.clone(), stop.clone());
    // Every bad request COPIES times, interleaved, 50 in flight.
    let answers: Vec<(usize, Answer)> =
        futures::stream::iter((0..bad.len() * COPIES).map(|i| i % bad.len()))
            .map(|i| {
                let client = client.clone();
                let b = &bad[i];
                let mut request = client.post(format!("{api}{}", b.path)).body(b.body.clone());
                if let Some(ct) = b.content_type {
                    request = request.header("content-type", ct);
                }
                async move {
                    let answer = match request.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            Ok((status, r.text().await.unwrap_or_default()))
                        }
                        Err(e) => Err(format!("{e:?}")),
                    };
                    (i, answer)
                }
            })
            .buffer_unordered(50)
            .collect()
            .await;
    stop.store(true, Ordering::SeqCst);
    let (ok, unhealthy) = poller.await.expect("poller");
    let mut misses = Vec::new();
    for (i, answer) in &answers {
        let b = &bad[*i];
        let (status, body) = match answer {
            Ok(a) => a,
            Err(e) => {
                misses.push(format!("{}: no answer: {e}", b.what));
                continue;
            }
        };
        if *status != b.status {
            misses.push(format!("{}: {status}, not {}: {body}", b.what, b.status));
            continue;
        }
        let parsed: Value = match serde_json::from_str(body) {
            Ok(v) => v,
            Err(e) => {
                misses.push(format!("{}: the error is not JSON ({e}): {body}", b.what));
                continue;
            }
        };
        if !parsed["error"].is_string() {
            misses.push(format!("{}: no \"error\": {body}", b.what));
        }
        if let Some(field) = b.field {
            if parsed["field"] != field {
                misses.push(format!("{}: field is not {field:?}: {body}", b.what));
            }
        }
    }
    misses.sort();
    misses.dedup();
    assert!(misses.is_empty(), "{}", misses.join("\n"));
    assert!(unhealthy.is_empty(), "/healthz failed: {unhealthy:?}");
    assert!(ok >= 1);

    // A header announcing 100 MB is refused before the body is read: the answer comes
    // although only a few bytes of the body were sent.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", scanner.api_port))
        .await
        .expect("connect");
    stream
        .write_all(b"POST /rescan HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"scope\":")
        .await
        .expect("write head");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("an answer within 20 s without the body")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "the unread body makes the connection unusable: {head}"
    );

    // Wrong content types do not matter when the body is good JSON: the body decides.
    for ct in [None, Some("text/plain"), Some("application/octet-stream")] {
        let mut request = client
            .post(format!("{api}/rescan"))
            .body(r#"{"scope": "repository", "target": "demo/content-type"}"#);
        if let Some(ct) = ct {
            request = request.header("content-type", ct);
        }
        let r = request.send().await.expect("POST");
        assert_eq!(r.status(), 202, "content type {ct:?}");
    }
    // Methods the endpoints do not take.
    for (method, path) in [
        (reqwest::Method::GET, "/rescan"),
        (reqwest::Method::PUT, "/rescan"),
        (reqwest::Method::DELETE, "/images"),
        (reqwest::Method::POST, "/healthz"),
    ] {
        let r = client
            .request(method.clone(), format!("{api}{path}"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 405, "{method} {path}");
    }

    let (code, health) = get_json(&client, &format!("{api}/healthz")).await;
    assert_eq!((code, &health["status"]), (200, &json!("alive")));
    let (code, _) = get_json(&client, &format!("{api}/status")).await;
    assert_eq!(code, 200);
    assert!(daemon.is_running());
    let hwm = daemon.peak_rss_kib();
    assert!(hwm < MAX_HWM_KB, "VmHWM {hwm} kB");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    for b in &bad {
        support::reliability::record(support::reliability::Tried {
            area: "api",
            fault: &format!("POST {} with {}", b.path, b.what),
            runs: COPIES as u64,
            outcome: &format!(
                "{}{} with a JSON error; daemon up, VmHWM {} MB",
                b.status,
                b.field
                    .map(|f| format!(" naming `{f}`"))
                    .unwrap_or_default(),
                hwm / 1024
            ),
            lost: 0,
            test: "faults_api::bad_bodies_get_4xx_with_a_json_error_and_the_daemon_stays_up",
        });
    }
    support::reliability::record(support::reliability::Tried {
        area: "api",
        fault: "Content-Length of 100 MB announced, body never sent",
        runs: 1,
        outcome: "413 at once, before reading the body",
        lost: 0,
        test: "faults_api::bad_bodies_get_4xx_with_a_json_error_and_the_daemon_stays_up",
    });
    support::reliability::record(support::reliability::Tried {
        area: "api",
        fault: "good JSON with no, text/plain or octet-stream content type",
        runs: 3,
        outcome: "202: the body decides, not the header",
        lost: 0,
        test: "faults_api::bad_bodies_get_4xx_with_a_json_error_and_the_daemon_stays_up",
    });
}

/// Waits (bounded) until no request is unfinished; returns the last `/status`.
async fn wait_drained(client: &reqwest::Client, api: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, status) = get_json(client, &format!("{api}/status")).await;
        assert_eq!(code, 200);
        if status["requests"].as_array().is_some_and(Vec::is_empty) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "requests still unfinished after {timeout:?}: {}",
            status["requests"].as_array().map_or(0, Vec::len)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rescan_bursts_over_distinct_scopes_are_capped_coalesced_and_bounded_in_memory() {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let image = pusher
        .push_image(
            "demo/abuse",
            "1",
            &DebianImage::default().with_file("etc/marker", b"abuse".to_vec()),
            ManifestFormat::Oci,
        )
        .await
        .expect("push image");
    let mut scanner = Scanner::new(&registry.url());
    // grype waits (bounded: 120 s) for the test while the gate file exists.
    let Gated {
        script,
        gate,
        started,
        release,
    } = gated_wrapper(scanner.dir.path(), "grype-gated", &support::daemon::grype());
    scanner.grype = Some(script);
    let api = scanner.api_url();
    let client = http();
    // The start-up cycle's scan holds in grype: the cycle (and so the control loop)
    // is busy, and every request must wait.
    std::fs::write(&gate, b"").unwrap();
    let mut daemon = scanner.spawn_run();
    wait_for_file(&started, Duration::from_secs(120)).await;
    daemon.wait_api(&api).await;

    // Phase 1: 1,100 distinct scopes (repositories that do not exist) while nothing
    // can start: 1,024 wait, the rest are refused with 503.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = health_poller(api.clone(), stop.clone());
    let peak = Arc::new(AtomicU64::new(0));
    let answers: Vec<(u16, Value)> = futures::stream::iter(0..1100)
        .map(|i| {
            let client = client.clone();
            let url = format!("{api}/rescan");
            let body =
                json!({"scope": "repository", "target": format!("burst/r{i:04}")}).to_string();
            async move {
                let r = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("POST");
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.expect("a JSON answer"))
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    peak.fetch_max(daemon.peak_rss_kib(), Ordering::SeqCst);
    let accepted: BTreeSet<&str> = answers
        .iter()
        .filter(|(code, _)| *code == 202)
        .map(|(_, a)| a["request_id"].as_str().expect("request_id"))
        .collect();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|(code, _)| *code == 503)
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        answers.len(),
        accepted.len() + refused.len(),
        "only 202 or 503: {:?}",
        answers
            .iter()
            .filter(|(c, _)| *c != 202 && *c != 503)
            .collect::<Vec<_>>()
    );
    assert_eq!(accepted.len(), 1024, "exactly 1,024 distinct requests wait");
    assert_eq!(refused.len(), 76);
    assert!(
        refused
            .iter()
            .all(|a| a["error"].as_str().is_some_and(|e| e.contains("1024"))),
        "{refused:?}"
    );
    let (_, status) = get_json(&client, &format!("{api}/status")).await;
    assert_eq!(status["requests"].as_array().map(Vec::len), Some(1024));

    // Let the cycle finish: every waiting request runs (its repository lists as absent)
    // and queues nothing.
    std::fs::write(&release, b"go").unwrap();
    wait_drained(&client, &api, Duration::from_secs(180)).await;
    peak.fetch_max(daemon.peak_rss_kib(), Ordering::SeqCst);
    let mut jobs = 0;
    let mut done = 0;
    for id in &accepted {
        let (code, r) = get_json(&client, &format!("{api}/rescan/{id}")).await;
        // Only the newest 512 finished requests are kept for lookup.
        if code == 404 {
            continue;
        }
        assert_eq!(code, 200, "{r}");
        assert!(r["state"] == "done" || r["state"] == "failed", "{r}");
        jobs += r["jobs"].as_u64().expect("jobs");
        done += 1;
    }
    assert!(done >= 500, "the newest requests can be looked up: {done}");
    assert_eq!(jobs, 0, "absent repositories queue nothing");

    // Phase 2: 1,000 requests over eight scopes of the one image, forced and not, while
    // the forced scan holds in grype: each forced scope is one request, and the image
    // is scanned once for all of them.
    std::fs::remove_file(&started).unwrap();
    std::fs::remove_file(&release).unwrap();
    let digest = image.digest.to_string();
    let targets: Vec<Value> = [true, false]
        .into_iter()
        .flat_map(|force| {
            [
                json!({"scope": "all", "force": force}),
                json!({"scope": "repository", "target": "demo/abuse", "force": force}),
                json!({"scope": "image", "target": "demo/abuse:1", "force": force}),
                json!({"scope": "image", "target": format!("demo/abuse@{digest}"), "force": force}),
            ]
        })
        .collect();
    let scans_before = daemon
        .events("scan started")
        .into_iter()
        .filter(|e| e["digest"] == digest.as_str())
        .count();
    assert_eq!(scans_before, 1, "the start-up scan");
    let answers: Vec<(usize, u16, Value)> = futures::stream::iter(0..1000)
        .map(|i| {
            let client = client.clone();
            let url = format!("{api}/rescan");
            let which = i % targets.len();
            let body = targets[which].to_string();
            async move {
                let r = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("POST");
                let status = r.status().as_u16();
                (
                    which,
                    status,
                    r.json::<Value>().await.expect("a JSON answer"),
                )
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    wait_for_file(&started, Duration::from_secs(120)).await;
    peak.fetch_max(daemon.peak_rss_kib(), Ordering::SeqCst);
    assert!(
        answers.iter().all(|(_, code, _)| *code == 202),
        "all accepted"
    );
    let mut ids: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (which, _, a) in &answers {
        ids.entry(*which)
            .or_default()
            .insert(a["request_id"].as_str().expect("id").to_string());
    }
    // Requests for one scope coalesce while one is unfinished, and a request that finds
    // the image being scanned joins that scan (it stays unfinished until the scan ends):
    // 1,000 asks over 8 scopes make exactly one request per scope.
    assert!(
        ids.len() == targets.len() && ids.values().all(|set| set.len() == 1),
        "1,000 asks over 8 scopes must make one request each: {ids:?}"
    );
    let (_, status) = get_json(&client, &format!("{api}/status")).await;
    assert_eq!(
        status["queue"]["running"], 1,
        "one scan runs: {}",
        status["queue"]
    );
    let queued: u64 = status["queue"]["depth"]
        .as_object()
        .map(|lanes| lanes.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(
        queued, 0,
        "1,000 asks for one image queue nothing beside the running scan: {}",
        status["queue"]
    );
    std::fs::write(&release, b"go").unwrap();
    wait_drained(&client, &api, Duration::from_secs(180)).await;
    stop.store(true, Ordering::SeqCst);
    let (ok, unhealthy) = poller.await.expect("poller");
    let scans = daemon
        .events("scan started")
        .into_iter()
        .filter(|e| e["digest"] == digest.as_str())
        .count();
    assert_eq!(
        scans, 2,
        "one scan for the start-up, one for the whole burst"
    );
    assert!(
        unhealthy.is_empty(),
        "/healthz failed during the bursts: {unhealthy:?}"
    );
    assert!(ok >= 10, "/healthz answered throughout: {ok}");
    peak.fetch_max(daemon.peak_rss_kib(), Ordering::SeqCst);
    let hwm = peak.load(Ordering::SeqCst);
    assert!(hwm < MAX_HWM_KB, "VmHWM {hwm} kB");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let results = scanner.result_files();
    let hex = digest.trim_start_matches("sha256:");
    assert_eq!(results.get(hex).map(Vec::len), Some(2), "{results:?}");
    let image_record = scanner.image(&digest).expect("image in state");
    assert_eq!(
        image_record.status,
        spcs_image_scanner::state::ImageStatus::Scanned
    );
    support::reliability::record(support::reliability::Tried {
        area: "api",
        fault: "1,100 rescans of distinct repositories while a cycle holds the control loop",
        runs: 1100,
        outcome: &format!(
            "1,024 accepted and run after the cycle, 76 refused with 503; 0 jobs; /healthz answered; VmHWM {} MB",
            hwm / 1024
        ),
        lost: 0,
        test: "faults_api::rescan_bursts_over_distinct_scopes_are_capped_coalesced_and_bounded_in_memory",
    });
    support::reliability::record(support::reliability::Tried {
        area: "api",
        fault: "1,000 rescans over 8 scopes (all, repository, tag, digest; forced or not) of one image during its scan",
        runs: 1000,
        outcome: "coalesced into one request per scope (8); the image scanned once for the burst; both results kept",
        lost: 0,
        test: "faults_api::rescan_bursts_over_distinct_scopes_are_capped_coalesced_and_bounded_in_memory",
    });
}
