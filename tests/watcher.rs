//! End-to-end scenarios of the registry watcher with real parts: a real `docker-registry`
//! on a free loopback port, images built and pushed by the tests, the real
//! `spcs-image-scanner` binary, the real syft, and grype (real if `$GRYPE` names it, else
//! the test stand-in). Every scenario asserts on files, state and the registry's own
//! request log.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use spcs_image_scanner::state::ImageStatus;
use support::daemon::{
    Auth, Scanner, assert_failure_record, hanging_wrapper, using_standin, wait_for_file,
    wrapper_script,
};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{LoggedRequest, RegistryOptions, TestRegistry};

/// User-Agent prefix of the daemon's own requests (syft's differ).
const DAEMON_UA: &str = "spcs-image-scanner/";

/// What [`seed`] pushed.
struct Seeded {
    /// `demo/debian-zlib:1.0` and `:latest`.
    a: PushedManifest,
    /// `demo/debian-zlib:2.0`.
    b: PushedManifest,
    /// The amd64 child of `demo/multi:1`.
    amd64: PushedManifest,
    /// The arm64 child of `demo/multi:1`.
    arm64: PushedManifest,
    index: String,
    signature: String,
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// Two repositories, five tags, four distinct scannable-or-not targets:
/// A (two tags), B, an amd64+arm64 index, and a cosign-style signature of A.
async fn seed(pusher: &Pusher) -> Seeded {
    let a = pusher
        .push_image(
            "demo/debian-zlib",
            "1.0",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect("push A");
    pusher
        .push_image(
            "demo/debian-zlib",
            "latest",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect("push A as latest");
    let b_image = DebianImage::default().with_package("libc6", "2.31-13+deb11u5");
    let b = pusher
        .push_image(
            "demo/debian-zlib",
            "2.0",
            &b_image,
            ManifestFormat::DockerV2,
        )
        .await
        .expect("push B");
    let amd64 = pusher
        .push_image_by_digest(
            "demo/multi",
            &DebianImage::new("amd64").with_file("etc/multi", b"amd64"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push amd64 child");
    let arm64 = pusher
        .push_image_by_digest(
            "demo/multi",
            &DebianImage::new("arm64").with_file("etc/multi", b"arm64"),
            ManifestFormat::Oci,
        )
        .await
        .expect("push arm64 child");
    let index = pusher
        .push_index(
            "demo/multi",
            "1",
            &[
                (arm64.clone(), "linux", "arm64"),
                (amd64.clone(), "linux", "amd64"),
            ],
        )
        .await
        .expect("push index");
    let signature = pusher
        .push_signature_artifact("demo/debian-zlib", &a.digest)
        .await
        .expect("push signature");
    Seeded {
        a,
        b,
        amd64,
        arm64,
        index,
        signature,
    }
}

/// A registry holding `repository:1`, the default Debian 11 image with zlib1g.
async fn registry_with_image(
    options: RegistryOptions,
    repository: &str,
) -> (TestRegistry, Pusher, PushedManifest) {
    let registry = TestRegistry::start(options).await;
    let pusher = Pusher::new(
        &registry.url(),
        registry
            .credentials()
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str())),
    );
    let image = pusher
        .push_image(
            repository,
            "1",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect("push image");
    (registry, pusher, image)
}

fn daemon_requests(registry: &TestRegistry, mark: usize) -> Vec<LoggedRequest> {
    registry
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.user_agent_starts_with(DAEMON_UA))
        .collect()
}

fn count(requests: &[LoggedRequest], method: &str, path_part: &str) -> usize {
    requests
        .iter()
        .filter(|r| r.method == method && r.path.contains(path_part))
        .count()
}

#[tokio::test]
async fn first_cycle_scans_each_digest_once_and_an_unchanged_registry_costs_one_head_per_tag() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let seeded = seed(&pusher).await;
    let scanner = Scanner::new(&registry.url());

    // First cycle.
    let mark = registry.wait_for_log_quiet().await;
    let first = scanner.once();
    assert_eq!(first.code, Some(0), "{}\n{}", first.stdout, first.stderr);
    let summary = first.summary();
    assert_eq!(summary["repositories"], 2);
    assert_eq!(summary["tags"], 5, "{summary}");
    assert_eq!(summary["added"], 5);
    assert_eq!(summary["queued"], 3);
    assert_eq!(summary["scanned"], 3);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["unsupported"], 1);

    // One scan per distinct runnable digest: A (two tags), B, and the amd64 child only.
    let expected: BTreeSet<String> = [&seeded.a.digest, &seeded.b.digest, &seeded.amd64.digest]
        .iter()
        .map(|d| hex(d))
        .collect();
    let results = scanner.result_files();
    assert_eq!(results.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for files in results.values() {
        assert_eq!(files.len(), 1, "{files:?}");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert!(doc["matches"].is_array());
    }
    assert_eq!(first.events("scan started").len(), 3);
    assert!(
        scanner.failure_records().is_empty(),
        "a successful scan writes no failure record"
    );
    let sboms: BTreeSet<String> = scanner.sbom_files().into_iter().collect();
    assert_eq!(
        sboms,
        expected.iter().map(|h| format!("{h}.syft.json")).collect()
    );

    // The real SBOM flowed through: syft found zlib1g, the matcher matched it.
    let a_result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results[&hex(&seeded.a.digest)][0]).unwrap())
            .unwrap();
    assert_eq!(
        a_result["source"]["target"]["manifestDigest"],
        seeded.a.digest.as_str()
    );
    if using_standin() {
        let ids: BTreeSet<&str> = a_result["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["vulnerability"]["id"].as_str().unwrap())
            .collect();
        assert!(ids.contains("CVE-2022-37434"), "{ids:?}");
    }

    // State: statuses, tags per digest, the index resolution, the unsupported signature.
    let images = scanner.images();
    let a = &images[&seeded.a.digest];
    assert_eq!(a.status, ImageStatus::Scanned);
    assert_eq!(
        a.tags.iter().cloned().collect::<Vec<_>>(),
        vec!["demo/debian-zlib:1.0", "demo/debian-zlib:latest"]
    );
    let scan = a.last_scan.as_ref().unwrap();
    assert_eq!(scan.packages, 1);
    assert!(
        scan.result_file
            .as_deref()
            .unwrap()
            .starts_with(&format!("scans/{}/", hex(&seeded.a.digest)))
    );
    let child = &images[&seeded.amd64.digest];
    assert_eq!(child.status, ImageStatus::Scanned);
    assert_eq!(child.platform.as_deref(), Some("linux/amd64"));
    assert!(
        child
            .index_digests
            .iter()
            .any(|d| d.as_str() == seeded.index)
    );
    assert!(
        !images.contains_key(&seeded.arm64.digest),
        "the arm64 child must not be touched"
    );
    let sig = &images[&seeded.signature];
    assert_eq!(sig.status, ImageStatus::Unsupported);
    assert!(
        sig.unsupported_reason
            .as_deref()
            .unwrap()
            .contains("cosign signature"),
        "{sig:?}"
    );
    assert!(sig.last_scan.is_none());

    // Inventory: one record per tag, the index tag carrying both digests.
    let inventory = scanner.inventory();
    assert_eq!(inventory.len(), 1);
    let records = &inventory[0].1;
    assert_eq!(records.len(), 5);
    assert!(records.iter().all(|r| r["change"] == "added"));
    let multi = records
        .iter()
        .find(|r| r["repository"] == "demo/multi")
        .unwrap();
    assert_eq!(multi["digest"], seeded.amd64.digest.as_str());
    assert_eq!(multi["index_digest"], seeded.index.as_str());
    assert_eq!(multi["platform"], "linux/amd64");

    // Registry cost of the first cycle: a GET only for digests never seen (A, B, the
    // index, its amd64 child, the signature), one HEAD per tag.
    let requests = daemon_requests(&registry, mark);
    assert_eq!(count(&requests, "GET", "/manifests/"), 5, "{requests:#?}");
    assert_eq!(count(&requests, "HEAD", "/manifests/"), 5);
    assert!(
        requests
            .iter()
            .all(|r| !r.path.contains(&hex(&seeded.arm64.digest)))
    );

    // Second cycle, in a new process (a restart), registry unchanged: no scan, no GET.
    let mark = registry.wait_for_log_quiet().await;
    let second = scanner.once();
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    let summary = second.summary();
    assert_eq!(summary["unchanged"], 5);
    assert_eq!(summary["queued"], 0);
    assert_eq!(summary["scanned"], 0);
    assert_eq!(second.events("scan started").len(), 0);
    assert_eq!(scanner.result_files(), results, "nothing rescanned");
    assert_eq!(
        scanner.inventory().len(),
        1,
        "no change, no inventory record"
    );
    let requests = daemon_requests(&registry, mark);
    assert_eq!(count(&requests, "GET", "/manifests/"), 0, "{requests:#?}");
    assert_eq!(count(&requests, "HEAD", "/manifests/"), 5);
    // Catalog + two tag lists + five HEADs, nothing else.
    assert_eq!(requests.len(), 8, "{requests:#?}");
    assert_eq!(summary["registry_requests"], 8);
    eprintln!(
        "measured on the test registry (2 repositories, 5 tags): first cycle {} ms with 3 scans, {} daemon requests; \
         idle cycle {} ms, {} daemon requests",
        first.summary()["duration_ms"],
        first.summary()["registry_requests"],
        summary["duration_ms"],
        summary["registry_requests"]
    );
    let syft_requests = registry
        .requests_since(mark)
        .into_iter()
        .filter(|r| {
            !r.user_agent_starts_with(DAEMON_UA)
                && !r.user_agent_starts_with("spcs-image-scanner-tests")
        })
        .count();
    assert_eq!(syft_requests, 0, "no image pulled on an idle cycle");
}

#[tokio::test]
async fn a_moved_tag_gets_exactly_one_new_scan_and_a_moved_record() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let seeded = seed(&pusher).await;
    let scanner = Scanner::new(&registry.url());
    assert_eq!(scanner.once().code, Some(0));
    let before = scanner.result_files();

    let c = pusher
        .push_image(
            "demo/debian-zlib",
            "latest",
            &DebianImage::default().with_file("etc/build", b"2"),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    let mark = registry.wait_for_log_quiet().await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let summary = run.summary();
    assert_eq!(
        (summary["moved"].as_u64(), summary["scanned"].as_u64()),
        (Some(1), Some(1)),
        "{summary}"
    );

    let after = scanner.result_files();
    assert_eq!(after.len(), before.len() + 1);
    assert_eq!(after[&hex(&c.digest)].len(), 1);
    for (digest, files) in &before {
        assert_eq!(&after[digest], files, "{digest} was rescanned");
    }
    // Only the new digest was fetched.
    let requests = daemon_requests(&registry, mark);
    let gets: Vec<&LoggedRequest> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:#?}");
    assert!(gets[0].path.ends_with(&c.digest));

    let inventory = scanner.inventory();
    assert_eq!(inventory.len(), 2);
    let records = &inventory[1].1;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["change"], "moved");
    assert_eq!(records[0]["tag"], "latest");
    assert_eq!(records[0]["digest"], c.digest.as_str());
    assert_eq!(records[0]["previous_digest"], seeded.a.digest.as_str());

    // State: the tag's history, and A keeps only its other tag.
    let tag = scanner
        .tags()
        .into_iter()
        .find(|t| t.tag == "latest")
        .unwrap();
    assert_eq!(tag.digest.as_str(), c.digest);
    assert_eq!(tag.previous.len(), 1);
    assert_eq!(tag.previous[0].digest.as_str(), seeded.a.digest);
    let a = scanner.image(&seeded.a.digest).unwrap();
    assert_eq!(
        a.tags.iter().cloned().collect::<Vec<_>>(),
        vec!["demo/debian-zlib:1.0"]
    );
}

#[tokio::test]
async fn a_deleted_tag_is_recorded_removed_and_nothing_is_rescanned() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let seeded = seed(&pusher).await;
    let scanner = Scanner::new(&registry.url());
    assert_eq!(scanner.once().code, Some(0));
    let before = scanner.result_files();

    registry.delete_tag_in_storage("demo/debian-zlib", "2.0");
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let summary = run.summary();
    assert_eq!(summary["removed"], 1, "{summary}");
    assert_eq!(summary["scanned"], 0);
    assert_eq!(scanner.result_files(), before);

    let inventory = scanner.inventory();
    let records = &inventory.last().unwrap().1;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["change"], "removed");
    assert_eq!(records[0]["tag"], "2.0");
    assert_eq!(records[0]["digest"], seeded.b.digest.as_str());
    assert!(scanner.tags().iter().all(|t| t.tag != "2.0"));
    let b = scanner.image(&seeded.b.digest).unwrap();
    assert!(b.tags.is_empty());
    assert_eq!(b.status, ImageStatus::Scanned, "history is kept");

    // `report` shows the same, from the store.
    let report = std::process::Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .arg("--config")
        .arg(scanner.config_path())
        .arg("report")
        .output()
        .unwrap();
    assert!(report.status.success());
    let table = String::from_utf8_lossy(&report.stdout);
    let b_line = table
        .lines()
        .find(|l| l.starts_with(&format!("sha256:{}", &hex(&seeded.b.digest)[..12])))
        .unwrap();
    assert!(
        b_line.contains("scanned") && b_line.contains("(no tag)"),
        "{table}"
    );
    assert!(
        table.contains("4 digests: 3 scanned, 1 unsupported"),
        "{table}"
    );
}

#[tokio::test]
async fn kill_9_during_a_scan_rescans_after_restart_without_partial_or_duplicate_results() {
    let (registry, _pusher, a) =
        registry_with_image(RegistryOptions::anonymous(), "demo/only").await;
    let mut scanner = Scanner::new(&registry.url());
    // grype that announces itself, then hangs: the daemon is killed while it runs.
    let slow = hanging_wrapper(scanner.dir.path(), "grype-hangs", &support::daemon::grype());
    scanner.grype = Some(slow.script);
    let mut daemon = scanner.spawn_run();
    wait_for_file(&slow.started, Duration::from_secs(120)).await;
    daemon.crash(&slow.pidfile).await;

    assert_eq!(
        scanner.image(&a.digest).unwrap().status,
        ImageStatus::Scanning
    );
    assert!(
        scanner.result_files().is_empty(),
        "no result before the scan finished"
    );

    scanner.grype = Some(support::daemon::grype());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["scanned"], 1);
    let results = scanner.result_files();
    assert_eq!(results.len(), 1);
    let files = &results[&hex(&a.digest)];
    assert_eq!(files.len(), 1, "exactly one result: {files:?}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).expect("complete JSON");
    assert!(doc["matches"].is_array());
    let image = scanner.image(&a.digest).unwrap();
    assert_eq!(image.status, ImageStatus::Scanned);
    assert_eq!(image.attempts, 2, "the killed attempt counts");
    assert!(
        scanner.failure_records().is_empty(),
        "a crash is settled at start-up, not recorded as a failure"
    );
    assert!(
        !scanner.state_dir().join("tmp").exists()
            || std::fs::read_dir(scanner.state_dir().join("tmp"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[tokio::test]
async fn registry_stopped_mid_cycle_is_logged_the_daemon_stays_up_and_recovers() {
    let (mut registry, pusher, a) =
        registry_with_image(RegistryOptions::anonymous(), "demo/flaky").await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.cron = "* * * * * *".into();
    let started = scanner.dir.path().join("grype-started");
    let release = scanner.dir.path().join("grype-release");
    // grype waits for the test: the registry goes down while the cycle is scanning.
    let gated = wrapper_script(
        scanner.dir.path(),
        "grype-gated",
        &format!(
            "touch {:?}; i=0; while [ ! -e {:?} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
            started.display().to_string(),
            release.display().to_string()
        ),
        &support::daemon::grype(),
    );
    scanner.grype = Some(gated);
    let mut daemon = scanner.spawn_run();
    wait_for_file(&started, Duration::from_secs(120)).await;
    // Cycles never overlap: ticks that fire while this cycle scans are coalesced.
    daemon
        .wait_for(
            "schedule tick coalesced: a cycle is running and another is queued",
            2,
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    assert!(
        daemon.events("cycle finished").is_empty()
            && daemon
                .events("cycle failed; will try again at the next tick")
                .is_empty()
    );
    assert_eq!(daemon.events("scan started").len(), 1);
    registry.stop().await;
    std::fs::write(&release, b"go").unwrap();

    // The cycle in progress finishes its scan (grype reads the SBOM, not the registry).
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(60), |e| {
            e["scanned"] == 1
        })
        .await;
    // The next cycles fail with a clear line and the daemon stays up.
    let failures = daemon
        .wait_for(
            "cycle failed; will try again at the next tick",
            1,
            Duration::from_secs(60),
            |_| true,
        )
        .await;
    let error = failures[0]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", failures[0]));
    assert!(
        error.contains(&registry.host()) && error.contains("/v2/_catalog"),
        "{error}"
    );
    assert!(daemon.is_running());

    // The registry returns; a new tag shows the next cycle completes in full.
    registry.start_again().await;
    let b = pusher
        .push_image(
            "demo/flaky",
            "2",
            &DebianImage::default().with_file("etc/v", b"2"),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    // The first cycle (tag 1) also added and scanned one: wait for the second such cycle.
    daemon
        .wait_for("cycle finished", 2, Duration::from_secs(60), |e| {
            e["added"] == 1 && e["scanned"] == 1 && e["errors"] == 0
        })
        .await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    assert_eq!(
        scanner.image(&a.digest).unwrap().status,
        ImageStatus::Scanned
    );
    assert_eq!(
        scanner.image(&b.digest).unwrap().status,
        ImageStatus::Scanned
    );
}

#[tokio::test]
async fn basic_auth_with_htpasswd_scans_and_never_logs_the_password() {
    let password = "pw-SENTINEL-7f3a9c";
    let (registry, _pusher, a) = registry_with_image(
        RegistryOptions::htpasswd("scanner", password),
        "private/app",
    )
    .await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.auth = Auth::Basic {
        username: "scanner".into(),
        password: password.into(),
    };
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.summary()["scanned"], 1);
    assert_eq!(scanner.result_files()[&hex(&a.digest)].len(), 1);
    assert!(!run.stdout.contains(password) && !run.stderr.contains(password));
    assert_no_file_contains(&scanner.output_dir(), password);
    assert_no_file_contains(&scanner.state_dir(), password);

    // Wrong password: a clear failure naming the registry, exit 1, no result.
    let mut wrong = Scanner::new(&registry.url());
    wrong.auth = Auth::Basic {
        username: "scanner".into(),
        password: "not-it".into(),
    };
    let run = wrong.once();
    assert_eq!(run.code, Some(1));
    let failed = run.events("cycle failed; will try again at the next tick");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("unauthorized"),
        "{}",
        run.stdout
    );
    assert!(wrong.result_files().is_empty());
    assert!(
        wrong.failure_records().is_empty(),
        "a failed cycle is no failed scan"
    );

    // A scanner that echoes the password in its error: the failure record (like the
    // state) carries it redacted.
    let mut echoes = Scanner::new(&registry.url());
    echoes.auth = Auth::Basic {
        username: "scanner".into(),
        password: password.into(),
    };
    echoes.syft = wrapper_script(
        echoes.dir.path(),
        "syft-echoes-password",
        "echo \"login to registry failed: password=$SYFT_REGISTRY_AUTH_PASSWORD\" >&2; exit 1",
        &support::daemon::syft(),
    );
    let run = echoes.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let records = echoes.failure_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let image = echoes.image(&a.digest).unwrap();
    assert_failure_record(&records[0].1, &image, "scan", "private/app:1");
    let error = records[0].1["error"].as_str().unwrap();
    assert!(error.contains("password=[redacted]"), "{error}");
    assert!(!run.stdout.contains(password) && !run.stderr.contains(password));
    assert_no_file_contains(&echoes.output_dir(), password);
    assert_no_file_contains(&echoes.state_dir(), password);
}

#[tokio::test]
async fn spcs_token_file_is_reread_when_it_changes_without_a_restart() {
    let user = "0auth2accesstoken";
    let mut registry =
        TestRegistry::start(RegistryOptions::htpasswd(user, "token-ONE-sentinel")).await;
    let pusher = Pusher::new(&registry.url(), Some((user, "token-ONE-sentinel")));
    pusher
        .push_image(
            "db/schema/repo/app",
            "1",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    let mut scanner = Scanner::new(&registry.url());
    scanner.auth = Auth::Spcs {
        token: "token-ONE-sentinel".into(),
    };
    scanner.cron = "* * * * * *".into();
    let mut daemon = scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |e| {
            e["scanned"] == 1
        })
        .await;

    // SPCS rewrites the token file; the registry stops accepting the old token.
    registry.set_credentials_live(user, "token-TWO-sentinel");
    std::fs::write(scanner.secret_path(), "token-TWO-sentinel\n").unwrap();
    let pusher = Pusher::new(&registry.url(), Some((user, "token-TWO-sentinel")));
    let b = pusher
        .push_image(
            "db/schema/repo/app",
            "2",
            &DebianImage::default().with_file("etc/v", b"2"),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    let mark = registry.mark();
    // The first cycle (tag 1) also added and scanned one: wait for the second such cycle.
    daemon
        .wait_for("cycle finished", 2, Duration::from_secs(120), |e| {
            e["added"] == 1 && e["scanned"] == 1 && e["errors"] == 0
        })
        .await;
    // Later cycles go through without a single refusal.
    let next = daemon.events("cycle finished").len() + 1;
    daemon
        .wait_for("cycle finished", next, Duration::from_secs(30), |_| true)
        .await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let refused_after = registry
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.status == 401 && r.user_agent_starts_with(DAEMON_UA))
        .count();
    assert!(refused_after <= 1, "the new token must be used at once");
    assert_eq!(
        scanner.image(&b.digest).unwrap().status,
        ImageStatus::Scanned
    );
    let output = daemon.output();
    assert!(!output.contains("token-ONE-sentinel") && !output.contains("token-TWO-sentinel"));
    assert_no_file_contains(&scanner.output_dir(), "token-TWO-sentinel");
    assert_no_file_contains(&scanner.state_dir(), "token-TWO-sentinel");
}

#[tokio::test]
async fn bad_config_exits_64_naming_the_key() {
    let scanner = Scanner::new("http://127.0.0.1:1");
    scanner.write_config();
    let mut text = std::fs::read_to_string(scanner.config_path()).unwrap();
    text = text.replace("concurrency = 2\n", "concurrency = 0\n");
    std::fs::write(scanner.config_path(), text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .arg("--config")
        .arg(scanner.config_path())
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("scanner.concurrency"), "{stderr}");
    assert!(
        !scanner.state_dir().join("db").exists(),
        "nothing starts before the config is valid"
    );
}

fn assert_no_file_contains(dir: &std::path::Path, needle: &str) {
    for path in support::daemon::files_under(dir) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{} contains a secret",
            path.display()
        );
    }
}

#[tokio::test]
async fn a_failed_scan_is_recorded_with_stderr_and_retried_after_its_back_off() {
    let (registry, pusher, a) =
        registry_with_image(RegistryOptions::anonymous(), "demo/fails").await;
    let b = pusher
        .push_image(
            "demo/fails",
            "2",
            &DebianImage::default().with_file("etc/v", b"2"),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    let mut scanner = Scanner::new(&registry.url());
    let broken = wrapper_script(
        scanner.dir.path(),
        "grype-broken",
        "printf '\\033[31m[0000] ERROR\\033[0m failed to load vulnerability db: boom\\n' >&2; exit 1",
        &support::daemon::grype(),
    );
    scanner.grype = Some(broken);
    let run = scanner.once();
    assert_eq!(
        run.code,
        Some(1),
        "a failed scan makes `once` exit 1\n{}",
        run.stdout
    );
    let summary = run.summary();
    assert_eq!(
        (summary["scanned"].as_u64(), summary["failed"].as_u64()),
        (Some(0), Some(2)),
        "{summary}"
    );
    assert!(
        scanner.result_files().is_empty(),
        "a failure is never a result"
    );
    let record = scanner.image(&a.digest).unwrap();
    assert_eq!(record.status, ImageStatus::Failed);
    assert_eq!(record.attempts, 1);
    let error = record.last_error.clone().unwrap();
    assert!(
        error.contains("grype exited with code 1")
            && error.contains("ERROR failed to load vulnerability db: boom"),
        "{error}"
    );
    assert!(
        !error.contains('\u{1b}'),
        "ANSI codes are stripped: {error:?}"
    );
    let next_retry = record.next_retry.unwrap();
    assert!(next_retry > record.first_seen);

    // Snowflake sees each failed attempt: one failure record per digest, as state has it.
    let failures = scanner.failure_records();
    assert_eq!(failures.len(), 2, "{failures:?}");
    for (digest, tag) in [(&a.digest, "demo/fails:1"), (&b.digest, "demo/fails:2")] {
        let image = scanner.image(digest).unwrap();
        let found: Vec<_> = failures
            .iter()
            .filter(|(_, f)| f["digest"] == digest.as_str())
            .collect();
        assert_eq!(found.len(), 1, "{failures:?}");
        assert_failure_record(&found[0].1, &image, "scan", tag);
        assert!(found[0].0.ends_with(&format!("_{}.json", hex(digest))));
    }

    // Not due yet: nothing is queued however often a cycle runs.
    let run = scanner.once();
    if chrono::Utc::now() < next_retry {
        assert_eq!(run.summary()["queued"], 0);
        assert_eq!(scanner.image(&a.digest).unwrap().attempts, 1);
        assert_eq!(scanner.failure_records().len(), 2, "no attempt, no record");
    }

    // Once due, with a working grype, they are scanned.
    let due = [&a.digest, &b.digest]
        .iter()
        .map(|d| scanner.image(d).unwrap().next_retry.unwrap())
        .max()
        .unwrap();
    while chrono::Utc::now() <= due + chrono::Duration::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // On a slow machine the "not due yet" run may already have been due and failed once
    // more: the records to keep are the ones there before the working grype.
    let failures = scanner.failure_records();
    scanner.grype = Some(support::daemon::grype());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary()["scanned"], 2);
    for digest in [&a.digest, &b.digest] {
        let record = scanner.image(digest).unwrap();
        assert_eq!(record.status, ImageStatus::Scanned);
        assert_eq!(record.last_error, None);
        assert_eq!(scanner.result_files()[&hex(digest)].len(), 1);
    }
    assert_eq!(
        scanner.failure_records(),
        failures,
        "a successful scan writes no failure record; earlier ones stay"
    );
}

#[tokio::test]
async fn sbom_only_mode_writes_sboms_and_says_so_in_logs_and_records() {
    let (registry, _pusher, a) =
        registry_with_image(RegistryOptions::anonymous(), "demo/sbom").await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.grype = None;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(run.stdout.contains("SBOM-only mode"), "{}", run.stdout);
    assert_eq!(
        run.events(
            "scan finished without vulnerability matching (SBOM-only mode: scanner.grype is empty)"
        )
        .len(),
        1
    );
    assert!(
        scanner.result_files().is_empty(),
        "no grype document without grype"
    );
    assert_eq!(
        scanner.sbom_files(),
        vec![format!("{}.syft.json", hex(&a.digest))]
    );
    let scan = scanner.image(&a.digest).unwrap().last_scan.unwrap();
    assert_eq!(scan.mode, spcs_image_scanner::state::ScanMode::SbomOnly);
    assert_eq!(scan.result_file, None);
    assert_eq!(scan.grype_version, None);
    assert_eq!(scan.packages, 1);
    let sbom: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            scanner
                .output_dir()
                .join("sboms")
                .join(format!("{}.syft.json", hex(&a.digest))),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sbom["artifacts"][0]["name"], "zlib1g");
    assert!(
        scanner
            .state_dir()
            .join("sboms")
            .join(format!("{}.syft.json", hex(&a.digest)))
            .exists()
    );
}
