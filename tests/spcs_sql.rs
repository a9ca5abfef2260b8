//! The SPCS fast path (`registry.listing = "sql"`): each image repository listed with one
//! `SHOW IMAGES IN IMAGE REPOSITORY` through Snowflake's SQL API v2, checked against and
//! falling back to the registry API.
//!
//! Real parts: the real binary (`once` and `run`), a real `docker-registry` with Basic
//! auth as SPCS does it (user `0auth2accesstoken`, the session token as password), real
//! syft. The SQL API is a loopback server written here that speaks the documented shapes
//! (ResultSet, QueryStatus 202, QueryFailureStatus 422, 401, partitions) and records every
//! request, so the tests check the request itself (method, path, `requestId`, headers,
//! token, statement) and count requests on both servers.
//!
//! Covered: the same tags → digests as the registry path at one SQL request per image
//! repository and no tag list or per-tag HEAD after the first check; 202 polling and
//! partitions; 422, 500, garbage JSON and a timeout falling back per image repository; a
//! digest mismatch falling back for good; 401 re-reading the token and retrying once;
//! hostile rows skipped and counted; the token never in the logs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::{Auth, RunningDaemon, Scanner, wait_with_timeout};
use support::http1;
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{LoggedRequest, RegistryOptions, TestRegistry};
use tokio::io::AsyncWriteExt as _;

/// User-Agent prefix of the daemon's own requests (syft's differ).
const DAEMON_UA: &str = "spcs-image-scanner/";
const SPCS_USER: &str = "0auth2accesstoken";
const STATEMENTS: &str = "/api/v2/statements";

// ---------------------------------------------------------------------------------------
// A loopback SQL API server.

/// One request the SQL server received.
#[derive(Debug, Clone)]
struct SqlRequest {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    /// Lower-case names.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl SqlRequest {
    fn statement(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v["statement"].as_str().map(str::to_string)
    }

    fn is_post(&self) -> bool {
        self.method == "POST" && self.path == STATEMENTS
    }
}

/// An answer: status, extra headers, body, and how long to wait before sending it.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: serde_json::to_vec(body).unwrap(),
            delay: Duration::ZERO,
        }
    }

    fn raw(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }
}

type Handler = Arc<dyn Fn(&SqlRequest) -> Reply + Send + Sync>;

/// The SQL API stand-in, on a runtime and thread of its own (the tests block their own
/// thread waiting for `once`). One request per connection (`Connection: close`).
struct SqlServer {
    port: u16,
    log: Arc<Mutex<Vec<SqlRequest>>>,
    /// Statement POSTs answered; later ones wait (bounded) until this grows. Lets a test
    /// hold the next cycle at its first request while it counts the previous one.
    allow: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SqlServer {
    fn start(handler: impl Fn(&SqlRequest) -> Reply + Send + Sync + 'static) -> SqlServer {
        let handler: Handler = Arc::new(handler);
        let log = Arc::new(Mutex::new(Vec::new()));
        let allow = Arc::new(AtomicUsize::new(usize::MAX));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind SQL server");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (l2, a2) = (log.clone(), allow.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let posts = Arc::new(AtomicUsize::new(0));
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let (h, l, a, p) = (handler.clone(), l2.clone(), a2.clone(), posts.clone());
                            tokio::spawn(async move { serve(socket, h, l, a, p).await });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        SqlServer {
            port,
            log,
            allow,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<SqlRequest> {
        self.log.lock().unwrap().clone()
    }

    fn posts(&self) -> Vec<SqlRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_post())
            .collect()
    }

    fn posts_for(&self, identifier: &str) -> usize {
        let want = format!("SHOW IMAGES IN IMAGE REPOSITORY {identifier}");
        self.posts()
            .iter()
            .filter(|r| r.statement().as_deref() == Some(want.as_str()))
            .count()
    }

    async fn wait_posts(&self, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.posts().len() < count {
            assert!(
                Instant::now() < deadline,
                "no {count} statement POSTs within {timeout:?}: {:#?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SqlServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    handler: Handler,
    log: Arc<Mutex<Vec<SqlRequest>>>,
    allow: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    log.lock().unwrap().push(request.clone());
    if request.is_post() {
        let n = posts.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while n >= allow.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                let _ = write_reply(&mut socket, &Reply::raw(503, "{}")).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let reply = handler(&request);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let _ = write_reply(&mut socket, &reply).await;
}

/// One request off `socket` (bounded: a silent client is dropped after 10 s).
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<SqlRequest> {
    let mut reader = tokio::io::BufReader::new(socket);
    let request = tokio::time::timeout(Duration::from_secs(10), http1::read_request(&mut reader))
        .await
        .ok()??;
    let query = request
        .target
        .split_once('?')
        .map(|(_, q)| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    Some(SqlRequest {
        method: request.method.clone(),
        path: request.path().to_string(),
        query,
        headers: request.headers.into_iter().collect(),
        body: request.body,
    })
}

async fn write_reply(socket: &mut tokio::net::TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(&reply.body).await?;
    socket.shutdown().await
}

/// The SHOW IMAGES columns, in the documented order.
fn row_type() -> Value {
    json!(
        ["created_on", "image_name", "tags", "digest", "image_path"]
            .iter()
            .map(|n| json!({"name": n, "type": "text", "nullable": true}))
            .collect::<Vec<_>>()
    )
}

/// One SHOW IMAGES row: `tags` as the JSON-array string Snowflake prints.
fn row(image_repository: &str, image: &str, tags: &[&str], digest: &str) -> Value {
    let first = tags.first().copied().unwrap_or("");
    json!([
        "1764806400.000000000",
        image,
        serde_json::to_string_pretty(&tags).unwrap(),
        digest,
        format!("{image_repository}/{image}:{first}"),
    ])
}

/// A ResultSet with `rows` in partition 0 and `partitions` entries in `partitionInfo`.
fn result_set(rows: &[Value], partitions: usize, handle: &str) -> Value {
    let info: Vec<Value> = (0..partitions.max(1))
        .map(|_| json!({"rowCount": rows.len(), "uncompressedSize": 100}))
        .collect();
    json!({
        "resultSetMetaData": {
            "numRows": rows.len(),
            "format": "jsonv2",
            "rowType": row_type(),
            "partitionInfo": info,
        },
        "data": rows,
        "code": "090001",
        "statementStatusUrl": format!("{STATEMENTS}/{handle}"),
        "sqlState": "00000",
        "statementHandle": handle,
        "message": "Statement executed successfully.",
        "createdOn": 1_764_806_400_000u64,
    })
}

/// `db.schema.repo` from a statement, when it is the SHOW IMAGES the daemon should send.
fn shown_repository(req: &SqlRequest) -> Option<String> {
    req.statement()?
        .strip_prefix("SHOW IMAGES IN IMAGE REPOSITORY ")
        .map(str::to_string)
}

/// Asserts the documented request shape on every request the server saw, with `tokens`
/// the tokens that may be presented.
fn assert_requests_well_formed(server: &SqlServer, tokens: &[&str]) {
    let requests = server.requests();
    assert!(!requests.is_empty(), "no SQL request at all");
    let show_images = regex::Regex::new(
        r"^SHOW IMAGES IN IMAGE REPOSITORY [a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$",
    )
    .unwrap();
    for r in &requests {
        let bearer = r.headers.get("authorization").cloned().unwrap_or_default();
        assert!(
            tokens.iter().any(|t| bearer == format!("Bearer {t}")),
            "Authorization {bearer:?} is not Bearer <token file>: {r:?}"
        );
        assert_eq!(
            r.headers
                .get("x-snowflake-authorization-token-type")
                .map(String::as_str),
            Some("OAUTH"),
            "{r:?}"
        );
        assert_eq!(
            r.headers.get("accept").map(String::as_str),
            Some("application/json")
        );
        assert!(
            r.headers
                .get("user-agent")
                .is_some_and(|u| u.starts_with(DAEMON_UA)),
            "{r:?}"
        );
        if r.method == "POST" {
            assert_eq!(r.path, STATEMENTS, "{r:?}");
            assert_eq!(
                r.headers.get("content-type").map(String::as_str),
                Some("application/json")
            );
            let id = r.query.get("requestId").expect("requestId");
            assert!(uuid::Uuid::parse_str(id).is_ok(), "requestId {id:?}");
            let body: Value = serde_json::from_slice(&r.body).expect("JSON body");
            let statement = body["statement"].as_str().expect("statement");
            assert!(show_images.is_match(statement), "statement {statement:?}");
            assert!(body["timeout"].as_u64().is_some_and(|t| t > 0), "{body}");
        } else {
            assert_eq!(r.method, "GET", "{r:?}");
            assert!(
                r.path.starts_with(&format!("{STATEMENTS}/")),
                "poll or partition outside /api/v2/statements/: {r:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running the daemon with extra [registry] keys (Scanner writes a fixed [registry]).

/// Writes the scanner's config with `registry_lines` added to `[registry]` and
/// `request_timeout` replaced.
fn write_config(scanner: &Scanner, registry_lines: &str, request_timeout: &str, level: &str) {
    scanner.write_config();
    let text = std::fs::read_to_string(scanner.config_path()).unwrap();
    let text = text
        .replacen(
            "[registry]\n",
            &format!("[registry]\n{registry_lines}\n"),
            1,
        )
        .replacen(
            "request_timeout = \"5s\"",
            &format!("request_timeout = {request_timeout:?}"),
            1,
        )
        .replacen("level = \"info\"", &format!("level = {level:?}"), 1);
    std::fs::write(scanner.config_path(), text).unwrap();
}

fn command(scanner: &Scanner, args: &[&str]) -> Command {
    let mut cmd = support::daemon::command(&scanner.config_path(), args);
    cmd.env_remove("SNOWFLAKE_HOST");
    cmd
}

struct Once {
    code: Option<i32>,
    output: String,
}

impl Once {
    fn events(&self, message: &str) -> Vec<Value> {
        events(&self.output, message)
    }
}

fn events(output: &str, message: &str) -> Vec<Value> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// `once` with the config as written, bounded.
fn run_once(scanner: &Scanner) -> Once {
    let child = command(scanner, &["once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn once");
    let out = wait_with_timeout(child, Duration::from_secs(90));
    Once {
        code: out.status.code(),
        output: format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures.

/// A registry with SPCS-style auth (Basic, `0auth2accesstoken` + the token).
async fn spcs_registry(token: &str) -> (TestRegistry, Pusher) {
    let registry = TestRegistry::start(RegistryOptions::htpasswd(SPCS_USER, token)).await;
    let pusher = Pusher::new(&registry.url(), Some((SPCS_USER, token)));
    (registry, pusher)
}

fn image(n: u8) -> DebianImage {
    DebianImage::default().with_file("etc/variant", vec![b'0' + n])
}

async fn push(pusher: &Pusher, repo: &str, tag: &str, n: u8) -> PushedManifest {
    pusher
        .push_image(repo, tag, &image(n), ManifestFormat::Oci)
        .await
        .unwrap_or_else(|e| panic!("push {repo}:{tag}: {e:?}"))
}

/// A scanner with SPCS auth, the given repositories (an explicit list: the test
/// registry has no per-image-repository catalog) and image repositories.
fn spcs_scanner(registry: &TestRegistry, token: &str) -> Scanner {
    let mut scanner = Scanner::new(&registry.url());
    scanner.auth = Auth::Spcs {
        token: token.to_string(),
    };
    scanner
}

fn registry_keys(
    repositories: &[&str],
    image_repositories: &[&str],
    sql: Option<(&SqlServer, usize)>,
) -> String {
    let mut text = format!(
        "repositories = {}\nimage_repositories = {}\n",
        json!(repositories),
        json!(image_repositories)
    );
    if let Some((server, sample)) = sql {
        text.push_str(&format!(
            "listing = \"sql\"\nsql_url = {:?}\nsql_verify_sample = {sample}\n",
            server.url()
        ));
    }
    text
}

/// The config for one image `db/schema/repo/app`, listed through `server`.
fn write_one_app_config(scanner: &Scanner, server: &SqlServer, level: &str) {
    write_config(
        scanner,
        &registry_keys(
            &["db/schema/repo/app"],
            &["db/schema/repo"],
            Some((server, 1)),
        ),
        "5s",
        level,
    );
}

/// `(repository, tag) → digest` in the store.
fn store_tags(scanner: &Scanner) -> BTreeMap<(String, String), String> {
    scanner
        .tags()
        .into_iter()
        .map(|t| ((t.repository, t.tag), t.digest.to_string()))
        .collect()
}

fn expected(pairs: &[(&str, &str, &PushedManifest)]) -> BTreeMap<(String, String), String> {
    pairs
        .iter()
        .map(|(r, t, m)| ((r.to_string(), t.to_string()), m.digest.clone()))
        .collect()
}

/// The daemon's own requests, without the 401 that teaches it the auth scheme once per
/// process (syft's requests have another User-Agent).
fn daemon_requests(requests: &[LoggedRequest]) -> Vec<&LoggedRequest> {
    requests
        .iter()
        .filter(|r| r.user_agent_starts_with(DAEMON_UA) && r.status != 401)
        .collect()
}

fn count(requests: &[&LoggedRequest], pred: impl Fn(&LoggedRequest) -> bool) -> usize {
    requests.iter().filter(|r| pred(r)).count()
}

fn is_tag_list(r: &LoggedRequest) -> bool {
    r.path
        .split('?')
        .next()
        .unwrap_or("")
        .ends_with("/tags/list")
}

fn is_catalog(r: &LoggedRequest) -> bool {
    r.path
        .split('?')
        .next()
        .unwrap_or("")
        .ends_with("/_catalog")
}

fn assert_no_token(output: &str, scanner: &Scanner, tokens: &[&str]) {
    for token in tokens {
        assert!(
            !output.contains(token),
            "the session token {token:?} appears in the daemon's output"
        );
        for dir in [scanner.output_dir(), scanner.state_dir()] {
            assert_no_file_contains(&dir, token);
        }
    }
}

fn assert_no_file_contains(dir: &std::path::Path, needle: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            assert_no_file_contains(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains the token",
                path.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

#[tokio::test]
async fn sql_listing_matches_the_registry_path_with_one_request_per_image_repository() {
    let token = "tok-SQL-one-8c1f0a";
    let (registry, pusher) = spcs_registry(token).await;
    let a = push(&pusher, "db/schema/repo/app", "1", 1).await;
    push(&pusher, "db/schema/repo/app", "latest", 1).await;
    let b = push(&pusher, "db/schema/repo/app", "2", 2).await;
    push(&pusher, "db/schema/repo/tool", "v1", 1).await;
    push(&pusher, "db/schema/second/svc", "1", 1).await;
    let want = expected(&[
        ("db/schema/repo/app", "1", &a),
        ("db/schema/repo/app", "latest", &a),
        ("db/schema/repo/app", "2", &b),
        ("db/schema/repo/tool", "v1", &a),
        ("db/schema/second/svc", "1", &a),
    ]);
    let repositories = [
        "db/schema/repo/app",
        "db/schema/repo/tool",
        "db/schema/second/svc",
    ];
    let image_repositories = ["db/schema/repo", "db/schema/second"];
    let (ad, bd) = (a.digest.clone(), b.digest.clone());
    let server = SqlServer::start(move |req| match shown_repository(req).as_deref() {
        Some("db.schema.repo") => Reply::json(
            200,
            &result_set(
                &[
                    row("db/schema/repo", "app", &["1", "latest"], &ad),
                    row("db/schema/repo", "app", &["2"], &bd),
                    row("db/schema/repo", "tool", &["v1"], &ad),
                ],
                1,
                "01a-repo",
            ),
        ),
        Some("db.schema.second") => Reply::json(
            200,
            &result_set(&[row("db/schema/second", "svc", &["1"], &ad)], 1, "01a-sec"),
        ),
        _ => Reply::raw(400, "{}"),
    });

    // The registry path, as the reference: two `once`, the second idle.
    let reference = spcs_scanner(&registry, token);
    write_config(
        &reference,
        &registry_keys(&repositories, &image_repositories, None),
        "5s",
        "info",
    );
    let first = run_once(&reference);
    assert_eq!(first.code, Some(0), "{}", first.output);
    let mark = registry.mark();
    let idle = run_once(&reference);
    assert_eq!(idle.code, Some(0), "{}", idle.output);
    let registry_idle = registry.requests_since_settled(mark).await;
    let registry_idle = daemon_requests(&registry_idle);
    assert_eq!(store_tags(&reference), want);
    assert_eq!(count(&registry_idle, is_tag_list), 3, "{registry_idle:#?}");
    assert_eq!(
        count(&registry_idle, |r| r.is_manifest("HEAD")),
        5,
        "{registry_idle:#?}"
    );
    assert!(server.requests().is_empty(), "the registry path asked SQL");

    // The SQL path, as a daemon: cycle 1 checks every tag; cycle 2 only the sample.
    let mut scanner = spcs_scanner(&registry, token);
    scanner.cron = "* * * * * *".into();
    write_config(
        &scanner,
        &registry_keys(&repositories, &image_repositories, Some((&server, 1))),
        "5s",
        "info",
    );
    server.allow.store(2, Ordering::SeqCst);
    let mark = registry.mark();
    let mut daemon = RunningDaemon::spawn(command(&scanner, &["run"]));
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(60), |_| true)
        .await;
    // Cycle 2 is held at its first SQL request while cycle 1 is counted.
    server.wait_posts(3, Duration::from_secs(30)).await;
    let cycle1 = registry.requests_since_settled(mark).await;
    let cycle1 = daemon_requests(&cycle1);
    assert_eq!(count(&cycle1, is_tag_list), 0, "{cycle1:#?}");
    assert_eq!(count(&cycle1, is_catalog), 0, "{cycle1:#?}");
    assert_eq!(count(&cycle1, |r| r.is_manifest("HEAD")), 5, "{cycle1:#?}");

    let mark = registry.mark();
    server.allow.store(4, Ordering::SeqCst);
    daemon
        .wait_for("cycle finished", 2, Duration::from_secs(30), |_| true)
        .await;
    server.wait_posts(5, Duration::from_secs(30)).await;
    let cycle2 = registry.requests_since_settled(mark).await;
    let cycle2 = daemon_requests(&cycle2);
    assert_eq!(
        daemon.stop(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        daemon.output()
    );
    let output = daemon.output();

    // One SQL request per image repository per cycle: two answered cycles, and cycle 3
    // held at its first (or both) requests.
    let (repo, second) = (
        server.posts_for("db.schema.repo"),
        server.posts_for("db.schema.second"),
    );
    assert!(
        (2..=3).contains(&repo) && (2..=3).contains(&second) && (5..=6).contains(&(repo + second)),
        "statement POSTs: {repo} + {second}"
    );
    assert_requests_well_formed(&server, &[token]);
    // Idle cycle on the SQL path: no tag list, no manifest GET, one HEAD per image
    // repository (the verification sample), against 3 tag lists + 5 HEADs.
    assert_eq!(count(&cycle2, is_tag_list), 0, "{cycle2:#?}");
    assert_eq!(count(&cycle2, |r| r.is_manifest("GET")), 0, "{cycle2:#?}");
    assert_eq!(count(&cycle2, |r| r.is_manifest("HEAD")), 2, "{cycle2:#?}");
    assert_eq!(cycle2.len(), 2, "{cycle2:#?}");
    println!(
        "requests per idle cycle: registry path {} registry; sql path {} SQL + {} registry",
        registry_idle.len(),
        image_repositories.len(),
        cycle2.len()
    );
    assert_eq!(store_tags(&scanner), want);
    assert!(
        events(
            &output,
            "SQL listing failed; using the registry API for this image repository"
        )
        .is_empty(),
        "{output}"
    );
    let cycles = events(&output, "cycle finished");
    assert_eq!(cycles[0]["added"], 5, "{output}");
    assert_eq!(cycles[1]["unchanged"], 5, "{output}");
    assert_eq!(cycles[1]["errors"], 0, "{output}");
    assert_no_token(&output, &scanner, &[token]);
}

#[tokio::test]
async fn a_statement_answered_202_is_polled_and_every_partition_is_read() {
    let token = "tok-SQL-poll-5d2e11";
    let (registry, pusher) = spcs_registry(token).await;
    let a = push(&pusher, "db/schema/repo/app", "1", 1).await;
    for tag in ["2", "3", "4", "5"] {
        push(&pusher, "db/schema/repo/app", tag, 1).await;
    }
    let handle = "01b2c3d4-0000-4a5b-8c9d-000000000042";
    let ad = a.digest.clone();
    let polls = Arc::new(AtomicUsize::new(0));
    let p2 = polls.clone();
    let server = SqlServer::start(move |req| {
        let rows = |tags: &[&str]| vec![row("db/schema/repo", "app", tags, &ad)];
        if req.is_post() {
            return Reply::json(
                202,
                &json!({
                    "code": "333334",
                    "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.",
                    "statementHandle": handle,
                    "statementStatusUrl": format!("{STATEMENTS}/{handle}"),
                }),
            );
        }
        if req.path != format!("{STATEMENTS}/{handle}") {
            return Reply::raw(404, "{}");
        }
        match req.query.get("partition").map(String::as_str) {
            None if p2.fetch_add(1, Ordering::SeqCst) == 0 => Reply::json(
                202,
                &json!({"code": "333334", "statementHandle": handle,
                        "statementStatusUrl": format!("{STATEMENTS}/{handle}")}),
            ),
            None => Reply::json(200, &result_set(&rows(&["1", "2"]), 3, handle)),
            // Later partitions carry only data.
            Some("1") => Reply::json(200, &json!({"data": rows(&["3", "4"])})),
            Some("2") => Reply::json(200, &json!({"data": rows(&["5"])})),
            Some(_) => Reply::raw(404, "{}"),
        }
    });
    let scanner = spcs_scanner(&registry, token);
    write_one_app_config(&scanner, &server, "info");
    let mark = registry.mark();
    let once = run_once(&scanner);
    assert_eq!(once.code, Some(0), "{}", once.output);
    let tags: BTreeSet<String> = store_tags(&scanner).into_keys().map(|(_, t)| t).collect();
    assert_eq!(tags, ["1", "2", "3", "4", "5"].map(String::from).into());
    let requests = server.requests();
    assert_eq!(server.posts().len(), 1, "{requests:#?}");
    let status_gets = requests
        .iter()
        .filter(|r| r.method == "GET" && !r.query.contains_key("partition"))
        .count();
    assert_eq!(
        status_gets, 2,
        "one 202 poll, then the result: {requests:#?}"
    );
    let partitions: Vec<&str> = requests
        .iter()
        .filter_map(|r| r.query.get("partition").map(String::as_str))
        .collect();
    assert_eq!(partitions, ["1", "2"], "{requests:#?}");
    assert_requests_well_formed(&server, &[token]);
    let seen = registry.requests_since_settled(mark).await;
    assert_eq!(count(&daemon_requests(&seen), is_tag_list), 0, "{seen:#?}");
    assert!(
        once.events("SQL listing failed; using the registry API for this image repository")
            .is_empty(),
        "{}",
        once.output
    );
    assert_no_token(&once.output, &scanner, &[token]);
}

#[tokio::test]
async fn failed_sql_listings_fall_back_to_the_registry_for_that_image_repository() {
    let token = "tok-SQL-fallback-77ab";
    let (registry, pusher) = spcs_registry(token).await;
    let names = ["ok", "r422", "r500", "garbage", "slow"];
    let mut want = Vec::new();
    let mut pushed = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        let repo = format!("db/schema/{n}/app");
        let m = push(&pusher, &repo, "1", (i % 2) as u8).await;
        pushed.insert(n.to_string(), m.clone());
        want.push((repo, m));
    }
    let ok_digest = pushed["ok"].digest.clone();
    let server = SqlServer::start(move |req| match shown_repository(req).as_deref() {
        Some("db.schema.ok") => Reply::json(
            200,
            &result_set(&[row("db/schema/ok", "app", &["1"], &ok_digest)], 1, "h-ok"),
        ),
        Some("db.schema.r422") => Reply::json(
            422,
            &json!({"code": "002003", "sqlState": "02000",
                    "message": "SQL compilation error: Image repository 'R422' does not exist or not authorized.",
                    "statementHandle": "h-422"}),
        ),
        Some("db.schema.r500") => Reply::raw(500, "{\"message\":\"internal\"}"),
        Some("db.schema.garbage") => Reply::raw(200, "{\"resultSetMetaData\": [oops"),
        Some("db.schema.slow") => {
            let mut r = Reply::json(200, &result_set(&[], 1, "h-slow"));
            r.delay = Duration::from_secs(8);
            r
        }
        _ => Reply::raw(400, "{}"),
    });
    let repositories: Vec<String> = names.iter().map(|n| format!("db/schema/{n}/app")).collect();
    let image_repositories: Vec<String> = names.iter().map(|n| format!("db/schema/{n}")).collect();
    let scanner = spcs_scanner(&registry, token);
    let repos: Vec<&str> = repositories.iter().map(String::as_str).collect();
    let irs: Vec<&str> = image_repositories.iter().map(String::as_str).collect();
    write_config(
        &scanner,
        &registry_keys(&repos, &irs, Some((&server, 1))),
        "2s",
        "info",
    );
    let mark = registry.mark();
    let once = run_once(&scanner);
    assert_eq!(once.code, Some(0), "{}", once.output);

    // The cycle is still complete and correct.
    let want: BTreeMap<(String, String), String> = want
        .iter()
        .map(|(r, m)| ((r.clone(), "1".to_string()), m.digest.clone()))
        .collect();
    assert_eq!(store_tags(&scanner), want);
    assert_eq!(
        once.events("cycle finished")[0]["errors"],
        0,
        "{}",
        once.output
    );

    // Each failing image repository is logged and listed through the registry; the
    // healthy one is not.
    let fallbacks: BTreeSet<String> = once
        .events("SQL listing failed; using the registry API for this image repository")
        .iter()
        .map(|e| {
            e["image_repository"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        fallbacks,
        [
            "db/schema/r422",
            "db/schema/r500",
            "db/schema/garbage",
            "db/schema/slow"
        ]
        .map(String::from)
        .into(),
        "{}",
        once.output
    );
    let seen = registry.requests_since_settled(mark).await;
    let seen = daemon_requests(&seen);
    let listed: BTreeSet<&str> = seen
        .iter()
        .filter(|r| is_tag_list(r))
        .map(|r| {
            r.path
                .trim_start_matches("/v2/")
                .split("/tags/list")
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        listed,
        [
            "db/schema/garbage/app",
            "db/schema/r422/app",
            "db/schema/r500/app",
            "db/schema/slow/app"
        ]
        .into(),
        "{seen:#?}"
    );
    let text = once.output.clone();
    assert!(text.contains("500"), "the 500 is named: {text}");
    assert!(text.contains("002003"), "the 422 code is named: {text}");
    assert!(
        text.contains("no answer within"),
        "the timeout is named: {text}"
    );
    assert_eq!(server.posts().len(), 5);
    assert_requests_well_formed(&server, &[token]);
    assert_no_token(&once.output, &scanner, &[token]);
}

#[tokio::test]
async fn a_digest_that_differs_from_the_registry_head_moves_the_image_repository_to_the_registry_for_good()
 {
    let token = "tok-SQL-mismatch-3f90";
    let (registry, pusher) = spcs_registry(token).await;
    let a = push(&pusher, "db/schema/repo/app", "1", 1).await;
    // B exists in the repository (so it is a plausible digest), but tag 1 is A.
    let b = push(&pusher, "db/schema/repo/app", "other", 2).await;
    let c = push(&pusher, "db/schema/fine/app", "1", 1).await;
    let (bd, cd) = (b.digest.clone(), c.digest.clone());
    let server = SqlServer::start(move |req| match shown_repository(req).as_deref() {
        Some("db.schema.repo") => Reply::json(
            200,
            &result_set(
                &[
                    // Wrong: SHOW IMAGES says tag 1 is B; the registry says A.
                    row("db/schema/repo", "app", &["1", "other"], &bd),
                ],
                1,
                "h-repo",
            ),
        ),
        Some("db.schema.fine") => Reply::json(
            200,
            &result_set(&[row("db/schema/fine", "app", &["1"], &cd)], 1, "h-fine"),
        ),
        _ => Reply::raw(400, "{}"),
    });
    let mut scanner = spcs_scanner(&registry, token);
    scanner.cron = "* * * * * *".into();
    write_config(
        &scanner,
        &registry_keys(
            &["db/schema/repo/app", "db/schema/fine/app"],
            &["db/schema/repo", "db/schema/fine"],
            Some((&server, 1)),
        ),
        "5s",
        "info",
    );
    let mut daemon = RunningDaemon::spawn(command(&scanner, &["run"]));
    daemon
        .wait_for("cycle finished", 3, Duration::from_secs(60), |_| true)
        .await;
    assert_eq!(
        daemon.stop(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        daemon.output()
    );
    let output = daemon.output();

    let warnings = events(
        &output,
        "SHOW IMAGES digest differs from the registry's manifest digest; using the registry API for this image repository until restart",
    );
    assert_eq!(warnings.len(), 1, "{output}");
    let w = &warnings[0];
    assert_eq!(w["repository"], "db/schema/repo/app");
    assert_eq!(w["tag"], "1");
    assert_eq!(w["sql_digest"], b.digest.as_str());
    assert_eq!(w["registry_digest"], a.digest.as_str());
    // Asked once, never again; the other image repository stays on SQL.
    assert_eq!(server.posts_for("db.schema.repo"), 1);
    assert!(server.posts_for("db.schema.fine") >= 3);
    // The registry's digests are what the store holds.
    assert_eq!(
        store_tags(&scanner),
        expected(&[
            ("db/schema/fine/app", "1", &c),
            ("db/schema/repo/app", "1", &a),
            ("db/schema/repo/app", "other", &b),
        ])
    );
    // Later cycles list the distrusted image repository through the registry.
    let log = registry.requests();
    let lists = count(&daemon_requests(&log), |r| {
        r.path.starts_with("/v2/db/schema/repo/app/tags/list")
    });
    assert!(
        lists >= 3,
        "tag lists of the distrusted repository: {lists}"
    );
    let fine_lists = count(&daemon_requests(&log), |r| {
        r.path.starts_with("/v2/db/schema/fine/app/tags/list")
    });
    assert_eq!(fine_lists, 0);
    assert_requests_well_formed(&server, &[token]);
    assert_no_token(&output, &scanner, &[token]);
}

#[tokio::test]
async fn a_refused_token_is_read_again_and_the_statement_retried_once() {
    let old = "tok-SQL-OLD-41d7";
    let new = "tok-SQL-NEW-9e02";
    // The registry already takes the new token; the file still holds the old one.
    let (registry, pusher) = spcs_registry(new).await;
    let a = push(&pusher, "db/schema/repo/app", "1", 1).await;
    let scanner = spcs_scanner(&registry, old);
    let token_file = scanner.secret_path();
    let ad = a.digest.clone();
    let server = SqlServer::start(move |req| {
        let bearer = req
            .headers
            .get("authorization")
            .cloned()
            .unwrap_or_default();
        if bearer == format!("Bearer {old}") {
            // SPCS rotates the file; the old token is refused.
            std::fs::write(&token_file, format!("{new}\n")).unwrap();
            return Reply::json(
                401,
                &json!({"code": "390303", "message": "Invalid OAuth access token. [ba2e]"}),
            );
        }
        Reply::json(
            200,
            &result_set(&[row("db/schema/repo", "app", &["1"], &ad)], 1, "h-401"),
        )
    });
    write_one_app_config(&scanner, &server, "debug");
    let once = run_once(&scanner);
    assert_eq!(once.code, Some(0), "{}", once.output);
    let posts = server.posts();
    assert_eq!(posts.len(), 2, "one refusal, one retry: {posts:#?}");
    assert_eq!(posts[0].headers["authorization"], format!("Bearer {old}"));
    assert_eq!(posts[1].headers["authorization"], format!("Bearer {new}"));
    assert_eq!(posts[0].query["requestId"], posts[1].query["requestId"]);
    assert!(!posts[0].query.contains_key("retry"));
    assert_eq!(
        posts[1].query.get("retry").map(String::as_str),
        Some("true")
    );
    assert_requests_well_formed(&server, &[old, new]);
    assert_eq!(
        store_tags(&scanner),
        expected(&[("db/schema/repo/app", "1", &a)])
    );
    assert!(
        once.events("SQL listing failed; using the registry API for this image repository")
            .is_empty(),
        "{}",
        once.output
    );
    // Debug logging included: neither token is ever printed.
    assert_no_token(&once.output, &scanner, &[old, new]);
}

#[tokio::test]
async fn hostile_rows_are_skipped_and_counted() {
    let token = "tok-SQL-hostile-c0de";
    let (registry, pusher) = spcs_registry(token).await;
    let a = push(&pusher, "db/schema/repo/app", "1", 1).await;
    let ad = a.digest.clone();
    let server = SqlServer::start(move |_req| {
        let good = row("db/schema/repo", "app", &["1"], &ad);
        let rows = vec![
            good,
            // Path tricks in the name.
            row("db/schema/repo", "../../etc", &["1"], &ad),
            row("db/schema/repo", "app/../../x", &["1"], &ad),
            row("db/schema/repo", "APP", &["1"], &ad),
            // Bad digests.
            row("db/schema/repo", "app", &["2"], "sha256:../../etc/passwd"),
            row("db/schema/repo", "app", &["3"], "md5:abc"),
            // image_path naming another repository.
            json!(["0", "app", "[\"4\"]", ad, "other/schema/repo/app:4"]),
            // Cells that are not strings, a row that is not an array.
            json!([0, 1, 2, 3, 4]),
            json!("row"),
        ];
        let mut set = result_set(&rows, 1, "h-hostile");
        // Bad tags inside a good row: counted one by one (a comma list this time).
        set["data"]
            .as_array_mut()
            .unwrap()
            .push(json!(["0", "app", "../x, -bad, 1", ad, null]));
        Reply::json(200, &set)
    });
    let scanner = spcs_scanner(&registry, token);
    write_one_app_config(&scanner, &server, "info");
    let once = run_once(&scanner);
    assert_eq!(once.code, Some(0), "{}", once.output);
    let skipped = once.events("skipped invalid rows or tags from SHOW IMAGES");
    assert_eq!(skipped.len(), 1, "{}", once.output);
    // Of 10 rows, 8 bad (3 names, 2 digests, 1 image_path, 1 cell types, 1 not an
    // array), plus 2 bad tags in a good row.
    assert_eq!(skipped[0]["skipped"], 10, "{}", once.output);
    assert_eq!(skipped[0]["rows"], 10, "{}", once.output);
    assert_eq!(
        store_tags(&scanner),
        expected(&[("db/schema/repo/app", "1", &a)])
    );
    for path in [scanner.output_dir(), scanner.state_dir()] {
        assert!(path.exists());
    }
    assert!(!scanner.dir.path().join("etc").exists());
    assert_requests_well_formed(&server, &[token]);
    assert_no_token(&once.output, &scanner, &[token]);
}

#[test]
fn listing_sql_is_refused_without_spcs_auth_or_with_an_unquotable_image_repository() {
    let check = |scanner: &Scanner, lines: &str, key: &str| {
        write_config(scanner, lines, "5s", "info");
        let out = command(scanner, &["check-config"]).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(text.contains(key), "{key} not named: {text}");
    };
    let mut none = Scanner::new("http://127.0.0.1:1");
    none.auth = Auth::None;
    check(
        &none,
        "image_repositories = [\"db/schema/repo\"]\nlisting = \"sql\"\nsql_url = \"http://127.0.0.1:1\"",
        "registry.listing",
    );
    let mut spcs = Scanner::new("http://127.0.0.1:1");
    spcs.auth = Auth::Spcs { token: "t".into() };
    check(
        &spcs,
        "image_repositories = [\"db/sch-ema/repo\"]\nlisting = \"sql\"\nsql_url = \"http://127.0.0.1:1\"",
        "registry.image_repositories",
    );
    check(
        &spcs,
        "image_repositories = [\"db/schema/repo\"]\nlisting = \"sql\"\nsql_url = \"http://sql.example.com\"",
        "registry.sql_url",
    );
    // Neither sql_url nor SNOWFLAKE_HOST.
    check(
        &spcs,
        "image_repositories = [\"db/schema/repo\"]\nlisting = \"sql\"",
        "SNOWFLAKE_HOST",
    );
}
