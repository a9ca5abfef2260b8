//! Faults of the state store (issue 6, item 6), with the real binary, a real
//! `docker-registry` and the real syft:
//! - a damaged store (garbage over sled's files, a truncated file), a store from a newer
//!   schema and a store held by a running daemon are refused by `run`, `once` and
//!   `report` with exit 64 and an error on stderr naming the store and what is wrong,
//!   never a panic; refused again on every later start (sled may rewrite the damaged
//!   tail of its log when it opens it, but never into a store that is accepted); a newer
//!   store's files are left byte for byte;
//! - `state rebuild` after the store of a daemon that scanned is lost gives back the same
//!   tags, digests, statuses and result files (compared with `report --json` taken
//!   before), after which `once` scans nothing: no new result, no syft run, no blob
//!   pulled; it refuses to run next to a daemon; hostile files in the output dir (names
//!   that are not digests or timestamps, `..` in names, symbolic links out of the dir,
//!   garbage JSON, a result filed under another digest, invalid inventory records) are
//!   skipped and counted, and an output dir with nothing usable fails without touching
//!   the old store.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::daemon::{RunOutput, Scanner, wrapper_script};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};

const BIN: &str = env!("CARGO_BIN_EXE_spcs-image-scanner");

/// Runs the binary with the scanner's config and `args` (bounded).
fn cli(scanner: &Scanner, args: &[&str]) -> RunOutput {
    let config = scanner.write_config();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SPCS_IMAGE_SCANNER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the binary");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not finish within 120 s");
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

/// `report --json`, one record per digest.
fn report(scanner: &Scanner) -> BTreeMap<String, serde_json::Value> {
    let out = cli(scanner, &["report", "--json"]);
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (v["digest"].as_str().expect("digest").to_string(), v)
        })
        .collect()
}

/// What must survive a rebuild, per digest: status, tags, repositories, index
/// digests, and of the last scan its result and SBOM files, counts, DB and mode.
fn essentials(report: &BTreeMap<String, serde_json::Value>) -> BTreeMap<String, serde_json::Value> {
    report
        .iter()
        .map(|(d, v)| {
            let scan = &v["last_scan"];
            (
                d.clone(),
                serde_json::json!({
                    "status": v["status"],
                    "media_type": v["media_type"],
                    "platform": v["platform"],
                    "first_seen": v["first_seen"],
                    "attempts": v["attempts"],
                    "tags": v["tags"],
                    "repositories": v["repositories"],
                    "index_digests": v["index_digests"],
                    "result_file": scan["result_file"],
                    "sbom_file": scan["sbom_file"],
                    "packages": scan["packages"],
                    "matches": scan["matches"],
                    "severities": scan["severities"],
                    "db_build": scan["db_build"],
                    "db_schema": scan["db_schema"],
                    "mode": scan["mode"],
                    "syft_version": scan["syft_version"],
                    "flags": scan["flags"],
                }),
            )
        })
        .collect()
}

/// Digests of `before` that are missing from `after` or differ in what must survive.
fn lost_between(
    before: &BTreeMap<String, serde_json::Value>,
    after: &BTreeMap<String, serde_json::Value>,
) -> u64 {
    let (before, after) = (essentials(before), essentials(after));
    before
        .iter()
        .filter(|(d, v)| after.get(*d) != Some(*v))
        .count() as u64
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// Every file under `dir` with its bytes (to prove a refused store is not rewritten).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read file"));
            }
        }
    }
    out
}

/// Files of `before` missing from `after` or changed.
fn files_lost(before: &BTreeMap<PathBuf, Vec<u8>>, after: &BTreeMap<PathBuf, Vec<u8>>) -> u64 {
    before
        .iter()
        .filter(|(p, b)| after.get(*p) != Some(*b))
        .count() as u64
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// The length of sled's log up to its last non-zero byte (the file is allocated in
/// zero-filled segments).
fn written_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read sled's db file");
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// Moved-aside stores in `state.dir`.
fn retired_stores(scanner: &Scanner) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(scanner.state_dir())
        .expect("state dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("db.corrupt-"))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// A registry with `demo/app:1` and `:latest` (image A), `demo/app:2` (image B) and
/// `demo/tool:1` (image A again), and a scanner whose syft is wrapped to count scans.
async fn scanned_setup() -> (
    TestRegistry,
    Pusher,
    Scanner,
    PushedManifest,
    PushedManifest,
    PathBuf,
) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let a_image = DebianImage::default();
    let a = pusher
        .push_image("demo/app", "1", &a_image, ManifestFormat::Oci)
        .await
        .expect("push A");
    pusher
        .push_image("demo/app", "latest", &a_image, ManifestFormat::Oci)
        .await
        .expect("push A as latest");
    pusher
        .push_image("demo/tool", "1", &a_image, ManifestFormat::Oci)
        .await
        .expect("push A to a second repository");
    let b = pusher
        .push_image(
            "demo/app",
            "2",
            &DebianImage::default().with_package("libc6", "2.31-13+deb11u5"),
            ManifestFormat::DockerV2,
        )
        .await
        .expect("push B");
    let mut scanner = Scanner::new(&registry.url());
    let count = scanner.dir.path().join("syft-scans");
    scanner.syft = wrapper_script(
        scanner.dir.path(),
        "syft-counting",
        &format!("echo scan >> {:?}", count.display().to_string()),
        &support::daemon::syft(),
    );
    let first = scanner.once();
    assert_eq!(first.code, Some(0), "{}\n{}", first.stdout, first.stderr);
    assert_eq!(first.summary()["scanned"], 2, "{}", first.stdout);
    (registry, pusher, scanner, a, b, count)
}

fn syft_scans(count: &Path) -> usize {
    std::fs::read_to_string(count)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn total_result_files(scanner: &Scanner) -> usize {
    scanner.result_files().values().map(Vec::len).sum()
}

/// Asserts a refusal: exit 64, the store's path and `what` on stderr, no panic.
fn assert_refused(out: &RunOutput, command: &str, store: &Path, what: &str) {
    assert_eq!(
        out.code,
        Some(64),
        "{command}: exit 64\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let shown = store.display().to_string();
    assert!(
        out.stderr.contains(&shown) && out.stderr.contains(what),
        "{command}: stderr must name {shown} and say {what:?}:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked") && !out.stdout.contains("panicked"),
        "{command}: no panic:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

/// `run` until it exits (it must refuse at once).
async fn run_refused(scanner: &Scanner) -> RunOutput {
    let mut daemon = scanner.spawn_run();
    let code = daemon.wait_exit(Duration::from_secs(60)).await;
    let text = daemon.output();
    RunOutput {
        code,
        stdout: text.clone(),
        stderr: text,
    }
}

#[tokio::test]
async fn a_damaged_store_is_refused_by_run_once_and_report_with_its_path_and_exit_64() {
    let (registry, _pusher, scanner, _a, _b, count) = scanned_setup().await;
    let store = scanner.state_dir().join("db");
    let healthy = scanner.dir.path().join("healthy-db");
    copy_dir(&store, &healthy);
    let scans_before = syft_scans(&count);
    let results_before = total_result_files(&scanner);
    let db_file_len = std::fs::metadata(store.join("db"))
        .expect("sled db file")
        .len();

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "random bytes over the whole of sled's db file",
            Box::new(move |s: &Path| {
                let garbage: Vec<u8> = (0..db_file_len)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                std::fs::write(s.join("db"), garbage).unwrap();
            }),
        ),
        (
            "text over every file of the store (db, conf, snapshots)",
            Box::new(|s: &Path| {
                for e in std::fs::read_dir(s).unwrap().flatten() {
                    if e.path().is_file() {
                        let len = e.metadata().unwrap().len().max(16) as usize;
                        std::fs::write(e.path(), "garbage ".repeat(len / 8 + 1)).unwrap();
                    }
                }
            }),
        ),
        (
            "sled's db file truncated to half of what was written",
            Box::new(|s: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(s.join("db"))
                    .unwrap();
                f.set_len(written_len(&s.join("db")) / 2).unwrap();
            }),
        ),
        (
            "random bytes over the last 4 KiB written to sled's db file",
            Box::new(|s: &Path| {
                let path = s.join("db");
                let end = written_len(&path) as usize;
                let mut bytes = std::fs::read(&path).unwrap();
                let start = end.saturating_sub(4096);
                for (i, b) in bytes[start..end].iter_mut().enumerate() {
                    *b = (i.wrapping_mul(2_654_435_761) >> 7) as u8 | 1;
                }
                std::fs::write(&path, bytes).unwrap();
            }),
        ),
        (
            "sled's db file truncated to 0 bytes",
            Box::new(|s: &Path| {
                std::fs::write(s.join("db"), b"").unwrap();
            }),
        ),
    ];

    let mark = registry.wait_for_log_quiet().await;
    for (fault, damage) in &cases {
        let _ = std::fs::remove_dir_all(&store);
        copy_dir(&healthy, &store);
        damage(&store);
        let outcomes = [
            ("report", cli(&scanner, &["report"])),
            ("once", scanner.once()),
            ("run", run_refused(&scanner).await),
        ];
        let lost = results_before.saturating_sub(total_result_files(&scanner)) as u64;
        assert_eq!(lost, 0, "{fault}: no result file lost");
        for (command, out) in &outcomes {
            assert_refused(out, &format!("{fault}: {command}"), &store, "damaged");
            assert!(
                out.stderr.contains("state rebuild"),
                "{fault}: {command}: says how to recover:\n{}",
                out.stderr
            );
        }
        record(Tried {
            area: "state",
            fault,
            runs: 3,
            outcome: "report, then once, then run: each exits 64 naming the store, 'damaged' and `state rebuild` (a refused open never turns it into an empty store); no panic; nothing scanned",
            lost,
            test: "faults_state::a_damaged_store_is_refused_by_run_once_and_report_with_its_path_and_exit_64",
        });
    }
    // A refused store starts nothing: no registry traffic, no scan, no result.
    let requests = registry.requests_since_settled(mark).await;
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(syft_scans(&count), scans_before);
    assert_eq!(total_result_files(&scanner), results_before);
}

#[tokio::test]
async fn a_store_written_by_a_newer_schema_is_refused_and_never_rewritten() {
    let (_registry, _pusher, scanner, _a, _b, count) = scanned_setup().await;
    let store = scanner.state_dir().join("db");
    let newer = spcs_image_scanner::state::SCHEMA_VERSION + 1;
    {
        let db = sled::open(&store).expect("open the store with sled");
        db.insert(b"meta/schema", newer.to_string().as_bytes())
            .expect("write a newer schema version");
        db.flush().expect("flush");
    }
    // sled releases its lock from a background thread: wait until the store opens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sled::open(&store).is_err() {
        assert!(Instant::now() < deadline, "the store stays locked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let scans_before = syft_scans(&count);
    let before = snapshot(&store);
    let what = format!("schema version {newer} is newer");
    for (command, out) in [
        ("report", cli(&scanner, &["report", "--json"])),
        ("once", scanner.once()),
        ("run", run_refused(&scanner).await),
    ] {
        assert_refused(&out, command, &store, &what);
    }
    let lost = files_lost(&before, &snapshot(&store));
    assert_eq!(lost, 0, "a newer store is never rewritten");
    assert_eq!(snapshot(&store), before);
    assert_eq!(syft_scans(&count), scans_before);
    let db = sled::open(&store).expect("reopen");
    assert_eq!(
        db.get(b"meta/schema").unwrap().as_deref(),
        Some(newer.to_string().as_bytes())
    );
    record(Tried {
        area: "state",
        fault: "store written by a newer schema version",
        runs: 3,
        outcome: "report, once and run exit 64 naming the store and the newer version; the store is not rewritten",
        lost,
        test: "faults_state::a_store_written_by_a_newer_schema_is_refused_and_never_rewritten",
    });
}

#[tokio::test]
async fn a_store_held_by_a_running_daemon_is_refused_by_run_once_report_and_state_rebuild() {
    let (_registry, _pusher, scanner, _a, _b, count) = scanned_setup().await;
    let before = report(&scanner);
    let mut daemon = scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(60), |_| true)
        .await;
    let store = scanner.state_dir().join("db");
    for (command, out) in [
        ("report", cli(&scanner, &["report"])),
        ("once", scanner.once()),
        ("run", run_refused(&scanner).await),
        ("state rebuild", cli(&scanner, &["state", "rebuild"])),
    ] {
        assert_refused(&out, command, &store, "locked by another process");
    }
    assert!(daemon.is_running(), "the running daemon is not disturbed");
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert!(
        retired_stores(&scanner).is_empty(),
        "a refused rebuild moves nothing"
    );
    let after = report(&scanner);
    let lost = lost_between(&before, &after);
    assert_eq!(lost, 0);
    assert_eq!(essentials(&after), essentials(&before));
    assert_eq!(syft_scans(&count), 2, "nothing scanned twice");
    record(Tried {
        area: "state",
        fault: "store locked by a running daemon: report, once, run and state rebuild started next to it",
        runs: 4,
        outcome: "each exits 64 naming the store and 'locked by another process'; the daemon runs on; nothing moved; state unchanged",
        lost,
        test: "faults_state::a_store_held_by_a_running_daemon_is_refused_by_run_once_report_and_state_rebuild",
    });
}

/// A minimal grype-shaped document for `digest`.
fn grype_doc(digest: &str) -> String {
    serde_json::json!({
        "matches": [],
        "source": {"type": "image", "target": {"manifestDigest": digest}},
        "descriptor": {"name": "grype", "version": "0.0.0"},
    })
    .to_string()
}

#[tokio::test]
async fn state_rebuild_after_losing_the_store_restores_tags_results_and_the_next_once_scans_nothing()
 {
    let (registry, pusher, scanner, a, b, count) = scanned_setup().await;
    // A tag moves (its inventory history must be replayed to the newest record), and a
    // tag is removed.
    pusher
        .push_image(
            "demo/app",
            "latest",
            &DebianImage::default().with_package("libc6", "2.31-13+deb11u5"),
            ManifestFormat::DockerV2,
        )
        .await
        .expect("move latest to B");
    registry.delete_tag_in_storage("demo/tool", "1");
    // And a multi-arch index: its tag points at the index, the amd64 child is scanned.
    let amd64 = pusher
        .push_image_by_digest(
            "demo/multi",
            &DebianImage::new("amd64").with_file("etc/multi", b"amd64"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push the amd64 child");
    let arm64 = pusher
        .push_image_by_digest(
            "demo/multi",
            &DebianImage::new("arm64").with_file("etc/multi", b"arm64"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push the arm64 child");
    let index = pusher
        .push_index(
            "demo/multi",
            "1",
            &[(arm64, "linux", "arm64"), (amd64.clone(), "linux", "amd64")],
        )
        .await
        .expect("push the index");
    let second = scanner.once();
    assert_eq!(second.code, Some(0), "{}\n{}", second.stdout, second.stderr);
    assert_eq!(second.summary()["moved"], 1, "{}", second.stdout);
    assert_eq!(second.summary()["removed"], 1, "{}", second.stdout);
    assert_eq!(second.summary()["added"], 1, "{}", second.stdout);
    assert_eq!(syft_scans(&count), 3);
    let before = report(&scanner);
    assert_eq!(before.len(), 3);
    let tags_before = scanner.tags();
    let results_before = scanner.result_files();

    // Hostile files next to the real ones.
    let out = scanner.output_dir();
    let outside = scanner.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("doc.json"), grype_doc(&a.digest)).unwrap();
    let a_dir = out.join("scans").join(hex(&a.digest));
    std::fs::create_dir_all(out.join("scans/not-a-digest")).unwrap();
    std::fs::write(out.join("scans/not-a-digest/x.json"), grype_doc(&a.digest)).unwrap();
    std::fs::write(
        a_dir.join("..%2f..%2fetc_passwd.json"),
        grype_doc(&a.digest),
    )
    .unwrap();
    std::fs::write(
        a_dir.join("29991231T000000.000Z_x.json"),
        b"{\"matches\": [garbage",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.join("doc.json"),
        a_dir.join("29991231T000001.000Z_x.json"),
    )
    .unwrap();
    let other = "c".repeat(64);
    std::fs::create_dir_all(out.join("scans").join(&other)).unwrap();
    std::fs::write(
        out.join("scans")
            .join(&other)
            .join("20260101T000000.000Z_x.json"),
        grype_doc(&a.digest),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside, out.join("scans").join("d".repeat(64))).unwrap();
    std::fs::write(out.join("sboms/..%2fevil.syft.json"), b"{}").unwrap();
    std::fs::write(out.join("inventory/29991231T000000.000Z.json"), b"not json").unwrap();
    std::fs::write(out.join("inventory/evil.json"), b"[]").unwrap();
    let evil = |repository: &str, tag: &str, digest: &str| {
        serde_json::json!({
            "repository": repository, "tag": tag, "digest": digest, "index_digest": null,
            "platform": null, "change": "added", "previous_digest": null,
            "observed_at": "2999-12-31T00:00:01Z",
        })
    };
    std::fs::write(
        out.join("inventory/29991231T000001.000Z.json"),
        serde_json::to_vec(&serde_json::json!([
            evil("../../etc", "1", &a.digest),
            evil("demo/app", "../x", &a.digest),
            evil("demo/app", "1", "sha256:../../../etc/passwd"),
            {"unexpected": true},
        ]))
        .unwrap(),
    )
    .unwrap();

    // The store and the SBOM cache are lost.
    std::fs::remove_dir_all(scanner.state_dir().join("db")).unwrap();
    std::fs::remove_dir_all(scanner.state_dir().join("sboms")).unwrap();

    let rebuilt = cli(&scanner, &["state", "rebuild"]);
    assert_eq!(
        rebuilt.code,
        Some(0),
        "{}\n{}",
        rebuilt.stdout,
        rebuilt.stderr
    );
    let text = &rebuilt.stdout;
    for line in [
        "no old store (it was missing)",
        "tags: 4\n",
        "digests scanned: 3\n",
        "digests pending: 0",
        "indexes: 1\n",
        "SBOMs restored into the cache: 3\n",
        "skipped: 13\n",
        "  not a digest: 1\n",
        "  not a result file name: 1\n",
        "  not a grype document: 1\n",
        "  symbolic link: 2\n",
        "  result for another digest: 1\n",
        "  not an SBOM file name: 1\n",
        "  not an inventory file: 1\n",
        "  not an inventory file name: 1\n",
        "  invalid inventory record: 4\n",
    ] {
        assert!(text.contains(line), "summary must say {line:?}:\n{text}");
    }
    assert!(
        text.contains("29991231T000001.000Z_x.json: symbolic link"),
        "{text}"
    );

    // Same tags -> digests, statuses, result files and counts as before the loss.
    let rebuilt_report = report(&scanner);
    let lost = lost_between(&before, &rebuilt_report);
    assert_eq!(lost, 0, "digests lost or changed by the rebuild");
    assert_eq!(essentials(&rebuilt_report), essentials(&before));
    let tags_after = scanner.tags();
    let pairs = |tags: &[spcs_image_scanner::state::TagRecord]| {
        tags.iter()
            .map(|t| {
                (
                    t.reference(),
                    t.digest.to_string(),
                    t.image_digest.to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(&tags_after), pairs(&tags_before));
    let latest = tags_after
        .iter()
        .find(|t| t.reference() == "demo/app:latest")
        .unwrap();
    assert_eq!(latest.image_digest.as_str(), b.digest);
    assert_eq!(
        latest
            .previous
            .iter()
            .map(|p| p.image_digest.to_string())
            .collect::<Vec<_>>(),
        vec![a.digest.clone()],
        "the tag's history is replayed from inventory"
    );
    let multi = tags_after
        .iter()
        .find(|t| t.reference() == "demo/multi:1")
        .unwrap();
    assert_eq!(multi.digest.as_str(), index, "the tag points at the index");
    assert_eq!(multi.image_digest.as_str(), amd64.digest);
    assert_eq!(multi.platform.as_deref(), Some("linux/amd64"));
    for digest in [&a.digest, &b.digest, &amd64.digest] {
        assert!(
            scanner
                .state_dir()
                .join("sboms")
                .join(format!("{}.syft.json", hex(digest)))
                .is_file(),
            "SBOM cache restored for {digest}"
        );
    }

    // The next cycle scans nothing: no syft, no new result, no blob pulled.
    let mark = registry.wait_for_log_quiet().await;
    let next = scanner.once();
    assert_eq!(next.code, Some(0), "{}\n{}", next.stdout, next.stderr);
    let summary = next.summary();
    assert_eq!(summary["queued"], 0, "{summary}");
    assert_eq!(summary["rematch_queued"], 0, "{summary}");
    assert_eq!(summary["added"], 0, "{summary}");
    assert_eq!(summary["moved"], 0, "{summary}");
    assert_eq!(summary["unchanged"], 4, "{summary}");
    assert_eq!(syft_scans(&count), 3, "no syft run after the rebuild");
    let mut results_after = scanner.result_files();
    // The hostile directories planted above are still there, untouched.
    results_after.remove("not-a-digest");
    results_after.remove(&other);
    results_after.remove(&"d".repeat(64));
    let real = |m: &BTreeMap<String, Vec<PathBuf>>| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter()
                        .filter(|p| p.to_string_lossy().contains("Z_20"))
                        .cloned()
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(
        real(&results_after),
        real(&results_before),
        "no new result file"
    );
    let requests = registry.requests_since_settled(mark).await;
    let blob_gets: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .collect();
    assert!(blob_gets.is_empty(), "no blob pulled: {blob_gets:?}");
    assert!(
        !requests.iter().any(|r| r.is_manifest("GET")),
        "no manifest fetched: every digest is known"
    );
    assert_eq!(essentials(&report(&scanner)), essentials(&before));
    record(Tried {
        area: "state",
        fault: "store and SBOM cache deleted after 3 images (5 tags: 1 moved, 1 removed, 1 on a multi-arch index) were scanned; state rebuild",
        runs: 1,
        outcome: "exit 0; same tags -> digests, statuses, result files and counts as report --json before; SBOM cache restored; the next once: 0 scans, 0 blob GETs, 0 manifest GETs",
        lost,
        test: "faults_state::state_rebuild_after_losing_the_store_restores_tags_results_and_the_next_once_scans_nothing",
    });
    record(Tried {
        area: "state",
        fault: "hostile output files before state rebuild: non-digest dir, '..%2f' names, garbage JSON, symlinks out of the dir (file and dir), a result filed under another digest, bad inventory names and records",
        runs: 13,
        outcome: "all 13 skipped and counted by reason; nothing outside the dir read; the rebuilt store equals the one before",
        lost,
        test: "faults_state::state_rebuild_after_losing_the_store_restores_tags_results_and_the_next_once_scans_nothing",
    });
}

#[tokio::test]
async fn state_rebuild_moves_a_damaged_store_aside_and_fails_when_nothing_is_usable() {
    // No registry needed: the store and the output are made by hand.
    let scanner = Scanner::new("http://127.0.0.1:9");
    let store = scanner.state_dir().join("db");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("conf"), b"garbage garbage garbage garbage").unwrap();
    std::fs::write(store.join("db"), "garbage ".repeat(4096)).unwrap();
    let damaged = snapshot(&store);

    // Only garbage in the output: nothing can be rebuilt, the old store stays.
    let out = scanner.output_dir();
    let hexa = "a".repeat(64);
    std::fs::create_dir_all(out.join("scans").join(&hexa)).unwrap();
    std::fs::write(
        out.join("scans")
            .join(&hexa)
            .join("20260101T000000.000Z_x.json"),
        b"{}",
    )
    .unwrap();
    std::fs::create_dir_all(out.join("inventory")).unwrap();
    std::fs::write(out.join("inventory/20260101T000000.000Z.json"), b"[1, 2]").unwrap();
    let failed = cli(&scanner, &["state", "rebuild"]);
    assert_eq!(failed.code, Some(1), "{}\n{}", failed.stdout, failed.stderr);
    assert!(
        failed.stderr.contains("nothing could be rebuilt")
            && failed.stderr.contains(&out.display().to_string())
            && failed.stderr.contains("not a grype document: 1")
            && failed.stderr.contains("invalid inventory record: 2"),
        "{}",
        failed.stderr
    );
    let lost = files_lost(&damaged, &snapshot(&store));
    assert_eq!(lost, 0, "the old store is left in place");
    assert!(retired_stores(&scanner).is_empty());
    record(Tried {
        area: "state",
        fault: "state rebuild from an output dir holding only garbage (an empty grype document, an inventory of numbers)",
        runs: 1,
        outcome: "exit 1, 'nothing could be rebuilt' with the skipped files counted; the old store is not moved",
        lost,
        test: "faults_state::state_rebuild_moves_a_damaged_store_aside_and_fails_when_nothing_is_usable",
    });

    // One valid inventory record: the damaged store is moved aside, never deleted.
    let digest = format!("sha256:{}", "b".repeat(64));
    std::fs::write(
        out.join("inventory/20260102T000000.000Z.json"),
        serde_json::to_vec(&serde_json::json!([{
            "repository": "demo/app", "tag": "1", "digest": digest, "index_digest": null,
            "platform": null, "change": "added", "previous_digest": null,
            "observed_at": "2026-01-02T00:00:00Z",
        }]))
        .unwrap(),
    )
    .unwrap();
    let rebuilt = cli(&scanner, &["state", "rebuild"]);
    assert_eq!(
        rebuilt.code,
        Some(0),
        "{}\n{}",
        rebuilt.stdout,
        rebuilt.stderr
    );
    assert!(rebuilt.stdout.contains("tags: 1\n"), "{}", rebuilt.stdout);
    assert!(
        rebuilt.stdout.contains("digests pending: 1"),
        "{}",
        rebuilt.stdout
    );
    assert!(
        rebuilt.stdout.contains("it could not be read"),
        "{}",
        rebuilt.stdout
    );
    let retired = retired_stores(&scanner);
    assert_eq!(retired.len(), 1, "{retired:?}");
    let moved: BTreeMap<PathBuf, Vec<u8>> = snapshot(&retired[0])
        .into_iter()
        .map(|(p, b)| (store.join(p.strip_prefix(&retired[0]).unwrap()), b))
        .collect();
    let lost = files_lost(&damaged, &moved);
    assert_eq!(lost, 0, "the old store is kept byte for byte");
    assert_eq!(moved, damaged);
    let images = scanner.images();
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[&digest].status,
        spcs_image_scanner::state::ImageStatus::Pending,
        "known only from inventory: scanned by the next cycle"
    );
    assert_eq!(
        images[&digest].tags.iter().cloned().collect::<Vec<_>>(),
        vec!["demo/app:1"]
    );
    record(Tried {
        area: "state",
        fault: "state rebuild over a store with garbage conf and db files, output with one valid inventory record",
        runs: 1,
        outcome: "exit 0; old store moved to db.corrupt-<timestamp> byte for byte; the digest known only from inventory is pending with its tag",
        lost,
        test: "faults_state::state_rebuild_moves_a_damaged_store_aside_and_fails_when_nothing_is_usable",
    });
}
