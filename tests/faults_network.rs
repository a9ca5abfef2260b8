//! Network faults between the daemon and a real registry (issue 6, item 1): the real
//! binary talks to a real `docker-registry` through a fault-injecting loopback proxy
//! ([`support::fault_proxy`]) that answers 500/502/503, 429 with `Retry-After`, resets
//! connections, truncates or replaces bodies, adds latency or never answers, on the
//! manifest HEADs, the catalog, the tag lists or the manifest GETs.
//!
//! Every case asserts: the cycle finishes or fails cleanly (exit code and log line as the
//! README says), the requests are bounded by `registry.max_retries` (set to
//! [`MAX_RETRIES`] here: exactly [`TRIES`] tries of a request that keeps failing), no
//! digest is `scanned` without its result file, and a failed request removes nothing from
//! the store. Then the fault is switched off and the next cycle scans what was missed,
//! once per digest. `tests/registry_client.rs` covers the client alone against scripted
//! servers; `tests/watcher.rs` covers a registry that stops; this file covers the
//! daemon, through the proxy, in front of the real registry.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spcs_image_scanner::state::ImageStatus;
use support::daemon::{RunOutput, RunningDaemon, Scanner};
use support::fault_proxy::{Fault, FaultProxy, PathKind, Rule, count};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};

/// `registry.max_retries` of every daemon here.
const MAX_RETRIES: usize = 2;
/// Tries of one request that keeps failing: the first and `MAX_RETRIES` retries.
const TRIES: usize = MAX_RETRIES + 1;
/// `registry.request_timeout` of every daemon here: small, so that a registry that never
/// answers costs seconds, yet far above what a loopback registry needs on a loaded machine.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The cap on `Retry-After` (README: "honoured up to 60 s").
const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);
/// User-Agent prefix of the daemon's own requests (syft's differ).
const DAEMON_UA: &str = "spcs-image-scanner/";
/// Bound on one `once` run (a generous deadline, not a timing assertion).
const ONCE_DEADLINE: Duration = Duration::from_secs(120);

const REPO: &str = "net/app";

/// A registry holding `net/app:1` (image A), a proxy in front, and a scanner pointed at
/// the proxy.
struct Setup {
    registry: TestRegistry,
    pusher: Pusher,
    proxy: FaultProxy,
    scanner: Scanner,
    a: PushedManifest,
}

async fn setup() -> Setup {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let a = pusher
        .push_image(REPO, "1", &DebianImage::default(), ManifestFormat::Oci)
        .await
        .expect("push A");
    let proxy = FaultProxy::start(&registry.host());
    let scanner = Scanner::new(&proxy.url());
    Setup {
        registry,
        pusher,
        proxy,
        scanner,
        a,
    }
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// The binary with this file's registry settings (environment overrides the file).
fn command(scanner: &Scanner, args: &[&str]) -> Command {
    let mut cmd = scanner.command(args);
    cmd.env("SCANNER__REGISTRY__MAX_RETRIES", MAX_RETRIES.to_string());
    cmd.env(
        "SCANNER__REGISTRY__REQUEST_TIMEOUT",
        format!("{}s", REQUEST_TIMEOUT.as_secs()),
    );
    cmd
}

/// `once`, to its end (bounded by [`ONCE_DEADLINE`]).
fn once(scanner: &Scanner) -> RunOutput {
    let mut child = command(scanner, &["once"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn once");
    let deadline = Instant::now() + ONCE_DEADLINE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "once did not finish within {ONCE_DEADLINE:?}: the daemon hangs\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    RunOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn dump(out: &RunOutput) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.code, out.stdout, out.stderr
    )
}

/// Checks the store against the output dir; returns what would be lost: digests marked
/// `scanned` whose result file (or SBOM) is missing, plus `expected_tags` (tag →
/// digest) the store no longer knows.
fn count_lost(scanner: &Scanner, expected_tags: &BTreeMap<&str, &str>) -> u64 {
    let mut lost = 0;
    for (digest, image) in scanner.images() {
        if image.status != ImageStatus::Scanned {
            continue;
        }
        let scan = image
            .last_scan
            .as_ref()
            .unwrap_or_else(|| panic!("{digest}: scanned without a scan record"));
        let files = scan
            .result_file
            .iter()
            .chain(std::iter::once(&scan.sbom_file));
        for file in files {
            if !scanner.output_dir().join(file).is_file() {
                eprintln!("{digest}: scanned, but {file} is missing");
                lost += 1;
            }
        }
    }
    let tags: BTreeMap<String, String> = scanner
        .tags()
        .into_iter()
        .map(|t| (t.tag, t.digest.to_string()))
        .collect();
    for (tag, digest) in expected_tags {
        if tags.get(*tag).map(String::as_str) != Some(*digest) {
            eprintln!(
                "tag {tag} (→ {digest}) lost: the store has {:?}",
                tags.get(*tag)
            );
            lost += 1;
        }
    }
    lost
}

/// Result files per digest hex.
fn results(scanner: &Scanner) -> BTreeMap<String, usize> {
    scanner
        .result_files()
        .into_iter()
        .map(|(hex, files)| (hex, files.len()))
        .collect()
}

/// The baseline: a clean `once` that scans A.
fn scan_baseline(s: &Setup) {
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    assert_eq!(out.summary()["scanned"], 1, "{}", dump(&out));
    assert_eq!(results(&s.scanner), BTreeMap::from([(hex(&s.a.digest), 1)]));
}

/// The faults every kind of request gets: each fails the request, and a client must try
/// it again up to `max_retries` times (a 429 with `Retry-After: 0` is retried at once).
fn failing_faults() -> Vec<Fault> {
    vec![
        Fault::Status(500),
        Fault::Status(502),
        Fault::Status(503),
        Fault::TooManyRequests {
            retry_after: "0".into(),
        },
        Fault::Reset,
        Fault::Hang,
    ]
}

/// The error text of the single `message` line, which must name the proxy (the
/// registry the daemon knows), the method and the path.
fn error_of(
    out: &RunOutput,
    message: &str,
    method: &str,
    path: &str,
    proxy: &FaultProxy,
) -> String {
    let events = out.events(message);
    assert_eq!(events.len(), 1, "one {message:?} line\n{}", dump(out));
    let error = events[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains(&proxy.host()) && error.contains(method) && error.contains(path),
        "{message}: the error names the registry, {method} and {path}: {error}"
    );
    error
}

/// What a failing fault must show in the error text.
fn assert_error_says(fault: &Fault, error: &str) {
    let want = match fault {
        Fault::Status(code) => code.to_string(),
        Fault::TooManyRequests { .. } => "429".into(),
        Fault::Hang => format!("no answer within {REQUEST_TIMEOUT:?}"),
        Fault::Reset | Fault::Truncate => "request failed".into(),
        _ => return,
    };
    assert!(error.contains(&want), "{fault:?}: {want:?} in {error}");
}

#[tokio::test]
async fn faults_on_manifest_heads_end_the_cycle_cleanly_within_the_retry_bound_and_keep_the_tag() {
    let s = setup().await;
    scan_baseline(&s);
    let tags = BTreeMap::from([("1", s.a.digest.as_str())]);
    let head_path = format!("/v2/{REPO}/manifests/1");

    for fault in failing_faults() {
        s.proxy.set(
            Rule::new(fault.clone())
                .method("HEAD")
                .kind(PathKind::Manifest),
        );
        let mark = s.proxy.mark();
        let out = once(&s.scanner);
        // The cycle finishes (the catalog and tags were listed); the tag is an error,
        // kept as it was; no scan failed, so `once` exits 0.
        assert_eq!(out.code, Some(0), "{fault:?}\n{}", dump(&out));
        let summary = out.summary();
        assert_eq!(summary["errors"], 1, "{fault:?}: {summary}");
        assert_eq!(summary["removed"], 0, "{fault:?}: {summary}");
        assert_eq!(summary["scanned"], 0, "{fault:?}: {summary}");
        let error = error_of(
            &out,
            "cannot resolve tag; keeping what is known",
            "HEAD",
            &head_path,
            &s.proxy,
        );
        assert_error_says(&fault, &error);
        let seen = s.proxy.requests_since(mark);
        assert_eq!(
            count(&seen, "HEAD", PathKind::Manifest),
            TRIES,
            "{fault:?}: one try and {MAX_RETRIES} retries: {seen:#?}"
        );
        assert_eq!(count(&seen, "GET", PathKind::Manifest), 0, "{fault:?}");
        assert_eq!(s.proxy.faults_since(mark).get(&fault.label()), Some(&TRIES));
        let lost = count_lost(&s.scanner, &tags);
        assert_eq!(lost, 0, "{fault:?}");
        assert_eq!(results(&s.scanner), BTreeMap::from([(hex(&s.a.digest), 1)]));
        record(Tried {
            area: "network",
            fault: &format!(
                "registry answers every manifest HEAD with: {}",
                fault.label()
            ),
            runs: TRIES as u64,
            outcome: &format!(
                "cycle finished, exit 0, `cannot resolve tag; keeping what is known` naming HEAD {head_path}; {TRIES} HEADs (max_retries={MAX_RETRIES}); tag kept, nothing rescanned"
            ),
            lost,
            test: "faults_network::faults_on_manifest_heads_end_the_cycle_cleanly_within_the_retry_bound_and_keep_the_tag",
        });
    }

    // Latency below the timeout is only slower: the HEAD succeeds at the first try.
    let fault = Fault::Latency(Duration::from_millis(300));
    s.proxy.set(
        Rule::new(fault.clone())
            .method("HEAD")
            .kind(PathKind::Manifest),
    );
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    let summary = out.summary();
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["unchanged"], 1, "{summary}");
    let seen = s.proxy.requests_since(mark);
    assert_eq!(count(&seen, "HEAD", PathKind::Manifest), 1, "{seen:#?}");
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    record(Tried {
        area: "network",
        fault: &format!(
            "300 ms latency on every manifest HEAD (request_timeout {REQUEST_TIMEOUT:?})"
        ),
        runs: 1,
        outcome: "cycle finished unchanged, exit 0; 1 HEAD, no retry",
        lost,
        test: "faults_network::faults_on_manifest_heads_end_the_cycle_cleanly_within_the_retry_bound_and_keep_the_tag",
    });

    // Fail the first two tries, then forward: the third try succeeds within the cycle.
    let fault = Fault::Status(503);
    s.proxy.set(
        Rule::new(fault)
            .method("HEAD")
            .kind(PathKind::Manifest)
            .first(MAX_RETRIES as u64),
    );
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    let summary = out.summary();
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["unchanged"], 1, "{summary}");
    assert_eq!(
        count(&s.proxy.requests_since(mark), "HEAD", PathKind::Manifest),
        TRIES
    );
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    record(Tried {
        area: "network",
        fault: "the first 2 manifest HEADs answer 503, then the registry answers",
        runs: 1,
        outcome: "retried within the cycle: 3 HEADs, cycle finished unchanged, exit 0",
        lost,
        test: "faults_network::faults_on_manifest_heads_end_the_cycle_cleanly_within_the_retry_bound_and_keep_the_tag",
    });

    // Ten tags, every HEAD reset: past 8 consecutive connection failures the cycle gives
    // up as a whole (README), with a bounded number of requests, and commits nothing.
    let extra: Vec<String> = (2..=10).map(|n| format!("t{n}")).collect();
    for tag in &extra {
        s.pusher
            .push_image(REPO, tag, &DebianImage::default(), ManifestFormat::Oci)
            .await
            .expect("push another tag of A");
    }
    s.proxy.set(
        Rule::new(Fault::Reset)
            .method("HEAD")
            .kind(PathKind::Manifest),
    );
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(1), "{}", dump(&out));
    assert!(out.events("cycle finished").is_empty(), "{}", dump(&out));
    let failed = out.events("cycle failed; will try again at the next tick");
    assert_eq!(failed.len(), 1, "{}", dump(&out));
    let error = failed[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("gave up after 8 consecutive failures") && error.contains("HEAD"),
        "{error}"
    );
    let heads = count(&s.proxy.requests_since(mark), "HEAD", PathKind::Manifest);
    assert!(
        (8..=(1 + extra.len()) * TRIES).contains(&heads),
        "{heads} HEADs for {} tags",
        1 + extra.len()
    );
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    assert!(
        !s.scanner.tags().iter().any(|t| t.tag.starts_with('t')),
        "nothing of a failed pass is committed"
    );
    record(Tried {
        area: "network",
        fault: "every manifest HEAD reset, 10 tags",
        runs: heads as u64,
        outcome: &format!(
            "cycle failed cleanly after 8 consecutive connection failures, exit 1; {heads} HEADs (at most {TRIES} per tag); nothing committed, the known tag kept"
        ),
        lost,
        test: "faults_network::faults_on_manifest_heads_end_the_cycle_cleanly_within_the_retry_bound_and_keep_the_tag",
    });
}

#[tokio::test]
async fn faults_on_the_catalog_fail_the_cycle_cleanly_and_keep_the_store() {
    let s = setup().await;
    scan_baseline(&s);
    let tags = BTreeMap::from([("1", s.a.digest.as_str())]);
    let mut faults = failing_faults();
    faults.push(Fault::Truncate);

    for fault in &faults {
        // The catalog: nothing can be listed, so the cycle fails and `once` exits 1.
        s.proxy.set(
            Rule::new(fault.clone())
                .method("GET")
                .kind(PathKind::Catalog),
        );
        let mark = s.proxy.mark();
        let out = once(&s.scanner);
        assert_eq!(out.code, Some(1), "{fault:?}\n{}", dump(&out));
        assert!(out.events("cycle finished").is_empty(), "{}", dump(&out));
        let error = error_of(
            &out,
            "cycle failed; will try again at the next tick",
            "GET",
            "/v2/_catalog",
            &s.proxy,
        );
        assert_error_says(fault, &error);
        let seen = s.proxy.requests_since(mark);
        assert_eq!(
            count(&seen, "GET", PathKind::Catalog),
            TRIES,
            "{fault:?}: {seen:#?}"
        );
        assert_eq!(count(&seen, "GET", PathKind::TagList), 0, "{fault:?}");
        assert_eq!(count(&seen, "HEAD", PathKind::Manifest), 0, "{fault:?}");
        let lost = count_lost(&s.scanner, &tags);
        assert_eq!(lost, 0, "{fault:?}");
        record(Tried {
            area: "network",
            fault: &format!("registry answers the catalog with: {}", fault.label()),
            runs: TRIES as u64,
            outcome: &format!(
                "cycle failed cleanly, exit 1, `cycle failed` naming GET /v2/_catalog; {TRIES} catalog GETs (max_retries={MAX_RETRIES}); store untouched"
            ),
            lost,
            test: "faults_network::faults_on_the_catalog_fail_the_cycle_cleanly_and_keep_the_store",
        });
    }
}

#[tokio::test]
async fn faults_on_tag_lists_end_the_cycle_cleanly_and_keep_the_tags() {
    let s = setup().await;
    scan_baseline(&s);
    let tags = BTreeMap::from([("1", s.a.digest.as_str())]);
    let mut faults = failing_faults();
    faults.push(Fault::Truncate);

    for fault in &faults {
        // The tag list: the repository is an error, its tags are kept.
        s.proxy.set(
            Rule::new(fault.clone())
                .method("GET")
                .kind(PathKind::TagList),
        );
        let mark = s.proxy.mark();
        let out = once(&s.scanner);
        assert_eq!(out.code, Some(0), "{fault:?}\n{}", dump(&out));
        let summary = out.summary();
        assert_eq!(summary["errors"], 1, "{fault:?}: {summary}");
        assert_eq!(summary["removed"], 0, "{fault:?}: {summary}");
        let error = error_of(
            &out,
            "cannot list tags; keeping what is known",
            "GET",
            &format!("/v2/{REPO}/tags/list"),
            &s.proxy,
        );
        assert_error_says(fault, &error);
        let seen = s.proxy.requests_since(mark);
        assert_eq!(count(&seen, "GET", PathKind::Catalog), 1, "{fault:?}");
        assert_eq!(
            count(&seen, "GET", PathKind::TagList),
            TRIES,
            "{fault:?}: {seen:#?}"
        );
        assert_eq!(count(&seen, "HEAD", PathKind::Manifest), 0, "{fault:?}");
        let lost = count_lost(&s.scanner, &tags);
        assert_eq!(lost, 0, "{fault:?}");
        assert_eq!(results(&s.scanner), BTreeMap::from([(hex(&s.a.digest), 1)]));
        record(Tried {
            area: "network",
            fault: &format!("registry answers the tag list with: {}", fault.label()),
            runs: TRIES as u64,
            outcome: &format!(
                "cycle finished, exit 0, `cannot list tags; keeping what is known`; {TRIES} tags/list GETs; the repository's tag stays known"
            ),
            lost,
            test: "faults_network::faults_on_tag_lists_end_the_cycle_cleanly_and_keep_the_tags",
        });
    }
}

#[tokio::test]
async fn faults_on_manifest_gets_leave_a_new_digest_unrecorded_until_a_clean_cycle_scans_it_once() {
    let s = setup().await;
    scan_baseline(&s);
    let b = s
        .pusher
        .push_image(
            REPO,
            "2",
            &DebianImage::default().with_file("etc/b", b"b"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push B");
    let get_path = format!("/v2/{REPO}/manifests/{}", b.digest);
    let tags = BTreeMap::from([("1", s.a.digest.as_str())]);
    let mut faults = failing_faults();
    faults.push(Fault::Truncate);

    let by_digest = |fault: Fault| {
        Rule::new(fault)
            .method("GET")
            .kind(PathKind::Manifest)
            .path_contains("/manifests/sha256:")
            .user_agent(DAEMON_UA)
    };
    for fault in &faults {
        s.proxy.set(by_digest(fault.clone()));
        let mark = s.proxy.mark();
        let out = once(&s.scanner);
        assert_eq!(out.code, Some(0), "{fault:?}\n{}", dump(&out));
        let summary = out.summary();
        assert_eq!(summary["errors"], 1, "{fault:?}: {summary}");
        assert_eq!(summary["added"], 0, "{fault:?}: {summary}");
        assert_eq!(summary["scanned"], 0, "{fault:?}: {summary}");
        let error = error_of(
            &out,
            "cannot read manifest; retrying next cycle",
            "GET",
            &get_path,
            &s.proxy,
        );
        assert_error_says(fault, &error);
        let seen = s.proxy.requests_since(mark);
        let gets: Vec<_> = seen
            .iter()
            .filter(|r| r.is("GET", PathKind::Manifest))
            .collect();
        assert_eq!(gets.len(), TRIES, "{fault:?}: {seen:#?}");
        assert!(
            gets.iter().all(|r| r.user_agent.starts_with(DAEMON_UA)),
            "no scanner ran: {gets:#?}"
        );
        assert!(
            s.scanner.image(&b.digest).is_none(),
            "{fault:?}: B recorded from a failed GET"
        );
        assert!(
            !s.scanner.tags().iter().any(|t| t.tag == "2"),
            "{fault:?}: tag 2 recorded without its manifest"
        );
        let lost = count_lost(&s.scanner, &tags);
        assert_eq!(lost, 0, "{fault:?}");
        record(Tried {
            area: "network",
            fault: &format!(
                "registry answers the manifest GET of a new digest with: {}",
                fault.label()
            ),
            runs: TRIES as u64,
            outcome: &format!(
                "cycle finished, exit 0, `cannot read manifest; retrying next cycle`; {TRIES} GETs; the new digest and its tag not recorded, nothing scanned"
            ),
            lost,
            test: "faults_network::faults_on_manifest_gets_leave_a_new_digest_unrecorded_until_a_clean_cycle_scans_it_once",
        });
    }

    // A body of the right length that is another manifest: the digest check refuses it,
    // and a refused digest is not a transient fault (no retry).
    let other = DebianImage::default().build(ManifestFormat::Oci).manifest;
    s.proxy.set(by_digest(Fault::ReplaceBody(other)));
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    let error = error_of(
        &out,
        "cannot read manifest; retrying next cycle",
        "GET",
        &get_path,
        &s.proxy,
    );
    assert!(error.contains("digest"), "{error}");
    assert_eq!(
        count(&s.proxy.requests_since(mark), "GET", PathKind::Manifest),
        1,
        "a digest mismatch is not retried"
    );
    assert!(s.scanner.image(&b.digest).is_none());
    assert!(out.events("scan started").is_empty(), "{}", dump(&out));
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    record(Tried {
        area: "network",
        fault: "the manifest GET of a new digest answers another manifest (same headers, matching Content-Length)",
        runs: 1,
        outcome: "digest check refused it: 1 GET, not retried, digest not recorded, no scan",
        lost,
        test: "faults_network::faults_on_manifest_gets_leave_a_new_digest_unrecorded_until_a_clean_cycle_scans_it_once",
    });

    // The manifest GET works again, but syft's blob GETs are reset: B is recorded, its
    // scan fails (exit 1), and nothing claims it was scanned.
    s.proxy
        .set(Rule::new(Fault::Reset).method("GET").kind(PathKind::Blob));
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(1), "a failed scan: exit 1\n{}", dump(&out));
    let summary = out.summary();
    assert_eq!(summary["added"], 1, "{summary}");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["scanned"], 0, "{summary}");
    let blobs: Vec<_> = s
        .proxy
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is("GET", PathKind::Blob))
        .collect();
    assert!(!blobs.is_empty(), "syft fetched through the proxy");
    assert!(
        blobs.iter().all(|r| !r.user_agent.starts_with(DAEMON_UA)),
        "only the scanner reads blobs: {blobs:#?}"
    );
    let failed = s.scanner.image(&b.digest).expect("B recorded");
    assert_eq!(failed.status, ImageStatus::Failed);
    assert!(failed.last_scan.is_none());
    assert!(!results(&s.scanner).contains_key(&hex(&b.digest)));
    assert!(
        s.scanner
            .failure_records()
            .iter()
            .any(|(_, r)| r["digest"] == b.digest.as_str()),
        "a failure record for B"
    );
    let tags = BTreeMap::from([("1", s.a.digest.as_str()), ("2", b.digest.as_str())]);
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    record(Tried {
        area: "network",
        fault: "every blob GET (syft's image pull) reset by the registry",
        runs: blobs.len() as u64,
        outcome: "the scan failed and was recorded failed with a failure record, no result file, exit 1; retried after its back-off",
        lost,
        test: "faults_network::faults_on_manifest_gets_leave_a_new_digest_unrecorded_until_a_clean_cycle_scans_it_once",
    });

    // Switched off: once B's back-off is over, the next cycle scans it, once; A is not
    // scanned again.
    s.proxy.clear();
    let due = failed.next_retry.expect("a failed scan has a next retry");
    let deadline = Instant::now() + Duration::from_secs(30);
    while chrono::Utc::now() <= due {
        assert!(Instant::now() < deadline, "next retry {due} is too far off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    let summary = out.summary();
    assert_eq!(summary["unchanged"], 2, "{summary}");
    assert_eq!(summary["scanned"], 1, "{summary}");
    assert_eq!(
        results(&s.scanner),
        BTreeMap::from([(hex(&s.a.digest), 1), (hex(&b.digest), 1)])
    );
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    record(Tried {
        area: "network",
        fault: "manifest GET and blob faults switched off after 9 failed cycles",
        runs: 1,
        outcome: "the next cycle scanned the missed digest once; one result file per digest",
        lost,
        test: "faults_network::faults_on_manifest_gets_leave_a_new_digest_unrecorded_until_a_clean_cycle_scans_it_once",
    });
}

/// The retry of the first throttled request of `kind`: (429 sent, retry arrived).
fn throttle_gap(proxy: &FaultProxy, mark: usize, method: &str, kind: PathKind) -> Duration {
    let seen: Vec<_> = proxy
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is(method, kind))
        .collect();
    assert_eq!(seen.len(), 2, "429 then one retry: {seen:#?}");
    assert!(
        seen[0].fault.is_some() && seen[1].fault.is_none(),
        "{seen:#?}"
    );
    let sent = seen[0].answered.expect("the 429 was sent");
    seen[1].arrived.duration_since(sent)
}

#[tokio::test]
async fn retry_after_is_waited_for_and_one_beyond_the_cap_fails_at_once() {
    let s = setup().await;
    scan_baseline(&s);
    let tags = BTreeMap::from([("1", s.a.digest.as_str())]);
    let advertised = Duration::from_secs(2);
    let throttled = |retry_after: &str| Fault::TooManyRequests {
        retry_after: retry_after.into(),
    };

    // HEAD: 429 with Retry-After: 2 once, then forwarded.
    s.proxy.set(
        Rule::new(throttled("2"))
            .method("HEAD")
            .kind(PathKind::Manifest)
            .first(1),
    );
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    assert_eq!(out.summary()["unchanged"], 1, "{}", dump(&out));
    let gap = throttle_gap(&s.proxy, mark, "HEAD", PathKind::Manifest);
    assert!(
        gap >= advertised,
        "the retry came {gap:?} after `Retry-After: 2`"
    );
    let lost_head = count_lost(&s.scanner, &tags);
    assert_eq!(lost_head, 0);

    // The manifest GET of a new digest: the same.
    let b = s
        .pusher
        .push_image(
            REPO,
            "2",
            &DebianImage::default().with_file("etc/b", b"b"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push B");
    let by_digest = |fault: Fault| {
        Rule::new(fault)
            .method("GET")
            .kind(PathKind::Manifest)
            .path_contains("/manifests/sha256:")
            .user_agent(DAEMON_UA)
    };
    s.proxy.set(by_digest(throttled("2")).first(1));
    let mark = s.proxy.mark();
    let out = once(&s.scanner);
    assert_eq!(out.code, Some(0), "{}", dump(&out));
    let summary = out.summary();
    assert_eq!(summary["added"], 1, "{summary}");
    assert_eq!(summary["scanned"], 1, "{summary}");
    let daemon_gets: Vec<_> = s
        .proxy
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.is("GET", PathKind::Manifest) && r.user_agent.starts_with(DAEMON_UA))
        .collect();
    assert_eq!(daemon_gets.len(), 2, "{daemon_gets:#?}");
    let gap_get = daemon_gets[1]
        .arrived
        .duration_since(daemon_gets[0].answered.expect("429 sent"));
    assert!(
        gap_get >= advertised,
        "the GET retry came {gap_get:?} after `Retry-After: 2`"
    );
    let tags = BTreeMap::from([("1", s.a.digest.as_str()), ("2", b.digest.as_str())]);
    let lost_get = count_lost(&s.scanner, &tags);
    assert_eq!(lost_get, 0);
    for (what, gap, lost) in [
        ("manifest HEAD", gap, lost_head),
        ("manifest GET", gap_get, lost_get),
    ] {
        record(Tried {
            area: "network",
            fault: &format!("the first {what} answers 429 with Retry-After: 2"),
            runs: 2,
            outcome: &format!(
                "retried once, not before the advertised delay (after {:.1} s); cycle finished, exit 0",
                gap.as_secs_f64()
            ),
            lost,
            test: "faults_network::retry_after_is_waited_for_and_one_beyond_the_cap_fails_at_once",
        });
    }

    // Beyond the cap: no wait, no retry; the cycle ends with the tag kept.
    let c = s
        .pusher
        .push_image(
            REPO,
            "3",
            &DebianImage::default().with_file("etc/c", b"c"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push C");
    // C's manifest GET stays throttled throughout, so C is never recorded here.
    let c_get = || by_digest(throttled("3600"));
    for (what, rules, message, method, path, code) in [
        (
            "manifest GET",
            vec![c_get()],
            "cannot read manifest; retrying next cycle",
            "GET",
            format!("/v2/{REPO}/manifests/{}", c.digest),
            0,
        ),
        (
            "manifest HEAD",
            vec![
                Rule::new(throttled("3600"))
                    .method("HEAD")
                    .kind(PathKind::Manifest)
                    .path_contains("/manifests/1"),
                c_get(),
            ],
            "cannot resolve tag; keeping what is known",
            "HEAD",
            format!("/v2/{REPO}/manifests/1"),
            0,
        ),
        (
            "catalog",
            vec![
                Rule::new(throttled("3600"))
                    .method("GET")
                    .kind(PathKind::Catalog),
            ],
            "cycle failed; will try again at the next tick",
            "GET",
            "/v2/_catalog".to_string(),
            1,
        ),
    ] {
        s.proxy.set_rules(rules);
        let mark = s.proxy.mark();
        let started = Instant::now();
        let out = once(&s.scanner);
        let took = started.elapsed();
        assert_eq!(out.code, Some(code), "{what}\n{}", dump(&out));
        let error = error_of(&out, message, method, &path, &s.proxy);
        assert!(error.contains("429"), "{error}");
        let seen = s.proxy.requests_since(mark);
        let throttled_requests = seen
            .iter()
            .filter(|r| r.fault.is_some() && r.path.split('?').next() == Some(path.as_str()))
            .count();
        assert_eq!(throttled_requests, 1, "no retry: {seen:#?}");
        // A correctness bound, not a speed one: it did not wait out the cap.
        assert!(took < RETRY_AFTER_CAP, "took {took:?}");
        assert!(s.scanner.image(&c.digest).is_none(), "C recorded");
        let lost = count_lost(&s.scanner, &tags);
        assert_eq!(lost, 0);
        record(Tried {
            area: "network",
            fault: &format!("the {what} answers 429 with Retry-After: 3600 (over the 60 s cap)"),
            runs: 1,
            outcome: &format!(
                "failed at once without waiting: 1 request, `{message}` naming 429; store untouched"
            ),
            lost,
            test: "faults_network::retry_after_is_waited_for_and_one_beyond_the_cap_fails_at_once",
        });
    }
    assert_eq!(
        results(&s.scanner),
        BTreeMap::from([(hex(&s.a.digest), 1), (hex(&b.digest), 1)])
    );
}

#[tokio::test]
async fn a_registry_that_fails_then_never_answers_is_survived_and_the_next_clean_cycle_scans_each_digest_once()
 {
    let mut s = setup().await;
    // A second image under two tags: three tags, two digests, nothing scanned yet.
    let b_image = DebianImage::default().with_file("etc/b", b"b");
    let b = s
        .pusher
        .push_image(REPO, "2", &b_image, ManifestFormat::Oci)
        .await
        .expect("push B");
    s.pusher
        .push_image(REPO, "latest", &b_image, ManifestFormat::Oci)
        .await
        .expect("push B as latest");
    s.scanner.cron = "*/2 * * * * *".into();

    // Phase 1: every manifest HEAD resets the connection; cycles finish with errors and
    // scan nothing.
    s.proxy.set(
        Rule::new(Fault::Reset)
            .method("HEAD")
            .kind(PathKind::Manifest),
    );
    let mut daemon = RunningDaemon::spawn(command(&s.scanner, &["run"]));
    let deadline = Duration::from_secs(60);
    for n in 0..2 {
        let e = daemon
            .wait_next("cycle finished", n, deadline, |_| true)
            .await;
        assert_eq!(e["errors"], 3, "{e}");
        assert_eq!(e["added"], 0, "{e}");
        assert_eq!(e["scanned"], 0, "{e}");
    }
    let reset_heads = count(&s.proxy.requests(), "HEAD", PathKind::Manifest);
    let cycles = daemon.events("cycle finished").len()
        + daemon
            .events("cycle failed; will try again at the next tick")
            .len();
    assert!(
        reset_heads <= cycles * 3 * TRIES,
        "{reset_heads} HEADs in {cycles} cycles: over {TRIES} per tag per cycle"
    );

    // Phase 2: the registry never answers the catalog: each cycle ends after the
    // request timeout (3 tries), with a clear line; the daemon stays up.
    s.proxy
        .set(Rule::new(Fault::Hang).method("GET").kind(PathKind::Catalog));
    let failed_before = daemon
        .events("cycle failed; will try again at the next tick")
        .len();
    let mark = s.proxy.mark();
    let e = daemon
        .wait_next(
            "cycle failed; will try again at the next tick",
            failed_before,
            deadline,
            |_| true,
        )
        .await;
    let error = e["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("/v2/_catalog")
            && error.contains(&format!("no answer within {REQUEST_TIMEOUT:?}")),
        "{error}"
    );
    let hung = s
        .proxy
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.fault.is_some())
        .count();
    assert!(hung >= TRIES, "{hung} hung catalog requests");
    assert!(daemon.child.try_wait().expect("try_wait").is_none());
    assert!(
        daemon.events("scan started").is_empty(),
        "{}",
        daemon.output()
    );

    // Phase 3: switched off; the next cycle adds the three tags and scans both digests.
    s.proxy.clear();
    let finished_before = daemon.events("cycle finished").len();
    let e = daemon
        .wait_next(
            "cycle finished",
            finished_before,
            Duration::from_secs(120),
            |e| e["added"] == 3,
        )
        .await;
    assert_eq!(e["scanned"], 2, "{e}");
    assert_eq!(e["errors"], 0, "{e}");
    // And one more clean cycle: unchanged, nothing scanned again.
    let finished_before = daemon.events("cycle finished").len();
    let e = daemon
        .wait_next("cycle finished", finished_before, deadline, |_| true)
        .await;
    assert_eq!(e["unchanged"], 3, "{e}");
    assert_eq!(e["scanned"], 0, "{e}");
    assert_eq!(
        daemon.stop(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        daemon.output()
    );

    let started: BTreeSet<String> = daemon
        .events("scan started")
        .iter()
        .map(|e| e["digest"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        daemon.events("scan started").len(),
        2,
        "{}",
        daemon.output()
    );
    assert_eq!(
        started,
        BTreeSet::from([s.a.digest.clone(), b.digest.clone()])
    );
    assert_eq!(
        results(&s.scanner),
        BTreeMap::from([(hex(&s.a.digest), 1), (hex(&b.digest), 1)])
    );
    let tags = BTreeMap::from([
        ("1", s.a.digest.as_str()),
        ("2", b.digest.as_str()),
        ("latest", b.digest.as_str()),
    ]);
    let lost = count_lost(&s.scanner, &tags);
    assert_eq!(lost, 0);
    assert!(
        s.registry
            .requests()
            .iter()
            .any(|r| r.user_agent_starts_with(DAEMON_UA)),
        "the proxy forwarded the daemon's requests to the real registry"
    );
    record(Tried {
        area: "network",
        fault: &format!(
            "`run`: every manifest HEAD reset for 2+ cycles, then the catalog never answered (request_timeout {REQUEST_TIMEOUT:?}), then switched off"
        ),
        runs: cycles as u64,
        outcome: &format!(
            "cycles finished with errors, then failed with `no answer within {REQUEST_TIMEOUT:?}`; the daemon stayed up; the first clean cycle scanned both digests once (one result file each), the next was unchanged; SIGTERM exit 0"
        ),
        lost,
        test: "faults_network::a_registry_that_fails_then_never_answers_is_survived_and_the_next_clean_cycle_scans_each_digest_once",
    });
}

#[tokio::test]
async fn the_fault_proxy_forwards_and_injects_each_fault_as_described() {
    let s = setup().await;
    support::oci::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let manifest_url = format!("{}/v2/{REPO}/manifests/{}", s.proxy.url(), s.a.digest);
    let get = || {
        http.get(&manifest_url)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
    };
    let original = get().await.expect("forwarded").bytes().await.expect("body");
    assert_eq!(
        support::oci::sha256_digest(&original),
        s.a.digest,
        "forwarded unchanged"
    );

    s.proxy
        .set(Rule::new(Fault::Status(502)).kind(PathKind::Manifest));
    assert_eq!(get().await.expect("answer").status(), 502);

    s.proxy.set(Rule::new(Fault::TooManyRequests {
        retry_after: "7".into(),
    }));
    let throttled = get().await.expect("answer");
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["retry-after"], "7");

    s.proxy.set(Rule::new(Fault::Truncate));
    let truncated = get().await.expect("headers");
    assert_eq!(truncated.content_length(), Some(original.len() as u64));
    assert!(truncated.bytes().await.is_err(), "half a body, then closed");

    s.proxy.set(Rule::new(Fault::ReplaceBody(b"{}".to_vec())));
    assert_eq!(
        &get().await.expect("answer").bytes().await.unwrap()[..],
        b"{}"
    );

    s.proxy.set(Rule::new(Fault::Reset));
    assert!(get().await.is_err(), "reset");

    s.proxy.set(Rule::new(Fault::Hang));
    let err = get().await.expect_err("no answer");
    assert!(err.is_timeout(), "{err}");

    // Narrow rules: another method or kind is forwarded; `first` counts down.
    s.proxy.set(
        Rule::new(Fault::Status(500))
            .method("HEAD")
            .kind(PathKind::Manifest)
            .first(1),
    );
    let mark = s.proxy.mark();
    assert_eq!(get().await.expect("GET forwarded").status(), 200);
    let head = || {
        http.head(&manifest_url)
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
    };
    assert_eq!(head().await.expect("answer").status(), 500);
    assert_eq!(head().await.expect("answer").status(), 200);
    let counts = s.proxy.counts_since(mark);
    assert_eq!(counts[&("GET".to_string(), PathKind::Manifest)], 1);
    assert_eq!(counts[&("HEAD".to_string(), PathKind::Manifest)], 2);
    assert_eq!(
        s.proxy.faults_since(mark),
        BTreeMap::from([("status 500".to_string(), 1)])
    );
    assert_eq!(PathKind::of("/v2/_catalog?n=10"), PathKind::Catalog);
    assert_eq!(PathKind::of("/v2/a/b/tags/list"), PathKind::TagList);
    assert_eq!(PathKind::of("/v2/a/blobs/sha256:00"), PathKind::Blob);
    assert_eq!(PathKind::of("/v2/"), PathKind::Base);
}
