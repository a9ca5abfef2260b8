//! Crash points (issue 6, item 2): the real daemon is killed with SIGKILL while a tag
//! listing, a tag HEAD or a manifest GET is in flight (held at a slow proxy in front of
//! the real registry until the kill), while syft runs, during the very first start-up (as
//! soon as sled has created its files), and in a crash loop: kills during start-up and
//! listing, then kills a few milliseconds after grype exited, which land between "result
//! read", "intent committed", "files copied" and "state committed" (points no hook can
//! reach without test flags in product code). A crash is a container's: the daemon and
//! its scanners' process groups.
//!
//! After every kill the test checks, with the daemon dead: every file under `output.dir`
//! parses as complete JSON unless state records it as a pending write (start-up adopts or
//! deletes those), at most one result per digest and DB build, and every tag state knows
//! is in some `inventory/*.json`. After the last restart: exactly one result per image,
//! the one state names, every file complete and matching the size and sha256 state
//! recorded before writing it, every tag change the registry had in the inventory, no
//! failure record for a crash, nothing left in the scan temp dirs.
//!
//! Covered elsewhere and not repeated here: a kill while grype runs
//! (`tests/watcher.rs`, `kill_9_during_a_scan_...`) and while re-matching
//! (`tests/vulndb.rs`, `kill_9_during_rematching_...`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use spcs_image_scanner::state::{FileCheck, ImageStatus};
use support::daemon::{
    RunningDaemon, Scanner, files_under, hanging_wrapper, wait_for_file, wrapper_script,
};
use support::http1::read_request;
use support::oci::{DebianImage, ManifestFormat, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};
use tokio::io::{AsyncWriteExt as _, BufReader};

/// User-Agent prefix of the daemon's own requests (syft's differ).
const DAEMON_UA: &str = "spcs-image-scanner/";

// ---------------------------------------------------------------------------------------
// A slow proxy: forwards to the real registry, holding back the requests a predicate
// picks until released, so a kill lands while the daemon waits for that answer.

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    user_agent: String,
}

type Pick = dyn Fn(&Seen) -> bool + Send + Sync;

struct SlowProxy {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests that were held (picked while holding was on).
    held: Arc<Mutex<Vec<Seen>>>,
    holding: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Longest a request is held: bounded even if a test forgets to release.
const MAX_HOLD: Duration = Duration::from_secs(60);

impl SlowProxy {
    async fn start(upstream: &str, pick: impl Fn(&Seen) -> bool + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let holding = Arc::new(AtomicBool::new(true));
        let pick: Arc<Pick> = Arc::new(pick);
        let upstream = upstream.trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .expect("proxy client");
        let (s, h, on) = (seen.clone(), held.clone(), holding.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, h, on, pick, client, upstream) = (
                    s.clone(),
                    h.clone(),
                    on.clone(),
                    pick.clone(),
                    client.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    while let Some(req) = read_request(&mut reader).await {
                        let seen = Seen {
                            method: req.method.clone(),
                            target: req.target.clone(),
                            user_agent: req.header("user-agent").unwrap_or_default().to_string(),
                        };
                        s.lock().unwrap().push(seen.clone());
                        if on.load(Ordering::SeqCst) && pick(&seen) {
                            h.lock().unwrap().push(seen.clone());
                            let until = Instant::now() + MAX_HOLD;
                            while on.load(Ordering::SeqCst) && Instant::now() < until {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        let reply =
                            forward(&client, &upstream, &seen, &req.headers, req.body).await;
                        if write.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowProxy {
            port,
            seen,
            held,
            holding,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn release(&self) {
        self.holding.store(false, Ordering::SeqCst);
    }

    fn held(&self) -> Vec<Seen> {
        self.held.lock().unwrap().clone()
    }

    /// Waits (bounded) until a request is being held.
    async fn wait_held(&self, what: &str) -> Seen {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.held().first() {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} request reached the proxy; seen: {:?}",
                self.seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.release();
        self.task.abort();
    }
}

/// Forwards one request and renders the upstream answer as HTTP/1.1 bytes.
async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    seen: &Seen,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Vec<u8> {
    let method =
        reqwest::Method::from_bytes(seen.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut request = client.request(method, format!("{upstream}{}", seen.target));
    for (k, v) in headers {
        if !matches!(
            k.as_str(),
            "host" | "connection" | "content-length" | "transfer-encoding"
        ) {
            request = request.header(k, v);
        }
    }
    let (status, resp_headers, bytes) = match request.body(body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let bytes = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (status, headers, bytes)
        }
        Err(_) => (502, reqwest::header::HeaderMap::new(), Vec::new()),
    };
    let head = seen.method == "HEAD";
    let mut text = format!("HTTP/1.1 {status} X\r\n");
    for (k, v) in &resp_headers {
        let k = k.as_str();
        if matches!(k, "connection" | "transfer-encoding") || (k == "content-length" && !head) {
            continue;
        }
        text.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or_default()));
    }
    if !head {
        text.push_str(&format!("content-length: {}\r\n", bytes.len()));
    }
    text.push_str("\r\n");
    let mut out = text.into_bytes();
    if !head {
        out.extend_from_slice(&bytes);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The invariants.

/// What the checks after each kill learned: the output files state said it was about to
/// write (to check them once recovered) and how many kills there were.
#[derive(Default)]
struct Ledger {
    pending: BTreeMap<String, FileCheck>,
    kills: u64,
}

fn sha256_file(path: &Path) -> (u64, String) {
    use sha2::Digest as _;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        bytes.len() as u64,
        hex::encode(sha2::Sha256::digest(&bytes)),
    )
}

fn parses(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some()
}

/// `(repository, tag, digest)` of every inventory record with a change that points a tag
/// at a digest (`added` or `moved`).
fn inventory_keys(scanner: &Scanner) -> BTreeSet<(String, String, String)> {
    scanner
        .inventory()
        .into_iter()
        .flat_map(|(_, records)| records)
        .filter(|r| r["change"] != "removed")
        .map(|r| {
            (
                r["repository"].as_str().unwrap_or_default().to_string(),
                r["tag"].as_str().unwrap_or_default().to_string(),
                r["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Checks the invariants with the daemon dead (just killed). Partial files are allowed
/// only where state recorded a pending write: start-up settles those.
fn check_after_kill(scanner: &Scanner, ledger: &mut Ledger, label: &str) {
    ledger.kills += 1;
    let images = scanner.images();
    let mut pending_now = BTreeSet::new();
    for image in images.values() {
        if let Some(p) = &image.pending_write {
            for check in p.sbom.iter().chain(p.result.iter()) {
                pending_now.insert(check.path.clone());
                ledger.pending.insert(check.path.clone(), check.clone());
            }
        }
    }
    let out = scanner.output_dir();
    for file in files_under(&out) {
        let name = file
            .strip_prefix(&out)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if !parses(&file) {
            assert!(
                pending_now.contains(&name),
                "{label}: {name} is not complete JSON and no pending write covers it"
            );
        }
    }
    for (hex, files) in scanner.result_files() {
        assert!(
            files.len() <= 1,
            "{label}: more than one result for {hex} (one DB build): {files:?}"
        );
    }
    let inventory = inventory_keys(scanner);
    for tag in scanner.tags() {
        let key = (
            tag.repository.clone(),
            tag.tag.clone(),
            tag.image_digest.to_string(),
        );
        assert!(
            inventory.contains(&key),
            "{label}: state knows {key:?} but no inventory file records it"
        );
    }
}

/// Checks the final state after a clean run: every expected tag scanned exactly once,
/// every file complete and as recorded, every tag change in the inventory. Returns how
/// many images or inventory records were lost (asserted 0 by the caller, and recorded).
fn check_recovered(
    scanner: &Scanner,
    ledger: &Ledger,
    expected: &[(String, String, String)],
    label: &str,
) -> u64 {
    let mut lost = 0u64;
    let images = scanner.images();
    let out = scanner.output_dir();
    for file in files_under(&out) {
        assert!(
            parses(&file),
            "{label}: {} is not complete JSON",
            file.display()
        );
    }
    for (name, check) in &ledger.pending {
        let path = out.join(name);
        if path.exists() {
            assert_eq!(
                sha256_file(&path),
                (check.size, check.sha256.clone()),
                "{label}: {name} differs from what state recorded before writing it"
            );
        }
    }
    let results = scanner.result_files();
    let inventory = inventory_keys(scanner);
    for (repository, tag, digest) in expected {
        let Some(image) = images.get(digest) else {
            lost += 1;
            continue;
        };
        assert!(
            image.pending_write.is_none(),
            "{label}: {digest} still pending"
        );
        let hex = digest.trim_start_matches("sha256:");
        let files = results.get(hex).cloned().unwrap_or_default();
        if image.status != ImageStatus::Scanned || files.len() != 1 {
            lost += 1;
            eprintln!("{label}: {digest}: {:?}, results {files:?}", image.status);
            continue;
        }
        let recorded = image
            .last_scan
            .as_ref()
            .and_then(|s| s.result_file.clone())
            .unwrap_or_default();
        assert_eq!(
            out.join(&recorded),
            files[0],
            "{label}: the one result is the one state names"
        );
        if !inventory.contains(&(repository.clone(), tag.clone(), digest.clone())) {
            lost += 1;
            eprintln!("{label}: {repository}:{tag} -> {digest} missing from the inventory");
        }
    }
    let tmp = scanner.state_dir().join("tmp");
    assert!(
        std::fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()),
        "{label}: scan temp dirs left in {}",
        tmp.display()
    );
    lost
}

/// Pushes `repo:tag`, an image made distinct by `n`; returns `(repo, tag, digest)`.
async fn push(pusher: &Pusher, repo: &str, tag: &str, n: usize) -> (String, String, String) {
    let image = DebianImage::default().with_file("etc/crash-test", n.to_string().into_bytes());
    let pushed = pusher
        .push_image(repo, tag, &image, ManifestFormat::Oci)
        .await
        .expect("push");
    (repo.to_string(), tag.to_string(), pushed.digest)
}

async fn kill_9(daemon: &mut RunningDaemon) {
    daemon.signal(Signal::SIGKILL);
    let _ = daemon.wait_exit(Duration::from_secs(10)).await;
}

/// SIGKILL to every scanner process group whose leader's pid is listed in `pids` (the
/// rest of a crashed container), then empties the list.
fn kill_scanner_groups(pids: &Path) {
    let text = std::fs::read_to_string(pids).unwrap_or_default();
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 1 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = std::fs::write(pids, "");
}

fn tag_of(seen: &Seen) -> String {
    format!("{} {}", seen.method, seen.target)
}

// ---------------------------------------------------------------------------------------

/// One request kind held at the proxy while the daemon's second cycle (a new tag) runs;
/// SIGKILL once it is in flight; then `once` through the released proxy.
async fn kill_while_request_in_flight(what: &str, pick: fn(&Seen) -> bool) -> (u64, String) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut expected = vec![push(&pusher, "crash/app", "1", 1).await];
    let proxy = SlowProxy::start(&registry.url(), pick).await;
    proxy.release();
    let scanner = Scanner::new(&proxy.url());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);

    expected.push(push(&pusher, "crash/app", "2", 2).await);
    expected.push(push(&pusher, "crash/other", "1", 3).await);
    proxy.holding.store(true, Ordering::SeqCst);
    let mut daemon = scanner.spawn_run();
    let held = proxy.wait_held(what).await;
    kill_9(&mut daemon).await;
    let mut ledger = Ledger::default();
    check_after_kill(&scanner, &mut ledger, what);

    proxy.release();
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let lost = check_recovered(&scanner, &ledger, &expected, what);
    assert_eq!(lost, 0, "{what}: images or inventory records lost");
    (lost, tag_of(&held))
}

// Multi-threaded: `Scanner::once` blocks its thread while the proxy must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_tag_listing_is_in_flight_loses_no_tag_and_no_result() {
    let (lost, held) = kill_while_request_in_flight("tag listing", |s| {
        s.user_agent.starts_with(DAEMON_UA) && s.method == "GET" && s.target.contains("/tags/list")
    })
    .await;
    assert!(held.contains("/tags/list"), "{held}");
    record(Tried {
        area: "crash",
        fault: "SIGKILL while the daemon waits for a tags/list answer (held at a proxy)",
        runs: 1,
        outcome: "after restart: every tag in the inventory, one complete result per image",
        lost,
        test: "faults_crash::kill_9_while_a_tag_listing_is_in_flight_loses_no_tag_and_no_result",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_manifest_request_is_in_flight_loses_no_tag_and_no_result() {
    let (lost, held) = kill_while_request_in_flight("manifest", |s| {
        s.user_agent.starts_with(DAEMON_UA)
            && s.method == "GET"
            && s.target.contains("/manifests/sha256:")
    })
    .await;
    assert!(held.contains("/manifests/sha256:"), "{held}");
    record(Tried {
        area: "crash",
        fault: "SIGKILL while the daemon waits for a manifest GET of a new digest (held at a proxy)",
        runs: 1,
        outcome: "after restart: every tag in the inventory, one complete result per image",
        lost,
        test: "faults_crash::kill_9_while_a_manifest_request_is_in_flight_loses_no_tag_and_no_result",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_tag_head_is_in_flight_loses_no_tag_and_no_result() {
    let (lost, held) = kill_while_request_in_flight("tag HEAD", |s| {
        s.user_agent.starts_with(DAEMON_UA)
            && s.method == "HEAD"
            && s.target.ends_with("/manifests/2")
    })
    .await;
    assert!(held.starts_with("HEAD "), "{held}");
    record(Tried {
        area: "crash",
        fault: "SIGKILL while the daemon waits for the HEAD of a new tag's manifest (held at a proxy)",
        runs: 1,
        outcome: "after restart: every tag in the inventory, one complete result per image",
        lost,
        test: "faults_crash::kill_9_while_a_tag_head_is_in_flight_loses_no_tag_and_no_result",
    });
}

#[tokio::test]
async fn kill_9_while_syft_runs_rescans_after_restart_with_one_result_per_image() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut expected = vec![push(&pusher, "crash/syft", "1", 1).await];
    let mut scanner = Scanner::new(&registry.url());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let first = scanner.result_files();

    expected.push(push(&pusher, "crash/syft", "2", 2).await);
    let slow = hanging_wrapper(scanner.dir.path(), "syft-hangs", &support::daemon::syft());
    scanner.syft = slow.script.clone();
    let mut daemon = scanner.spawn_run();
    wait_for_file(&slow.started, Duration::from_secs(120)).await;
    daemon.crash(&slow.pidfile).await;
    let mut ledger = Ledger::default();
    check_after_kill(&scanner, &mut ledger, "syft");
    let new = &expected[1].2;
    assert_eq!(scanner.image(new).unwrap().status, ImageStatus::Scanning);

    scanner.syft = support::daemon::syft();
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["scanned"], 1, "only the interrupted image");
    let lost = check_recovered(&scanner, &ledger, &expected, "syft");
    assert_eq!(lost, 0);
    let old = expected[0].2.trim_start_matches("sha256:");
    assert_eq!(
        scanner.result_files()[old],
        first[old],
        "the earlier result is untouched"
    );
    assert!(
        scanner.failure_records().is_empty(),
        "a crash is not a failed scan"
    );
    record(Tried {
        area: "crash",
        fault: "SIGKILL of the daemon and syft's process group while syft pulls an image",
        runs: 1,
        outcome: "digest back to pending at start-up, scanned once after restart; earlier result untouched",
        lost,
        test: "faults_crash::kill_9_while_syft_runs_rescans_after_restart_with_one_result_per_image",
    });
}

/// Tries of [`kill_9_during_the_first_start_up_leaves_a_store_the_next_start_opens`].
const FIRST_START_KILLS: u64 = 5;

#[tokio::test]
async fn kill_9_during_the_first_start_up_leaves_a_store_the_next_start_opens() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let expected = vec![push(&pusher, "crash/first", "1", 1).await];
    let mut landed = 0u64;
    let mut set_up_again = 0u64;
    for attempt in 0..FIRST_START_KILLS {
        // A fresh state dir each time: the kill lands as soon as sled has created its
        // files, before the store is set up (a container killed right at its first start).
        let scanner = Scanner::new(&registry.url());
        let conf = scanner.state_dir().join("db").join("conf");
        let mut daemon = scanner.spawn_run();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !conf.exists() {
            assert!(
                Instant::now() < deadline,
                "sled never created {}",
                conf.display()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        // A few hundred microseconds more per attempt: later points of the creation.
        std::thread::sleep(Duration::from_micros(300 * attempt));
        kill_9(&mut daemon).await;
        landed += 1;
        let run = scanner.once();
        assert_eq!(
            run.code,
            Some(0),
            "attempt {attempt}: the next start after a kill during the first one\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let lost = check_recovered(&scanner, &Ledger::default(), &expected, "first start-up");
        assert_eq!(lost, 0);
        // A kill while sled wrote its own files: they are kept aside, with a warning.
        let kept_aside = std::fs::read_dir(scanner.state_dir())
            .expect("state dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("db.corrupt-"))
            .count();
        let warned = run
            .events("the store was never completely set up (no commit marker) and sled cannot read its files; moved them aside and setting up a new store")
            .len();
        assert_eq!(kept_aside, warned, "attempt {attempt}\n{}", run.stdout);
        set_up_again += kept_aside as u64;
    }
    record(Tried {
        area: "crash",
        fault: "SIGKILL during the very first start-up, as soon as sled created its files (fresh state dir each time, 0-1.2 ms later)",
        runs: landed,
        outcome: &format!(
            "the next start opened the store, scanned the image and wrote one result ({set_up_again} of {landed} found sled's files half-written before any commit: moved aside with a warning and set up again)"
        ),
        lost: 0,
        test: "faults_crash::kill_9_during_the_first_start_up_leaves_a_store_the_next_start_opens",
    });
}

/// Kills in the crash loop: the first [`EARLY_KILLS`] at plain delays after start-up
/// (start-up, listing, first scans), the rest just after grype exited, at offsets of a few
/// milliseconds: the window where the result is read, the intent committed, the files
/// copied and the state committed.
const CRASH_LOOP_RUNS: usize = 10;
const EARLY_KILLS: usize = 3;

/// A grype wrapper for scans that records its pid (its process group) and, after the
/// real grype exited, appends a line to `done`: the moment the daemon starts writing the
/// result.
fn grype_announcing_exit(dir: &Path, pids: &Path, done: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("grype-announces-exit");
    let grype = support::daemon::grype();
    let text = format!(
        "#!/bin/sh\ncase \"$1\" in\nsbom:*)\n  echo $$ >> {pids:?}\n  {grype:?} \"$@\"\n  rc=$?\n  \
         echo exited >> {done:?}\n  exit $rc;;\nesac\nexec {grype:?} \"$@\"\n",
        pids = pids.display().to_string(),
        done = done.display().to_string(),
        grype = grype.display().to_string(),
    );
    std::fs::write(&path, text).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[tokio::test]
async fn crash_loop_of_kill_9_from_start_up_to_the_state_commit_loses_nothing_and_leaves_no_partial_file()
 {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut scanner = Scanner::new(&registry.url());
    scanner.cron = "*/2 * * * * *".into();
    // Both scanners record their pid (their process group) so the test can kill what a
    // crashed container would lose with the daemon.
    let pids = scanner.dir.path().join("scanner-pids");
    let done = scanner.dir.path().join("grype-exits");
    scanner.syft = wrapper_script(
        scanner.dir.path(),
        "syft-pid",
        &format!("echo $$ >> {:?}", pids.display().to_string()),
        &support::daemon::syft(),
    );
    scanner.grype = Some(grype_announcing_exit(scanner.dir.path(), &pids, &done));
    let mut expected = vec![
        push(&pusher, "loop/a", "1", 0).await,
        push(&pusher, "loop/b", "1", 1).await,
    ];
    let mut ledger = Ledger::default();
    let (mut after_grype, mut settled) = (0u64, 0u64);
    for run in 0..CRASH_LOOP_RUNS {
        if run >= EARLY_KILLS {
            // New work for this run's kill to interrupt.
            expected.push(push(&pusher, "loop/a", &format!("r{run}"), run + 10).await);
        }
        let exits_before = line_count(&done);
        let mut daemon = scanner.spawn_run();
        // The delay is the experiment's variable (where the kill lands), not a wait for
        // a condition.
        let label = if run < EARLY_KILLS {
            let delay = Duration::from_millis(100 + 350 * run as u64);
            tokio::time::sleep(delay).await;
            format!("kill {run}, {delay:?} after start")
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            while line_count(&done) == exits_before {
                assert!(
                    Instant::now() < deadline && daemon.is_running(),
                    "run {run}: grype never finished\n{}",
                    daemon.output()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let offset = Duration::from_millis(3 * (run - EARLY_KILLS) as u64);
            tokio::time::sleep(offset).await;
            after_grype += 1;
            format!("kill {run}, {offset:?} after grype exited")
        };
        assert!(
            daemon.is_running(),
            "daemon died on its own\n{}",
            daemon.output()
        );
        kill_9(&mut daemon).await;
        kill_scanner_groups(&pids);
        let output = daemon.output();
        settled += (output
            .matches("results written just before a crash adopted")
            .count()
            + output.matches("from a crash removed").count()) as u64;
        check_after_kill(&scanner, &mut ledger, &label);
    }
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    settled += (run
        .stdout
        .matches("results written just before a crash adopted")
        .count()
        + run.stdout.matches("from a crash removed").count()) as u64;
    let lost = check_recovered(&scanner, &ledger, &expected, "crash loop");
    assert_eq!(lost, 0, "images or inventory records lost");
    assert!(
        scanner.failure_records().is_empty(),
        "crashes are not failed scans: {:?}",
        scanner.failure_records()
    );
    // Inventory is at-least-once: a kill between the inventory file and the commit makes
    // the next cycle see (and write) the same change again. Counted, not lost.
    let records: Vec<serde_json::Value> = scanner
        .inventory()
        .into_iter()
        .flat_map(|(_, r)| r)
        .collect();
    let distinct = inventory_keys(&scanner).len();
    let repeated = records.len() - distinct;
    let outcome = format!(
        "{} kills ({after_grype} within 0-18 ms after grype exited; {} found a pending write, \
         {settled} settled at start-up); every image scanned once, every file complete and as \
         recorded, every tag in the inventory ({repeated} of {} inventory records repeated \
         after a kill before the commit)",
        ledger.kills,
        ledger.pending.len(),
        records.len()
    );
    eprintln!("{outcome}");
    record(Tried {
        area: "crash",
        fault: "crash loop: SIGKILL of the daemon and its scanners, 3 times during start-up and listing, then 7 times 0-18 ms after grype exited (result read, intent, copies, state commit), a new tag each run",
        runs: ledger.kills,
        outcome: &outcome,
        lost,
        test: "faults_crash::crash_loop_of_kill_9_from_start_up_to_the_state_commit_loses_nothing_and_leaves_no_partial_file",
    });
}
