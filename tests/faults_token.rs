//! SPCS session-token rotation and expiry (issue 6, item 3), in `registry.auth = "spcs"`
//! mode, against a loopback registry that answers like SPCS's: a scripted auth front
//! (Bearer challenge with a token realm, or Basic) that accepts user `0auth2accesstoken`
//! with the current session token as password and forwards what it accepts to a real
//! `docker-registry`, so the real syft pulls real images through it.
//!
//! Covered: the token file replaced between two requests of one cycle (the server
//! refuses the old token from that request on; the daemon re-reads the file on the 401,
//! retries once, and the cycle completes with a bounded number of requests; syft gets the
//! new token); a token that expires (every request refused) fails cycles cleanly and the
//! daemon recovers when the file is updated; a token file that becomes unreadable (a
//! directory, then a dangling symlink) is logged naming the file, the daemon stays up
//! and recovers when the file is back. Not repeated: a rotation between cycles
//! (`tests/watcher.rs`, `spcs_token_file_is_reread_when_it_changes_without_a_restart`) and
//! the bearer flow of one listing (`tests/registry_client.rs`).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nix::sys::signal::Signal;
use spcs_image_scanner::state::ImageStatus;
use support::daemon::{Auth, RunningDaemon, Scanner};
use support::http1::{Request, read_request};
use support::oci::{DebianImage, ManifestFormat, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};
use tokio::io::{AsyncWriteExt as _, BufReader};

const USER: &str = "0auth2accesstoken";
/// User-Agent prefix of the daemon's own requests (syft's differ).
const DAEMON_UA: &str = "spcs-image-scanner/";

// ---------------------------------------------------------------------------------------
// The SPCS-like auth front.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// `WWW-Authenticate: Bearer realm=.../token`: registry tokens fetched with Basic
    /// `0auth2accesstoken:<session token>`, valid while that session token is.
    Bearer,
    /// `WWW-Authenticate: Basic`: every request carries `0auth2accesstoken:<token>`.
    Basic,
}

/// One request as the front saw and answered it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    user_agent: String,
    /// The session token behind the request's credentials (directly for Basic, through
    /// the registry token for Bearer), if any.
    session: Option<String>,
    status: u16,
    /// When the front decided on it (requests are logged when answered, which is not the
    /// order of decisions when they overlap).
    order: usize,
}

impl Seen {
    fn by_daemon(&self) -> bool {
        self.user_agent.starts_with(DAEMON_UA)
    }
}

/// Picks a request by User-Agent and target.
type Pick = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Rotate when a request matches: write the new token to the file, then accept only it.
struct Rotation {
    pick: Pick,
    token: String,
    file: PathBuf,
}

#[derive(Default)]
struct FrontState {
    /// The session token accepted now; `None`: every token is refused (expired).
    valid: Option<String>,
    /// Registry tokens issued, with the session token they were issued for.
    issued: HashMap<String, String>,
    log: Vec<Seen>,
    rotation: Option<Rotation>,
    /// Decisions taken so far (see [`Seen::order`]).
    decisions: usize,
    /// The `order` of the request that triggered the rotation.
    rotated_at: Option<usize>,
}

struct SpcsFront {
    port: u16,
    state: Arc<Mutex<FrontState>>,
    task: tokio::task::JoinHandle<()>,
}

impl SpcsFront {
    async fn start(upstream: &str, flow: Flow, token: &str) -> SpcsFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(FrontState {
            valid: Some(token.to_string()),
            ..FrontState::default()
        }));
        let upstream = upstream.trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .expect("front client");
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (state, client, upstream) = (shared.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    while let Some(req) = read_request(&mut reader).await {
                        let reply = answer(&state, flow, port, &client, &upstream, req).await;
                        if write.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SpcsFront { port, state, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    fn mark(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }

    fn since(&self, mark: usize) -> Vec<Seen> {
        self.log().split_off(mark)
    }

    fn accept_only(&self, token: Option<&str>) {
        self.state.lock().unwrap().valid = token.map(str::to_string);
    }

    fn rotate_on(
        &self,
        pick: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
        token: &str,
        file: &Path,
    ) {
        self.state.lock().unwrap().rotation = Some(Rotation {
            pick: Box::new(pick),
            token: token.to_string(),
            file: file.to_path_buf(),
        });
    }

    fn rotated_at(&self) -> Option<usize> {
        self.state.lock().unwrap().rotated_at
    }
}

impl Drop for SpcsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replaces `path` as a whole with `token` (written aside, renamed over), as a mounted
/// secret is: a reader sees the old token or the new one, never a half-written file.
fn replace_file(path: &Path, token: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, format!("{token}\n")).expect("write new token file");
    std::fs::rename(&aside, path).expect("replace token file");
}

/// The session token of `Basic base64(0auth2accesstoken:<token>)`.
fn basic_session(value: &str) -> Option<String> {
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, token) = text.split_once(':')?;
    (user == USER).then(|| token.to_string())
}

/// The scope SPCS's challenge would name for a path.
fn scope_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    if rest.starts_with("_catalog") {
        return Some("registry:catalog:*".into());
    }
    for marker in ["/tags/", "/manifests/", "/blobs/"] {
        if let Some(i) = rest.find(marker) {
            return Some(format!("repository:{}:pull", &rest[..i]));
        }
    }
    None
}

fn render(status: u16, headers: &[(String, String)], body: &[u8], head: bool) -> Vec<u8> {
    let mut text = format!("HTTP/1.1 {status} X\r\n");
    let mut has_length = false;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("content-length") {
            if !head {
                continue;
            }
            has_length = true;
        }
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if !head || !has_length {
        text.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    let mut out = text.into_bytes();
    if !head {
        out.extend_from_slice(body);
    }
    out
}

async fn answer(
    state: &Mutex<FrontState>,
    flow: Flow,
    port: u16,
    client: &reqwest::Client,
    upstream: &str,
    req: Request,
) -> Vec<u8> {
    let user_agent = req.header("user-agent").unwrap_or_default().to_string();
    let path = req.target.split('?').next().unwrap_or_default().to_string();
    let head = req.method == "HEAD";
    // Rotation first: this request was sent with the old credentials. The rotation, the
    // request's place in the order of decisions and the token it is judged by are taken
    // together, so that concurrent requests are judged by the rules of their place.
    let (order, valid) = {
        let mut s = state.lock().unwrap();
        let fire = s
            .rotation
            .as_ref()
            .is_some_and(|r| (r.pick)(&user_agent, &req.target));
        if fire {
            let r = s.rotation.take().expect("rotation");
            // Replaced as a whole (written aside, renamed over), as a volume's file is:
            // a reader sees the old token or the new one, never a half-written file.
            replace_file(&r.file, &r.token);
            s.valid = Some(r.token);
            s.rotated_at = Some(s.decisions);
        }
        let order = s.decisions;
        s.decisions += 1;
        (order, s.valid.clone())
    };
    let authorization = req.header("authorization").unwrap_or_default().to_string();
    let log = |session: Option<String>, status: u16, order: usize| {
        state.lock().unwrap().log.push(Seen {
            method: req.method.clone(),
            target: req.target.clone(),
            user_agent: user_agent.clone(),
            session,
            status,
            order,
        });
    };

    if flow == Flow::Bearer && path == "/token" {
        let session = basic_session(&authorization);
        let ok = session.is_some() && session == valid;
        if !ok {
            log(session, 401, order);
            return render(
                401,
                &[],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                false,
            );
        }
        let token = {
            let mut s = state.lock().unwrap();
            let token = format!("registry-token-{}", s.issued.len() + 1);
            s.issued
                .insert(token.clone(), session.clone().unwrap_or_default());
            token
        };
        log(session, 200, order);
        let body = format!("{{\"token\":\"{token}\",\"expires_in\":3600}}");
        return render(
            200,
            &[("content-type".into(), "application/json".into())],
            body.as_bytes(),
            false,
        );
    }

    let session = match flow {
        Flow::Bearer => authorization
            .strip_prefix("Bearer ")
            .and_then(|t| state.lock().unwrap().issued.get(t.trim()).cloned()),
        Flow::Basic => basic_session(&authorization),
    };
    let ok = session.is_some() && session == valid;
    if !ok {
        log(session, 401, order);
        let challenge = match flow {
            Flow::Basic => "Basic realm=\"snowflake registry\"".to_string(),
            Flow::Bearer => {
                let mut c = format!(
                    "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"registry-local\""
                );
                if let Some(scope) = scope_of(&path) {
                    c.push_str(&format!(",scope=\"{scope}\""));
                }
                c
            }
        };
        return render(
            401,
            &[
                ("www-authenticate".into(), challenge),
                ("content-type".into(), "application/json".into()),
            ],
            b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
            head,
        );
    }

    let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut forward = client.request(method, format!("{upstream}{}", req.target));
    for (k, v) in &req.headers {
        if !matches!(
            k.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding" | "authorization"
        ) {
            forward = forward.header(k, v);
        }
    }
    let (status, headers, body) = match forward.body(req.body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let headers: Vec<(String, String)> = r
                .headers()
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "connection" | "transfer-encoding"))
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect();
            let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (status, headers, body)
        }
        Err(_) => (502, Vec::new(), Vec::new()),
    };
    log(session, status, order);
    render(status, &headers, &body, head)
}

// ---------------------------------------------------------------------------------------

struct Setup {
    _registry: TestRegistry,
    pusher: Pusher,
    front: SpcsFront,
    scanner: Scanner,
}

async fn setup(flow: Flow, token: &str, repos: &[&str]) -> Setup {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    for (n, repo) in repos.iter().enumerate() {
        push(&pusher, repo, "1", n).await;
    }
    let front = SpcsFront::start(&registry.url(), flow, token).await;
    let mut scanner = Scanner::new(&front.url());
    scanner.auth = Auth::Spcs {
        token: token.to_string(),
    };
    Setup {
        _registry: registry,
        pusher,
        front,
        scanner,
    }
}

async fn push(pusher: &Pusher, repo: &str, tag: &str, n: usize) -> String {
    let image =
        DebianImage::default().with_file("etc/token-test", format!("{repo}:{n}").into_bytes());
    pusher
        .push_image(repo, tag, &image, ManifestFormat::Oci)
        .await
        .expect("push")
        .digest
}

/// `once` on a worker thread: the front must keep answering meanwhile.
async fn once(scanner: &Scanner) -> support::daemon::RunOutput {
    tokio::task::block_in_place(|| scanner.once())
}

fn refused(seen: &[Seen]) -> usize {
    seen.iter().filter(|s| s.status == 401).count()
}

async fn rotation_mid_cycle(flow: Flow, test: &str) {
    let (old, new) = ("SPCS-TOKEN-old-4f1c", "SPCS-TOKEN-new-9b2e");
    let repos = ["db/schema/repo/app", "db/schema/repo/web"];
    let s = setup(flow, old, &repos).await;
    let run = once(&s.scanner).await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["scanned"], 2);

    // New images, so that scans run after the rotation (syft must get the new token).
    let app2 = push(&s.pusher, repos[0], "2", 10).await;
    let web2 = push(&s.pusher, repos[1], "2", 11).await;
    // The second repository's first daemon request of the cycle: by then the first
    // repository's listing went through with the old token.
    s.front.rotate_on(
        |ua, target| ua.starts_with(DAEMON_UA) && target.contains("/web/"),
        new,
        &s.scanner.secret_path(),
    );
    let mark = s.front.mark();
    // The daemon process reads the file at start; from here its content is the old token
    // until the front rewrites it.
    let run = once(&s.scanner).await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let summary = run.summary();
    assert_eq!(
        summary["errors"],
        0,
        "{summary}\n{}\n{:#?}",
        run.stdout,
        s.front.since(mark)
    );
    assert_eq!(summary["added"], 2, "{summary}");
    assert_eq!(summary["scanned"], 2, "{summary}");
    let at = s.front.rotated_at().expect("the rotation fired");
    let all = s.front.since(mark);
    let trigger = all
        .iter()
        .find(|r| r.order == at)
        .expect("the rotating request");
    assert!(
        trigger.by_daemon() && trigger.target.contains("/web/") && trigger.status == 401,
        "{} {} was answered with the new token's rules: {trigger:?}",
        trigger.method,
        trigger.target
    );
    let before: Vec<Seen> = all.iter().filter(|r| r.order < at).cloned().collect();
    let after: Vec<Seen> = all.iter().filter(|r| r.order >= at).cloned().collect();
    assert!(
        before
            .iter()
            .any(|r| r.by_daemon() && r.status == 200 && r.session.as_deref() == Some(old)),
        "the cycle started with the old token: {before:?}"
    );
    // Every daemon request after the rotation that carried the old token was refused;
    // each refusal costs one retry with the file read again.
    let daemon_after: Vec<&Seen> = after.iter().filter(|r| r.by_daemon()).collect();
    let refusals = daemon_after.iter().filter(|r| r.status == 401).count();
    assert!(refusals >= 1, "the old token was refused at least once");
    // One refusal per cached credential (one registry token per scope: catalog and two
    // repositories) plus the anonymous first try of oci-client's GETs, at most.
    assert!(
        refusals <= 6,
        "{refusals} refusals after the rotation: {daemon_after:#?}"
    );
    let daemon_requests = all.iter().filter(|r| r.by_daemon()).count();
    assert!(
        daemon_requests <= 30,
        "{daemon_requests} daemon requests for 2 repositories and 4 tags"
    );
    assert!(
        daemon_after
            .iter()
            .filter(|r| r.status == 200)
            .all(|r| r.session.as_deref() == Some(new)),
        "after the rotation only the new token works: {daemon_after:#?}"
    );
    // syft pulled both new images with the new token only.
    let syft: Vec<&Seen> = after
        .iter()
        .filter(|r| !r.by_daemon() && r.session.is_some())
        .collect();
    assert!(!syft.is_empty(), "syft's requests reached the front");
    assert!(
        syft.iter().all(|r| r.session.as_deref() == Some(new)),
        "syft got the new token: {syft:#?}"
    );
    for digest in [&app2, &web2] {
        assert_eq!(
            s.scanner.image(digest).unwrap().status,
            ImageStatus::Scanned
        );
        assert_eq!(
            s.scanner.result_files()[digest.trim_start_matches("sha256:")].len(),
            1
        );
    }
    assert!(!run.stdout.contains(old) && !run.stdout.contains(new));
    let outcome = format!(
        "cycle completed: 0 errors, 2 new images scanned by syft with the new token; {refusals} \
         refusals, {daemon_requests} daemon requests in the cycle"
    );
    record(Tried {
        area: "token",
        fault: &format!(
            "token file replaced between two requests of one cycle; the registry ({flow:?} challenge) refuses the old token from then on"
        ),
        runs: 1,
        outcome: &outcome,
        lost: 0,
        test,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_mid_cycle_under_the_bearer_flow_is_reread_on_401_and_the_cycle_completes()
{
    rotation_mid_cycle(
        Flow::Bearer,
        "faults_token::a_token_rotated_mid_cycle_under_the_bearer_flow_is_reread_on_401_and_the_cycle_completes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_mid_cycle_under_the_basic_flow_is_reread_on_401_and_the_cycle_completes() {
    rotation_mid_cycle(
        Flow::Basic,
        "faults_token::a_token_rotated_mid_cycle_under_the_basic_flow_is_reread_on_401_and_the_cycle_completes",
    )
    .await;
}

/// Waits (bounded) for a `cycle failed` line after the first `seen` ones; returns it.
async fn next_failure(daemon: &mut RunningDaemon, seen: usize) -> serde_json::Value {
    let message = "cycle failed; will try again at the next tick";
    daemon
        .wait_for(message, seen + 1, Duration::from_secs(60), |_| true)
        .await
        .remove(seen)
}

/// Waits (bounded) for a clean cycle that finished after the first `seen` ones.
async fn next_clean_cycle(daemon: &mut RunningDaemon, seen: usize, scanned: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let clean = daemon
            .events("cycle finished")
            .into_iter()
            .skip(seen)
            .any(|e| e["errors"] == 0 && e["scanned"].as_u64() >= Some(scanned));
        if clean {
            return;
        }
        assert!(daemon.is_running(), "daemon exited\n{}", daemon.output());
        assert!(
            Instant::now() < deadline,
            "no clean cycle\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_fails_cycles_cleanly_and_the_daemon_recovers_when_the_file_is_updated() {
    let (old, new) = ("SPCS-TOKEN-expires-77aa", "SPCS-TOKEN-fresh-1d0c");
    let repo = "db/schema/repo/exp";
    let mut s = setup(Flow::Bearer, old, &[repo]).await;
    s.scanner.cron = "*/2 * * * * *".into();
    let mut daemon = s.scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |e| {
            e["scanned"] == 1
        })
        .await;

    // The token expires: the registry refuses it everywhere, and SPCS has not written a
    // new one yet.
    let failed_before = daemon
        .events("cycle failed; will try again at the next tick")
        .len();
    let mark = s.front.mark();
    s.front.accept_only(None);
    let failure = next_failure(&mut daemon, failed_before).await;
    let error = failure["error"].as_str().unwrap_or_default();
    assert!(error.contains("unauthorized"), "{error}");
    let second = next_failure(&mut daemon, failed_before + 1).await;
    // Each failed cycle asks a bounded number of times (the request with the cached
    // registry token refused, the token request with the expired session token refused),
    // as its own error line counts them.
    let counted = |e: &serde_json::Value| -> u64 {
        let text = e["error"].as_str().unwrap_or_default();
        let re = regex::Regex::new(r"and (\d+) registry requests").unwrap();
        re.captures(text)
            .and_then(|c| c[1].parse().ok())
            .unwrap_or_else(|| panic!("no request count in {text}"))
    };
    let per_cycle = counted(&failure).max(counted(&second));
    assert!(
        (1..=4).contains(&per_cycle),
        "{per_cycle} requests in a failed cycle: {:#?}",
        s.front.since(mark)
    );
    assert!(daemon.is_running());
    assert!(
        second["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unauthorized")
    );

    // SPCS writes a fresh token: the next cycle works, and a new image is pulled by syft
    // with it.
    let digest = push(&s.pusher, repo, "2", 5).await;
    let cycles = daemon.events("cycle finished").len();
    let mark = s.front.mark();
    replace_file(&s.scanner.secret_path(), new);
    s.front.accept_only(Some(new));
    next_clean_cycle(&mut daemon, cycles, 1).await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        s.scanner.image(&digest).unwrap().status,
        ImageStatus::Scanned
    );
    let after = s.front.since(mark);
    assert!(
        after
            .iter()
            .filter(|r| r.status == 200 && r.session.is_some())
            .all(|r| r.session.as_deref() == Some(new)),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|r| !r.by_daemon() && r.session.as_deref() == Some(new)),
        "syft used the fresh token"
    );
    let output = daemon.output();
    assert!(
        !output.contains(old) && !output.contains(new),
        "a token was logged"
    );
    record(Tried {
        area: "token",
        fault: "session token expires (the registry refuses it everywhere) until the token file is rewritten",
        runs: 2,
        outcome: &format!(
            "each cycle failed cleanly (`unauthorized`, at most {per_cycle} registry requests each), the daemon stayed up; after the file was updated the next cycle was clean and syft pulled a new image with the new token"
        ),
        lost: 0,
        test: "faults_token::an_expired_token_fails_cycles_cleanly_and_the_daemon_recovers_when_the_file_is_updated",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_file_is_logged_naming_the_file_and_the_daemon_recovers_when_it_is_back()
 {
    let (old, new) = ("SPCS-TOKEN-before-5e6f", "SPCS-TOKEN-after-a3b4");
    let repo = "db/schema/repo/gone";
    let mut s = setup(Flow::Bearer, old, &[repo]).await;
    s.scanner.cron = "*/2 * * * * *".into();
    let token_file = s.scanner.secret_path();
    let shown = token_file.display().to_string();
    let mut daemon = s.scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |e| {
            e["scanned"] == 1
        })
        .await;

    // The token rotates on the registry side while the file is not readable: a directory
    // where the file was (mode 000 would not stop root).
    let message = "cycle failed; will try again at the next tick";
    let failed = daemon.events(message).len();
    std::fs::remove_file(&token_file).unwrap();
    std::fs::create_dir(&token_file).unwrap();
    s.front.accept_only(Some(new));
    let as_dir = next_failure(&mut daemon, failed).await;
    let error = as_dir["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains(&shown) && error.contains("token file"),
        "the error names the token file: {error}"
    );

    // Then a dangling symlink (SPCS swaps the file through a link).
    std::fs::remove_dir(&token_file).unwrap();
    let target = s.scanner.dir.path().join("token-target");
    std::os::unix::fs::symlink(&target, &token_file).unwrap();
    let failed = daemon.events(message).len();
    let dangling = next_failure(&mut daemon, failed).await;
    let error2 = dangling["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error2.contains(&shown),
        "the error names the token file: {error2}"
    );
    assert!(daemon.is_running(), "no crash");

    // The file is back (the link's target appears): the daemon recovers on its own and
    // scans a new image with the token.
    let digest = push(&s.pusher, repo, "2", 7).await;
    let cycles = daemon.events("cycle finished").len();
    replace_file(&target, new);
    next_clean_cycle(&mut daemon, cycles, 1).await;

    // An empty file (what a writer that truncates and rewrites in place leaves for an
    // instant) while the registry moves to a third token: refused as empty, named.
    let third = "SPCS-TOKEN-third-c7d8";
    let failed = daemon.events(message).len();
    std::fs::write(&target, "").unwrap();
    s.front.accept_only(Some(third));
    let empty = next_failure(&mut daemon, failed).await;
    let error3 = empty["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error3.contains(&shown) && error3.contains("is empty"),
        "the error names the empty token file: {error3}"
    );
    let cycles = daemon.events("cycle finished").len();
    replace_file(&target, third);
    next_clean_cycle(&mut daemon, cycles, 0).await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        s.scanner.image(&digest).unwrap().status,
        ImageStatus::Scanned,
        "the image pushed while the file was unreadable"
    );
    let output = daemon.output();
    assert!(
        !output.contains(old) && !output.contains(new) && !output.contains(third),
        "a token was logged"
    );
    assert!(refused(&s.front.log()) > 0);
    // The part of the error about the file, with the temp path shortened.
    let short = |e: &str| {
        let from = e
            .find("cannot read")
            .or_else(|| e.find("token file"))
            .unwrap_or(0);
        e[from..].replace(&shown, "<token_file>")
    };
    record(Tried {
        area: "token",
        fault: "token file replaced by a directory, then by a dangling symlink, then left empty, while the registry rotates the token",
        runs: 3,
        outcome: &format!(
            "each cycle failed with an error naming the file (directory: `{}`; dangling link: `{}`; \
             empty: `{}`), no crash; recovered each time the file was back, syft scanned an image \
             pushed meanwhile",
            short(&error),
            short(&error2),
            short(&error3)
        ),
        lost: 0,
        test: "faults_token::an_unreadable_token_file_is_logged_naming_the_file_and_the_daemon_recovers_when_it_is_back",
    });
}
