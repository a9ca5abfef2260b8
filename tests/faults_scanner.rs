//! Scanner faults (issue 6, item 4), through the real binary with real syft, grype (the
//! stand-in unless `$GRYPE`) and shell wrappers around them that misbehave on purpose:
//! syft or grype missing (the path does not exist), syft exiting 1, printing garbage
//! instead of a report, exiting 0 with no report or an empty one after a signal, hanging
//! past `scanner.timeout` with a grandchild (the whole process group must go), exiting
//! while a grandchild that left the group (`setsid`) holds its pipes open (the scan must
//! not wait for it), flooding stdout and stderr with hundreds of MB (the daemon's memory
//! and the stderr kept in state stay bounded), and leaving temp files behind
//! (`state.dir/tmp` is empty after).
//!
//! Every case asserts: the digest is `failed` in the store with a `last_error` naming
//! what went wrong, one failure record under `failures/` matching state, no result file
//! for it, other images still scanned (where the fault is specific to one image), and,
//! once the fault is removed, exactly one more scan that succeeds with one result.
//! Already covered elsewhere and not repeated here: grype exiting 1 with coloured stderr
//! (`watcher::a_failed_scan_is_recorded_with_stderr_and_retried_after_its_back_off`),
//! grype killed by a signal or leaving an empty report after SIGINT, and an unwritable
//! failure record
//! (`vulndb::a_scanner_killed_by_a_signal_or_leaving_an_empty_report_is_a_failure_never_a_clean_result`).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spcs_image_scanner::state::ImageStatus;
use support::daemon::{
    RunningDaemon, Scanner, assert_failure_record, command, wait_for_pid, wrapper_script,
};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// The 12 hex digits the daemon puts in a scan directory's name (`scan-<short>-...`), so
/// a grype wrapper (which only sees the SBOM path) can tell which image it matches.
fn short(digest: &str) -> String {
    hex(digest)[..12].to_string()
}

/// A registry with two different images: `app/a:1` (the one faults hit) and `app/b:1`.
async fn two_images() -> (TestRegistry, PushedManifest, PushedManifest) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let a = pusher
        .push_image(
            "app/a",
            "1",
            &DebianImage::default().with_file("etc/which", b"a"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push a");
    let b = pusher
        .push_image(
            "app/b",
            "1",
            &DebianImage::default().with_file("etc/which", b"b"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push b");
    (registry, a, b)
}

/// Shell that runs `fault` while `flag` exists, and only for a scan of `digest` (its
/// short hex is in syft's image reference and in grype's SBOM path).
fn only_for(digest: &str, flag: &Path, fault: &str) -> String {
    format!(
        "if [ -e {flag:?} ]; then case \"$*\" in *{short}*) {fault} ;; esac; fi",
        flag = flag.display().to_string(),
        short = short(digest),
    )
}

/// Entries under `state.dir/tmp` (a missing directory counts as empty).
fn tmp_entries(scanner: &Scanner) -> Vec<String> {
    std::fs::read_dir(scanner.state_dir().join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the state a failed scan of `digest` must leave (the daemon stopped): `failed`
/// with `expected` in `last_error`, no result, no half-done write, one failure record
/// per failed attempt, the last one matching state; the temp area empty.
fn assert_failed(scanner: &Scanner, digest: &str, tag: &str, expected: &str, case: &str) {
    let image = scanner
        .image(digest)
        .unwrap_or_else(|| panic!("{case}: {digest} unknown"));
    assert_eq!(image.status, ImageStatus::Failed, "{case}: {image:?}");
    let error = image.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(expected),
        "{case}: {error:?} lacks {expected:?}"
    );
    assert!(
        image.last_scan.is_none(),
        "{case}: no clean result recorded"
    );
    assert!(image.pending_write.is_none(), "{case}: nothing half done");
    assert!(image.next_retry.is_some(), "{case}: a retry is planned");
    let results = scanner
        .result_files()
        .remove(&hex(digest))
        .unwrap_or_default();
    assert!(
        results.is_empty(),
        "{case}: a failure is never a result: {results:?}"
    );
    let records: Vec<serde_json::Value> = scanner
        .failure_records()
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r["digest"] == digest)
        .collect();
    assert_eq!(
        records.len() as u32,
        image.attempts,
        "{case}: one failure record per attempt"
    );
    assert_failure_record(records.last().expect("a record"), &image, "scan", tag);
    assert_eq!(tmp_entries(scanner), Vec::<String>::new(), "{case}: tmp");
}

/// Checks that `digest` ended `scanned` after exactly `attempts` attempts, with exactly
/// one result file, the one state names, a grype document.
fn assert_scanned_once(scanner: &Scanner, digest: &str, attempts: u32, case: &str) {
    let image = scanner
        .image(digest)
        .unwrap_or_else(|| panic!("{case}: {digest} unknown"));
    assert_eq!(image.status, ImageStatus::Scanned, "{case}: {image:?}");
    assert_eq!(image.attempts, attempts, "{case}: attempts");
    assert_eq!(image.last_error, None, "{case}");
    let files = scanner
        .result_files()
        .remove(&hex(digest))
        .unwrap_or_default();
    assert_eq!(files.len(), 1, "{case}: exactly one result: {files:?}");
    let named = image
        .last_scan
        .as_ref()
        .and_then(|s| s.result_file.clone())
        .expect("result file in state");
    assert!(
        files[0].ends_with(&named),
        "{case}: {named} vs {:?}",
        files[0]
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).expect("read result"))
            .unwrap_or_else(|e| panic!("{case}: result is JSON: {e}"));
    assert!(doc["matches"].is_array(), "{case}: a grype document");
}

/// One misbehaviour of syft or grype, hitting one image of its own.
struct Fault {
    name: &'static str,
    /// Shell run instead of the scan (for its image, while the faults are on).
    shell: &'static str,
    /// What `last_error` must say.
    expected: &'static str,
}

/// Runs every fault at once around syft (`syft`) or grype, each on an image of its own,
/// beside a healthy image: each faulty image fails as recorded and the healthy one is
/// scanned; with the faults removed, each faulty image is scanned exactly once more.
async fn run_faults(faults: &[Fault], syft: bool, test: &str) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut images = Vec::new();
    for i in 0..=faults.len() {
        let image = pusher
            .push_image(
                &format!("app/f{i}"),
                "1",
                &DebianImage::default().with_file("etc/which", format!("{i}").into_bytes()),
                ManifestFormat::Oci,
            )
            .await
            .expect("push");
        images.push(image);
    }
    let healthy = images.pop().expect("healthy image");
    let mut scanner = Scanner::new(&registry.url());
    let flag = scanner.dir.path().join("faults-on");
    std::fs::write(&flag, b"").expect("flag");
    let arms: String = faults
        .iter()
        .zip(&images)
        .map(|(f, image)| format!("*{}*) {} ;;\n", short(&image.digest), f.shell))
        .collect();
    let shell = format!(
        "if [ -e {flag:?} ]; then case \"$*\" in\n{arms}esac; fi",
        flag = flag.display().to_string()
    );
    if syft {
        scanner.syft = wrapper_script(
            scanner.dir.path(),
            "syft-faulty",
            &shell,
            &support::daemon::syft(),
        );
    } else {
        scanner.grype = Some(wrapper_script(
            scanner.dir.path(),
            "grype-faulty",
            &shell,
            &support::daemon::grype(),
        ));
    }
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "failed scans: {}", run.stdout);
    let summary = run.summary();
    assert_eq!(
        (summary["scanned"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(faults.len() as u64)),
        "{summary}"
    );
    assert!(
        !run.stdout.contains("panicked") && !run.stderr.contains("panicked"),
        "{}",
        run.stderr
    );
    for (i, (fault, image)) in faults.iter().zip(&images).enumerate() {
        let tag = format!("app/f{i}:1");
        assert_failed(&scanner, &image.digest, &tag, fault.expected, fault.name);
    }
    assert_scanned_once(&scanner, &healthy.digest, 1, "healthy");

    // The faults gone: each image is scanned once on its retry, the healthy one is left
    // alone.
    std::fs::remove_file(&flag).expect("faults off");
    let digests: Vec<&str> = images.iter().map(|i| i.digest.as_str()).collect();
    scanner.wait_until_due(&digests).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary()["scanned"], faults.len(), "{}", run.stdout);
    for (fault, image) in faults.iter().zip(&images) {
        assert_scanned_once(&scanner, &image.digest, 2, fault.name);
    }
    assert_scanned_once(&scanner, &healthy.digest, 1, "healthy");
    assert_eq!(
        scanner.failure_records().len(),
        faults.len(),
        "no new failure record"
    );
    assert_eq!(tmp_entries(&scanner), Vec::<String>::new(), "tmp");

    for fault in faults {
        let outcome = format!(
            "digest failed with `{}` in last_error, one failure record, no result; the other images scanned; scanned once on retry",
            fault.expected
        );
        record(Tried {
            area: "scanner",
            fault: fault.name,
            runs: 2,
            outcome: &outcome,
            lost: 0,
            test,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syft_that_exits_1_prints_garbage_or_leaves_no_or_an_empty_sbom_after_sigint_fails_only_its_image_and_is_retried()
 {
    run_faults(
        &[
            Fault {
                name: "syft exits 1 with an error on stderr",
                shell: "echo 'syft: could not fetch image: boom' >&2; exit 1",
                expected: "syft exited with code 1: syft: could not fetch image: boom",
            },
            Fault {
                name: "syft prints garbage to stdout instead of writing its SBOM, exits 0",
                shell: "echo 'this is not json {{{'; exit 0",
                expected: "syft output refused: cannot read syft SBOM",
            },
            Fault {
                name: "syft writes JSON that is not a syft SBOM, exits 0",
                shell: "out=${3#syft-json=}; echo '{\"hello\": 1}' > \"$out\"; exit 0",
                expected: "syft SBOM is not valid: no `artifacts` list",
            },
            Fault {
                name: "syft interrupted by SIGINT exits 0 with no SBOM",
                shell: "trap 'exit 0' INT; kill -INT $$; exit 3",
                expected: "syft output refused: cannot read syft SBOM",
            },
            Fault {
                name: "syft interrupted by SIGINT exits 0 with an empty SBOM",
                shell: "out=${3#syft-json=}; trap ': > \"$out\"; exit 0' INT; kill -INT $$; exit 3",
                expected: "syft SBOM is empty",
            },
        ],
        true,
        "faults_scanner::a_syft_that_exits_1_prints_garbage_or_leaves_no_or_an_empty_sbom_after_sigint_fails_only_its_image_and_is_retried",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grype_that_prints_garbage_or_leaves_no_report_after_sigint_fails_only_its_image_and_is_retried()
 {
    run_faults(
        &[
            Fault {
                name: "grype prints garbage to stdout instead of writing its report, exits 0",
                shell: "echo '<html>not json'; exit 0",
                expected: "grype output refused: cannot read grype document",
            },
            Fault {
                name: "grype writes garbage into its report file, exits 0",
                shell: "out=${3#json=}; printf 'garbage{\\n' > \"$out\"; exit 0",
                expected: "grype document is not valid",
            },
            Fault {
                name: "grype interrupted by SIGINT exits 0 with no report",
                shell: "trap 'exit 0' INT; kill -INT $$; exit 3",
                expected: "grype output refused: cannot read grype document",
            },
        ],
        false,
        "faults_scanner::a_grype_that_prints_garbage_or_leaves_no_report_after_sigint_fails_only_its_image_and_is_retried",
    )
    .await;
}

/// Makes `link` a symlink to `target` (the scanner's path exists again).
fn link(target: &Path, link: &Path) {
    std::fs::create_dir_all(link.parent().expect("parent")).expect("bin dir");
    std::os::unix::fs::symlink(target, link).expect("symlink");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_syft_or_grype_fails_every_scan_naming_the_path_and_all_are_scanned_once_it_exists()
 {
    let (registry, a, b) = two_images().await;
    let test = "faults_scanner::a_missing_syft_or_grype_fails_every_scan_naming_the_path_and_all_are_scanned_once_it_exists";

    // syft's path does not exist: each scan fails naming it; the daemon goes on.
    let mut scanner = Scanner::new(&registry.url());
    let syft = scanner.dir.path().join("bin/syft");
    scanner.syft = syft.clone();
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.summary()["failed"], 2, "{}", run.stdout);
    let expected = format!("syft could not run: {}: cannot start", syft.display());
    for (digest, tag) in [(&a.digest, "app/a:1"), (&b.digest, "app/b:1")] {
        assert_failed(&scanner, digest, tag, &expected, "syft missing");
    }
    link(&support::daemon::syft(), &syft);
    scanner.wait_until_due(&[&a.digest, &b.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 2, "syft back");
    }
    assert_eq!(scanner.failure_records().len(), 2);
    record(Tried {
        area: "scanner",
        fault: "scanner.syft names a path that does not exist",
        runs: 2,
        outcome: "every scan failed with `syft could not run: <path>: cannot start`, one failure record each, no result; each scanned once after the path exists",
        lost: 0,
        test,
    });

    // grype's path vanishes after the daemon read the DB status (a syft wrapper removes
    // it): the match fails naming the path, not "no findings".
    let mut scanner = Scanner::new(&registry.url());
    let grype = scanner.dir.path().join("bin/grype");
    link(&support::daemon::grype(), &grype);
    let flag = scanner.dir.path().join("fault-on");
    std::fs::write(&flag, b"").expect("flag");
    scanner.grype = Some(grype.clone());
    scanner.syft = wrapper_script(
        scanner.dir.path(),
        "syft-removing-grype",
        &format!(
            "if [ -e {flag:?} ]; then rm -f {grype:?}; fi",
            flag = flag.display().to_string(),
            grype = grype.display().to_string()
        ),
        &support::daemon::syft(),
    );
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let expected = format!("grype could not run: {}: cannot start", grype.display());
    for (digest, tag) in [(&a.digest, "app/a:1"), (&b.digest, "app/b:1")] {
        assert_failed(&scanner, digest, tag, &expected, "grype vanished");
    }
    std::fs::remove_file(&flag).expect("fault off");
    link(&support::daemon::grype(), &grype);
    scanner.wait_until_due(&[&a.digest, &b.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 2, "grype back");
    }
    record(Tried {
        area: "scanner",
        fault: "the grype executable disappears while the daemon runs (path does not exist)",
        runs: 2,
        outcome: "every match failed with `grype could not run: <path>: cannot start`, one failure record each, no result; each scanned once after the path exists",
        lost: 0,
        test,
    });

    // grype missing from the start: its DB status cannot be read, so scans are held (the
    // digests wait `pending`, nothing is recorded as scanned) and the log names the path.
    let mut scanner = Scanner::new(&registry.url());
    let grype = scanner.dir.path().join("bin/grype");
    scanner.grype = Some(grype.clone());
    let run = scanner.once();
    assert_eq!(
        run.code,
        Some(1),
        "held scans make `once` exit 1: {}",
        run.stdout
    );
    assert_eq!(run.summary()["held"], 2, "{}", run.stdout);
    let warnings = run.events("cannot read the vulnerability DB status");
    assert_eq!(warnings.len(), 1, "{}", run.stdout);
    let warning = warnings[0]["error"].as_str().unwrap_or_default();
    assert!(
        warning.contains(&format!("{}: cannot start", grype.display())),
        "{warning}"
    );
    for digest in [&a.digest, &b.digest] {
        let image = scanner.image(digest).expect("known");
        assert_eq!(image.status, ImageStatus::Pending, "{image:?}");
        assert!(image.last_scan.is_none());
    }
    assert!(scanner.result_files().is_empty());
    link(&support::daemon::grype(), &grype);
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 1, "grype there");
    }
    record(Tried {
        area: "scanner",
        fault: "scanner.grype names a path that does not exist at start-up",
        runs: 2,
        outcome: "DB status unreadable: scans held (digests stay pending, `once` exits 1, the warning names the path); each scanned once after the path exists",
        lost: 0,
        test,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_files_a_scanner_leaves_in_its_working_dir_and_tmpdir_are_removed_after_every_scan() {
    let (registry, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    let flag = scanner.dir.path().join("fail");
    let pids = scanner.dir.path().join("late-writer.pids");
    // Litter in TMPDIR and the working directory (syft leaves `stereoscope-*` after a
    // signal), and a grandchild that would write more after syft is done.
    let litter = format!(
        "mkdir -p \"$TMPDIR/stereoscope-123/layer\"; head -c 100000 /dev/zero > \"$TMPDIR/stereoscope-123/layer/blob\"; \
         echo x > ./leftover; (sleep 5; echo late > \"$TMPDIR/late\") & echo $! >> {pids:?}; \
         if [ -e {flag:?} ]; then case \"$*\" in *{short}*) exit 1 ;; esac; fi",
        pids = pids.display().to_string(),
        flag = flag.display().to_string(),
        short = short(&a.digest),
    );
    scanner.syft = wrapper_script(
        scanner.dir.path(),
        "syft-littering",
        &litter,
        &support::daemon::syft(),
    );
    std::fs::write(&flag, b"").expect("flag");
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_failed(
        &scanner,
        &a.digest,
        "app/a:1",
        "syft exited with code 1",
        "littering",
    );
    assert_scanned_once(&scanner, &b.digest, 1, "littering");
    std::fs::remove_file(&flag).expect("fault off");
    scanner.wait_until_due(&[&a.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_scanned_once(&scanner, &a.digest, 2, "littering");
    assert_eq!(tmp_entries(&scanner), Vec::<String>::new());

    // The late writers were in the scanners' process groups: gone, so nothing can appear
    // in `tmp` later.
    let pids = std::fs::read_to_string(&pids).expect("pids");
    let pids: Vec<&str> = pids.lines().collect();
    assert_eq!(pids.len(), 3, "one per syft scan: {pids:?}");
    for pid in &pids {
        wait_gone(pid.parse().expect("pid"), Duration::from_secs(10)).await;
    }
    assert_eq!(tmp_entries(&scanner), Vec::<String>::new());
    record(Tried {
        area: "scanner",
        fault: "syft leaves files in TMPDIR and its working dir, and a grandchild that writes later (failed and successful scans)",
        runs: 3,
        outcome: "state.dir/tmp empty after each run; the grandchildren killed with the process group; the failed image scanned once on retry",
        lost: 0,
        test: "faults_scanner::temp_files_a_scanner_leaves_in_its_working_dir_and_tmpdir_are_removed_after_every_scan",
    });
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Live processes whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the `(comm)`: state, ppid, pgrp.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            members.push(pid);
        }
    }
    members
}

/// Waits (bounded) until `pid` is no longer a live process.
async fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The generated config with some of its lines replaced (the support code fixes
/// `scanner.timeout` and the back-off), written next to it.
fn config_with(scanner: &Scanner, replace: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(scanner.write_config()).expect("config");
    for (from, to) in replace {
        assert!(text.contains(from), "{from:?} not in the config:\n{text}");
        text = text.replace(from, to);
    }
    let path = scanner.dir.path().join("faults.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Cycles every 2 s (so retries come without a restart), scans time out after
/// `timeout`, and the back-off is 2 s.
fn running_config(scanner: &mut Scanner, timeout: &str) -> PathBuf {
    scanner.cron = "*/2 * * * * *".to_string();
    config_with(
        scanner,
        &[
            ("timeout = \"120s\"", &format!("timeout = \"{timeout}\"")),
            ("retry_initial = \"1s\"", "retry_initial = \"2s\""),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_syft_is_killed_with_its_whole_process_group_at_the_timeout_and_the_daemon_goes_on()
 {
    let (registry, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    let dir = scanner.dir.path().to_path_buf();
    let flag = dir.join("fault-on");
    let leader = dir.join("leader.pid");
    let grandchild = dir.join("grandchild.pid");
    std::fs::write(&flag, b"").expect("flag");
    // For image a: record the group leader's pid, start a grandchild that sleeps (it
    // would hold the pipes open), and hang.
    let hang = format!(
        "echo $$ > {leader:?}; sleep 300 & echo $! > {grandchild:?}; wait",
        leader = leader.display().to_string(),
        grandchild = grandchild.display().to_string(),
    );
    scanner.syft = wrapper_script(
        &dir,
        "syft-hanging",
        &only_for(&a.digest, &flag, &hang),
        &support::daemon::syft(),
    );
    // Generous for a real syft on a small image (about a second here), short for a hang.
    let mut daemon = RunningDaemon::spawn(command(&running_config(&mut scanner, "10s"), &["run"]));

    let grandchild_pid = wait_for_pid(&grandchild, Duration::from_secs(60)).await;
    let leader_pid = wait_for_pid(&leader, Duration::from_secs(5)).await;
    assert_eq!(
        group_members(leader_pid).len(),
        2,
        "the wrapper leads its own group with the sleeper in it"
    );
    // b is not held up by a's hang.
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == b.digest.as_str()
        })
        .await;
    daemon
        .wait_for("scan failed", 1, Duration::from_secs(60), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    std::fs::remove_file(&flag).expect("fault off");
    let failed = daemon
        .events("scan failed")
        .into_iter()
        .find(|e| e["digest"] == a.digest.as_str())
        .expect("failure line");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no result within 10s; its process group was killed"),
        "{error}"
    );
    wait_gone(grandchild_pid, Duration::from_secs(10)).await;
    wait_gone(leader_pid, Duration::from_secs(10)).await;
    assert_eq!(group_members(leader_pid), Vec::<i32>::new(), "group left");

    // The fault gone: the retry (a later cycle, no restart) scans a once.
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    stop_cleanly(&mut daemon).await;
    assert_scanned_once(&scanner, &a.digest, 2, "hang");
    assert_scanned_once(&scanner, &b.digest, 1, "hang");
    let failures = scanner.failure_records();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].1["digest"], a.digest.as_str());
    assert_eq!(failures[0].1["attempt"], 1);
    assert!(
        failures[0].1["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no result within 10s"),
        "{}",
        failures[0].1
    );
    assert_eq!(tmp_entries(&scanner), Vec::<String>::new());
    record(Tried {
        area: "scanner",
        fault: "syft hangs past scanner.timeout (10s) with a sleeping grandchild in its group",
        runs: 1,
        outcome: "the whole process group killed (leader and grandchild gone), digest failed with `no result within 10s`, one failure record; the other image scanned meanwhile; the daemon kept running and scanned it once on retry",
        lost: 0,
        test: "faults_scanner::a_hanging_syft_is_killed_with_its_whole_process_group_at_the_timeout_and_the_daemon_goes_on",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syft_flooding_stdout_and_stderr_with_hundreds_of_mb_leaves_the_daemons_memory_and_the_kept_stderr_bounded()
 {
    const FLOOD: u64 = 256 * 1024 * 1024;
    const MEMORY_BOUND: u64 = 200 * 1024 * 1024;
    const README_CAPTURE_LIMIT: usize = 64 * 1024;
    let (registry, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    let dir = scanner.dir.path().to_path_buf();
    let flag = dir.join("fault-on");
    std::fs::write(&flag, b"").expect("flag");
    let flood = format!(
        "head -c {FLOOD} /dev/zero; head -c {FLOOD} /dev/zero | tr '\\0' e >&2; \
         echo 'flood: the last line of stderr' >&2; exit 1"
    );
    scanner.syft = wrapper_script(
        &dir,
        "syft-flooding",
        &only_for(&a.digest, &flag, &flood),
        &support::daemon::syft(),
    );
    let mut daemon = RunningDaemon::spawn(command(&running_config(&mut scanner, "120s"), &["run"]));
    daemon
        .wait_for("scan failed", 1, Duration::from_secs(120), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    std::fs::remove_file(&flag).expect("fault off");
    let peak = daemon.peak_rss_kib() * 1024;
    assert!(
        peak < MEMORY_BOUND,
        "the daemon's peak RSS {peak} bytes after {} MiB of output is not bounded",
        2 * FLOOD / 1024 / 1024
    );
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == b.digest.as_str()
        })
        .await;
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    stop_cleanly(&mut daemon).await;

    assert_scanned_once(&scanner, &a.digest, 2, "flood");
    assert_scanned_once(&scanner, &b.digest, 1, "flood");
    let failures = scanner.failure_records();
    assert_eq!(failures.len(), 1, "{failures:?}");
    let error = failures[0].1["error"].as_str().unwrap_or_default();
    assert!(error.len() <= README_CAPTURE_LIMIT, "{} bytes", error.len());
    assert!(
        error.starts_with("syft exited with code 1: …")
            && error.ends_with("eeeflood: the last line of stderr"),
        "the tail of stderr, marked as cut: {}…{}",
        &error[..60.min(error.len())],
        &error[error.len().saturating_sub(60)..]
    );
    assert!(!error.contains('\0'), "stdout is not stderr");
    let outcome = format!(
        "daemon peak RSS {} MiB (< 200 MiB); last_error {} bytes (<= 64 KiB), the tail of stderr; digest failed, one failure record, the other image scanned; scanned once on retry",
        peak / 1024 / 1024,
        error.len()
    );
    record(Tried {
        area: "scanner",
        fault: "syft prints 256 MiB to stdout and 256 MiB to stderr, then exits 1",
        runs: 1,
        outcome: &outcome,
        lost: 0,
        test: "faults_scanner::a_syft_flooding_stdout_and_stderr_with_hundreds_of_mb_leaves_the_daemons_memory_and_the_kept_stderr_bounded",
    });
}

/// Kills (SIGKILL) a process the test's wrapper started outside any group the daemon
/// owns, when the test ends however it ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0 > 1 && alive(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_that_escapes_the_process_group_holding_the_pipes_open_does_not_hang_the_scan()
{
    let (registry, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    let dir = scanner.dir.path().to_path_buf();
    let flag = dir.join("fault-on");
    let escaped = dir.join("escaped.pid");
    std::fs::write(&flag, b"").expect("flag");
    // `setsid` puts the sleeper in a session (and group) of its own, out of the daemon's
    // reach; it keeps syft's stdout and stderr open for 300 s after syft exits 1. It
    // writes its pid once it is in its own session: syft exits only after that.
    let escape = format!(
        "setsid sh -c 'echo $$ > {escaped:?}; exec sleep 300' & \
         while [ ! -s {escaped:?} ]; do sleep 0.05; done; echo 'syft: gave up' >&2; exit 1",
        escaped = escaped.display().to_string(),
    );
    scanner.syft = wrapper_script(
        &dir,
        "syft-escaping",
        &only_for(&a.digest, &flag, &escape),
        &support::daemon::syft(),
    );
    let mut daemon = RunningDaemon::spawn(command(&running_config(&mut scanner, "120s"), &["run"]));
    let pid = wait_for_pid(&escaped, Duration::from_secs(60)).await;
    let _escaped = KillOnDrop(pid);
    daemon
        .wait_for("scan failed", 1, Duration::from_secs(60), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    std::fs::remove_file(&flag).expect("fault off");
    assert!(alive(pid), "the escaped sleeper still holds the pipes");
    let let_go = daemon.events(
        "scanner output still open after its process group was killed (a process outside the group holds it); stopped reading",
    );
    assert_eq!(let_go.len(), 1, "{}", daemon.output());
    assert!(
        let_go[0]["program"]
            .as_str()
            .is_some_and(|p| p.ends_with("syft-escaping")),
        "{}",
        let_go[0]
    );
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == b.digest.as_str()
        })
        .await;
    daemon
        .wait_for("scan finished", 1, Duration::from_secs(60), |e| {
            e["digest"] == a.digest.as_str()
        })
        .await;
    stop_cleanly(&mut daemon).await;
    let failures = scanner.failure_records();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].1["error"]
            .as_str()
            .unwrap_or_default()
            .contains("syft exited with code 1: syft: gave up"),
        "{}",
        failures[0].1
    );
    assert_scanned_once(&scanner, &a.digest, 2, "escaped");
    assert_scanned_once(&scanner, &b.digest, 1, "escaped");
    record(Tried {
        area: "scanner",
        fault: "syft exits 1 leaving a grandchild in a session of its own (setsid) that holds its stdout/stderr open for 300 s",
        runs: 1,
        outcome: "the scan ends when syft exits (output drained for a bounded grace, then let go): digest failed with its stderr, one failure record; the other image scanned; scanned once on retry",
        lost: 0,
        test: "faults_scanner::a_grandchild_that_escapes_the_process_group_holding_the_pipes_open_does_not_hang_the_scan",
    });
}

/// SIGTERM to a daemon that must have kept running through the fault; it exits 0.
async fn stop_cleanly(daemon: &mut RunningDaemon) {
    assert!(
        daemon.is_running(),
        "the daemon kept running through the fault\n{}",
        daemon.output()
    );
    let code = daemon.stop(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "{}", daemon.output());
}
