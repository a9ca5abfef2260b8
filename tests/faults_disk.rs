//! Output and disk faults (issue 6, item 5), through the real binary with real syft and
//! grype (the stand-in unless `$GRYPE`): the output directory (a stage mount in SPCS)
//! taken by a file where `scans/` must be, mounted read-only (a bind mount remounted
//! `ro`: root-proof, unlike `chmod`), before a cycle and in the middle of a scan, and
//! full (a small tmpfs filled up to its last pages).
//!
//! The tests run as root: `chmod 0555` stops nothing there, so every fault is one the
//! kernel enforces for root too (ENOTDIR, EROFS, ENOSPC). Mounting needs root (or
//! CAP_SYS_ADMIN); a machine without it fails these tests with a message saying so.
//!
//! Every case asserts: the scan fails and is retried, state does not advance (never
//! `scanned` without its complete result file, no half-done write left in state), no
//! partial file anywhere under `output.dir`, and once the space or the permission
//! returns each image ends with exactly one complete result.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use spcs_image_scanner::state::ImageStatus;
use support::daemon::{Scanner, assert_failure_record, files_under, wrapper_script};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};
use support::reliability::{Tried, record};

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// A registry with two different images, `app/a:1` and `app/b:1`.
async fn two_images() -> (TestRegistry, Pusher, PushedManifest, PushedManifest) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut pushed = Vec::new();
    for name in ["a", "b"] {
        pushed.push(
            pusher
                .push_image(
                    &format!("app/{name}"),
                    "1",
                    &DebianImage::default().with_file("etc/which", name.as_bytes().to_vec()),
                    ManifestFormat::Oci,
                )
                .await
                .expect("push"),
        );
    }
    let b = pushed.pop().expect("b");
    let a = pushed.pop().expect("a");
    (registry, pusher, a, b)
}

/// Runs a command the test needs (mount, umount); panics with its output if it fails.
fn must(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{} (these tests need root, or CAP_SYS_ADMIN, to mount)",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount on `dir` that is undone when the test ends however it ends (before the temp
/// dir holding it is removed: declare it after the [`Scanner`]).
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// A tmpfs of `size` bytes on `dir`.
    fn tmpfs(dir: &Path, size: u64) -> Mounted {
        std::fs::create_dir_all(dir).expect("mount point");
        must(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        );
        Mounted {
            dir: dir.to_path_buf(),
        }
    }

    /// `dir` bind-mounted on itself, so that it can be remounted read-only.
    fn bind(dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).expect("mount point");
        let d = dir.display().to_string();
        must("mount", &["--bind", &d, &d]);
        Mounted {
            dir: dir.to_path_buf(),
        }
    }

    fn remount(&self, mode: &str) {
        must(
            "mount",
            &[
                "-o",
                &format!("remount,bind,{mode}"),
                &self.dir.display().to_string(),
            ],
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

/// Every file under `dir` (recursively), relative to it.
fn relative_files(dir: &Path) -> Vec<String> {
    files_under(dir)
        .iter()
        .map(|p| {
            p.strip_prefix(dir)
                .expect("under dir")
                .display()
                .to_string()
        })
        .collect()
}

/// No partial file: every JSON file under `output.dir` parses, and every result file is
/// the one its digest's state names (an unrecorded result would be a second one later).
fn assert_no_partial_file(scanner: &Scanner, skip: &[&str], case: &str) {
    let output = scanner.output_dir();
    let images = scanner.images();
    for name in relative_files(&output) {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let bytes = std::fs::read(output.join(&name)).expect("read output file");
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "{case}: {name} is partial ({} bytes)",
            bytes.len()
        );
        if name.starts_with("scans/") {
            assert!(
                images.values().any(|i| i
                    .last_scan
                    .as_ref()
                    .and_then(|s| s.result_file.as_deref())
                    == Some(name.as_str())),
                "{case}: {name} is a result no state records"
            );
        }
    }
}

/// State did not advance for a failed digest: `failed` with `expected` in `last_error`,
/// no scan recorded, nothing half done, a retry planned, no result file.
fn assert_failed(scanner: &Scanner, digest: &str, expected: &str, case: &str) {
    let image = scanner.image(digest).expect("known digest");
    assert_eq!(image.status, ImageStatus::Failed, "{case}: {image:?}");
    let error = image.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(expected),
        "{case}: {error:?} lacks {expected:?}"
    );
    assert!(image.last_scan.is_none(), "{case}: no scan recorded");
    assert!(image.pending_write.is_none(), "{case}: nothing half done");
    assert!(image.next_retry.is_some(), "{case}: a retry is planned");
    let results = scanner
        .result_files()
        .remove(&hex(digest))
        .unwrap_or_default();
    assert!(results.is_empty(), "{case}: no result file: {results:?}");
}

/// `digest` is `scanned` after `attempts` attempts with exactly one result file, the
/// complete grype document state names, and its SBOM complete in `sboms/`.
fn assert_scanned_once(scanner: &Scanner, digest: &str, attempts: u32, case: &str) {
    let image = scanner.image(digest).expect("known digest");
    assert_eq!(image.status, ImageStatus::Scanned, "{case}: {image:?}");
    assert_eq!(image.attempts, attempts, "{case}: attempts");
    assert!(image.pending_write.is_none(), "{case}");
    let scan = image.last_scan.expect("scan recorded");
    let files = scanner
        .result_files()
        .remove(&hex(digest))
        .unwrap_or_default();
    assert_eq!(files.len(), 1, "{case}: exactly one result: {files:?}");
    let named = scan.result_file.expect("result in state");
    assert!(files[0].ends_with(&named), "{case}: {named} vs {files:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).expect("read result"))
            .unwrap_or_else(|e| panic!("{case}: result {named} is not complete JSON: {e}"));
    assert!(doc["matches"].is_array(), "{case}: a grype document");
    let sbom: serde_json::Value = serde_json::from_slice(
        &std::fs::read(scanner.output_dir().join(&scan.sbom_file)).expect("read SBOM"),
    )
    .unwrap_or_else(|e| panic!("{case}: SBOM is not complete JSON: {e}"));
    assert!(sbom["artifacts"].is_array(), "{case}: a syft SBOM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_where_the_scans_directory_must_be_fails_the_scans_and_they_recover_once_it_is_gone()
{
    let (registry, _pusher, a, b) = two_images().await;
    let scanner = Scanner::new(&registry.url());
    std::fs::create_dir_all(scanner.output_dir()).expect("output dir");
    let blocker = scanner.output_dir().join("scans");
    std::fs::write(&blocker, b"not a directory").expect("blocker");

    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.summary()["failed"], 2, "{}", run.stdout);
    assert!(!run.stdout.contains("panicked") && !run.stderr.contains("panicked"));
    let failures = scanner.failure_records();
    assert_eq!(failures.len(), 2, "{failures:?}");
    for (digest, tag) in [(&a.digest, "app/a:1"), (&b.digest, "app/b:1")] {
        let expected = format!("output {}/{}", blocker.display(), hex(digest));
        assert_failed(&scanner, digest, &expected, "scans is a file");
        let image = scanner.image(digest).expect("known");
        let found: Vec<_> = failures
            .iter()
            .filter(|(_, f)| f["digest"] == digest.as_str())
            .collect();
        assert_eq!(found.len(), 1, "{failures:?}");
        assert_failure_record(&found[0].1, &image, "scan", tag);
    }
    assert_no_partial_file(&scanner, &["scans"], "scans is a file");

    std::fs::remove_file(&blocker).expect("remove blocker");
    scanner.wait_until_due(&[&a.digest, &b.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 2, "scans back");
    }
    assert_no_partial_file(&scanner, &[], "scans back");
    assert_eq!(scanner.failure_records().len(), 2, "no new failure record");
    record(Tried {
        area: "disk",
        fault: "a regular file where output.dir/scans must be (ENOTDIR, root-proof)",
        runs: 2,
        outcome: "both scans failed naming the path, one failure record each, no result, no partial file, nothing recorded scanned; each scanned once with one complete result after the file went",
        lost: 0,
        test: "faults_disk::a_file_where_the_scans_directory_must_be_fails_the_scans_and_they_recover_once_it_is_gone",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_output_mount_fails_the_cycle_or_the_scan_without_advancing_state_and_recovers()
{
    let (registry, pusher, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    let output = scanner.output_dir();
    let mount = Mounted::bind(&output);
    let test = "faults_disk::a_read_only_output_mount_fails_the_cycle_or_the_scan_without_advancing_state_and_recovers";

    // Read-only before the cycle: the inventory record cannot be written, so the cycle
    // fails and commits nothing (the tags are seen again next time).
    mount.remount("ro");
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert!(
        run.stdout.contains("Read-only file system"),
        "the cause is logged: {}",
        run.stdout
    );
    assert!(scanner.images().is_empty(), "nothing committed");
    assert!(scanner.tags().is_empty(), "nothing committed");
    assert!(relative_files(&output).is_empty());
    mount.remount("rw");
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 1, "rw again");
    }
    assert_eq!(scanner.inventory().len(), 1, "one inventory record");
    record(Tried {
        area: "disk",
        fault: "output.dir mounted read-only before a cycle (EROFS)",
        runs: 2,
        outcome: "cycle failed at the inventory record, nothing committed (no tag, no image); the next cycle after remount rw scanned each image once",
        lost: 0,
        test,
    });

    // Read-only in the middle of a scan (a syft wrapper remounts it before scanning c):
    // the inventory is written, the SBOM copy fails, the failure is in state (its
    // record cannot be written and that is logged).
    let c = pusher
        .push_image(
            "app/c",
            "1",
            &DebianImage::default().with_file("etc/which", b"c"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push c");
    let flag = scanner.dir.path().join("fault-on");
    std::fs::write(&flag, b"").expect("flag");
    scanner.syft = wrapper_script(
        scanner.dir.path(),
        "syft-remounting-ro",
        &format!(
            "if [ -e {flag:?} ]; then mount -o remount,bind,ro {out:?} || exit 99; fi",
            flag = flag.display().to_string(),
            out = output.display().to_string()
        ),
        &support::daemon::syft(),
    );
    let before = relative_files(&output);
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.summary()["failed"], 1, "{}", run.stdout);
    assert_failed(&scanner, &c.digest, "Read-only file system", "ro mid-scan");
    let not_written = run.events("failure record not written; the failure is in state");
    assert_eq!(not_written.len(), 1, "{}", run.stdout);
    assert_eq!(not_written[0]["digest"], c.digest.as_str());
    let after = relative_files(&output);
    assert_eq!(
        after.len(),
        before.len() + 1,
        "only the inventory record is new: {after:?}"
    );
    assert_no_partial_file(&scanner, &[], "ro mid-scan");

    std::fs::remove_file(&flag).expect("fault off");
    mount.remount("rw");
    scanner.wait_until_due(&[&c.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_scanned_once(&scanner, &c.digest, 2, "rw after mid-scan");
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 1, "untouched");
    }
    assert_no_partial_file(&scanner, &[], "rw after mid-scan");
    record(Tried {
        area: "disk",
        fault: "output.dir remounted read-only while syft runs (EROFS on the result copy)",
        runs: 2,
        outcome: "scan failed with `Read-only file system` in state, failure record not written and logged, no partial file; scanned once with one complete result after remount rw; other images untouched",
        lost: 0,
        test,
    });
}

/// Fills the filesystem of `dir` up to its last `leave` bytes with `dir/filler`.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write as _;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => size += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", filler.display()),
        }
    }
    file.set_len(size.saturating_sub(leave))
        .expect("leave room");
    file.sync_all().expect("sync filler");
    filler
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_output_disk_fails_the_scans_leaves_no_partial_file_and_recovers_when_space_returns()
{
    let (registry, _pusher, a, b) = two_images().await;
    let scanner = Scanner::new(&registry.url());
    let output = scanner.output_dir();
    let _mount = Mounted::tmpfs(&output, 4 * 1024 * 1024);
    // Three pages left: one for the inventory record, two for one SBOM (about 6 KiB
    // here) but none for its result, so every scan runs out of space while copying,
    // whichever copy comes first. A tmpfs creates files without data pages, so ENOSPC
    // comes from a write: a partial file existed and must be gone.
    let filler = fill(&output, 12 * 1024);

    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.summary()["failed"], 2, "{}", run.stdout);
    assert!(!run.stdout.contains("panicked") && !run.stderr.contains("panicked"));
    for digest in [&a.digest, &b.digest] {
        assert_failed(&scanner, digest, "No space left on device", "disk full");
    }
    assert_eq!(scanner.inventory().len(), 1, "the inventory fit");
    // Failure records are best effort on a full disk; each one written is complete.
    for (_, failure) in scanner.failure_records() {
        let digest = failure["digest"].as_str().unwrap_or_default();
        assert!(digest == a.digest || digest == b.digest, "{failure}");
    }
    assert_no_partial_file(&scanner, &["filler"], "disk full");

    std::fs::remove_file(&filler).expect("space returns");
    scanner.wait_until_due(&[&a.digest, &b.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 2, "space back");
    }
    assert_no_partial_file(&scanner, &[], "space back");
    record(Tried {
        area: "disk",
        fault: "output.dir on a 4 MiB tmpfs filled to its last 12 KiB (ENOSPC while copying SBOMs and results)",
        runs: 2,
        outcome: "both scans failed with `No space left on device`, partial copies removed, nothing recorded scanned; each scanned once with one complete result after space returned",
        lost: 0,
        test: "faults_disk::a_full_output_disk_fails_the_scans_leaves_no_partial_file_and_recovers_when_space_returns",
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_the_file_size_limit_never_stand_as_partial_files_and_are_scanned_once_without_it()
 {
    use std::os::unix::process::ExitStatusExt as _;
    const LIMIT: u64 = 2_000_000;
    let (registry, _pusher, a, b) = two_images().await;
    let mut scanner = Scanner::new(&registry.url());
    // grype runs with the limit lifted (its own soft limit raised to the hard one) and
    // pads its document to 3 MB with a field grype does not have: the daemon's copy to
    // `scans/` crosses RLIMIT_FSIZE.
    scanner.grype = Some(wrapper_script(
        scanner.dir.path(),
        "grype-3mb",
        &format!(
            "ulimit -f unlimited; out=${{3#json=}}; {grype:?} \"$@\" || exit $?; \
             python3 -c \"import json,sys; d=json.load(open(sys.argv[1])); d['padding']='x'*3000000; json.dump(d,open(sys.argv[1],'w'))\" \"$out\"; exit 0",
            grype = support::daemon::grype().display().to_string()
        ),
        &support::daemon::grype(),
    ));
    let config = scanner.write_config();
    let limited = Command::new("prlimit")
        .arg(format!("--fsize={LIMIT}:unlimited"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .arg("--config")
        .arg(&config)
        .arg("once")
        .env_remove("RUST_LOG")
        .output()
        .expect("prlimit");
    let stdout = String::from_utf8_lossy(&limited.stdout).to_string();
    // SIGXFSZ is caught (src/shutdown.rs): the write fails with EFBIG instead of killing
    // the daemon in the middle of a copy.
    assert_ne!(
        limited.status.signal(),
        Some(nix::libc::SIGXFSZ),
        "the daemon was killed by SIGXFSZ\n{stdout}"
    );
    assert_eq!(limited.status.code(), Some(1), "{stdout}");
    for digest in [&a.digest, &b.digest] {
        assert_failed(&scanner, digest, "File too large", "EFBIG");
    }
    assert_no_partial_file(&scanner, &[], "EFBIG");
    let first = "the result copies failed with EFBIG (the daemon survives SIGXFSZ), both scans failed, no partial file";

    // Without the limit each image ends with exactly one complete result.
    scanner.wait_until_due(&[&a.digest, &b.digest]).await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    for digest in [&a.digest, &b.digest] {
        assert_scanned_once(&scanner, digest, 2, "no limit");
        let files = scanner
            .result_files()
            .remove(&hex(digest))
            .unwrap_or_default();
        let size = std::fs::metadata(&files[0]).expect("result").len();
        assert!(size > LIMIT, "the whole 3 MB document: {size}");
    }
    assert_no_partial_file(&scanner, &[], "no limit");
    let outcome = format!(
        "{first}; after a run without the limit each image has exactly one complete 3 MB result"
    );
    record(Tried {
        area: "disk",
        fault: "RLIMIT_FSIZE of 2 MB (prlimit) with 3 MB grype documents",
        runs: 2,
        outcome: &outcome,
        lost: 0,
        test: "faults_disk::results_over_the_file_size_limit_never_stand_as_partial_files_and_are_scanned_once_without_it",
    });
}
