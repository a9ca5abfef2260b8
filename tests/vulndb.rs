//! The vulnerability-DB lifecycle end to end: updates from a loopback update server,
//! re-matching cached SBOMs without registry traffic, change records, failed updates,
//! failed re-matches and scans (and their failure records), stale DBs, updates racing
//! scans, a crash during re-matching, and lane priority. Real docker-registry, real syft,
//! the real binary; grype is the test stand-in with its own DB (see
//! tests/fixtures/README.md), or a real grype from `$GRYPE` for the tests that do not
//! need a scripted DB.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use nix::sys::signal::Signal;
use serde_json::json;
use spcs_image_scanner::digest::Digest;
use spcs_image_scanner::state::{
    Batch, ImageRecord, ImageStatus, ScanMode, ScanRecord, Store, TagRecord,
};
use support::daemon::{
    Scanner, assert_failure_record, using_standin, wait_for_file, wrapper_script,
};
use support::db_server::{DbBuild, DbServer, Serve};
use support::oci::{DebianImage, ManifestFormat, PushedManifest, Pusher};
use support::registry::{RegistryOptions, TestRegistry};

/// An RFC 3339 build time `hours` ago, as the stand-in's DB carries it.
fn built(hours: i64) -> String {
    (Utc::now() - chrono::Duration::hours(hours)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_string()
}

/// A registry with `n` distinct Debian 11 images tagged `app/svc:v0..`.
async fn registry_with_images(n: usize) -> (TestRegistry, Pusher, Vec<PushedManifest>) {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let mut images = Vec::new();
    for i in 0..n {
        let image = DebianImage::default().with_file("etc/build-id", format!("{i}").as_bytes());
        images.push(
            pusher
                .push_image("app/svc", &format!("v{i}"), &image, ManifestFormat::Oci)
                .await
                .expect("push"),
        );
    }
    (registry, pusher, images)
}

/// An advisory that matches the test images' zlib1g and is not in the fixture.
fn new_advisory() -> serde_json::Value {
    json!({
        "id": "CVE-2099-0001",
        "package": {"name": "zlib1g", "type": "deb"},
        "distro": {"id": "debian", "versionID": "11"},
        "namespace": "debian:distro:debian:11",
        "dataSource": "https://security-tracker.debian.org/tracker/CVE-2099-0001",
        "urls": [],
        "severity": "Medium",
        "description": "a test advisory published after the images were scanned",
        "affected_versions": ["1:1.2.11.dfsg-2"],
        "fix": {"versions": [], "state": "not-fixed"},
        "cvss": [],
        "risk": 1.5
    })
}

/// One advisory of the fixture, by id.
fn fixture_advisory(id: &str) -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/advisories.json");
    let fixture: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    fixture["advisories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id && a["distro"]["versionID"] == "11")
        .cloned()
        .unwrap_or_else(|| panic!("{id} in the fixture"))
}

/// `scans/<hex>/*.json` names per digest hex.
fn result_names(scanner: &Scanner) -> BTreeMap<String, Vec<String>> {
    scanner
        .result_files()
        .into_iter()
        .map(|(hex, files)| {
            let names = files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
                .collect();
            (hex, names)
        })
        .collect()
}

/// Change records from every `changes/*.json`.
fn change_records(scanner: &Scanner) -> Vec<serde_json::Value> {
    let dir = scanner.output_dir().join("changes");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let records: Vec<serde_json::Value> =
                serde_json::from_slice(&std::fs::read(&p).unwrap())
                    .expect("changes file is a JSON array");
            out.extend(records);
        }
    }
    out
}

fn ids(list: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["vulnerability"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn run_cli(scanner: &Scanner, args: &[&str]) -> (Option<i32>, String, String) {
    scanner.write_config();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .arg("--config")
        .arg(scanner.config_path())
        .args(args)
        .env("SCANNER__LOG__FORMAT", "json")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn db_status(scanner: &Scanner) -> serde_json::Value {
    let (_, stdout, stderr) = run_cli(scanner, &["db", "status", "--json"]);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("db status --json: {e}\n{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_db_update_rematches_every_image_from_its_cached_sbom_without_registry_traffic() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    const N: usize = 4;
    let (registry, _pusher, images) = registry_with_images(N).await;
    let first_build = built(48);
    let server = DbServer::start(DbBuild::from_fixture(&first_build)).await;
    let mut scanner = Scanner::new(&registry.url());
    // No DB yet: the daemon installs it from the update server at start-up.
    scanner.remove_db();
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"0 0 0 1 1 *\"",
        server.url()
    );

    let mark = registry.wait_for_log_quiet().await;
    let started = Instant::now();
    let first = scanner.once();
    let full_time = started.elapsed();
    assert_eq!(first.code, Some(0), "{}\n{}", first.stdout, first.stderr);
    assert_eq!(first.summary()["scanned"], N);
    assert_eq!(server.archive_requests(), 1);
    let full_requests = registry.requests_since_settled(mark).await;
    let full_bytes: u64 = full_requests.iter().map(|r| r.bytes).sum();

    // A new DB: one advisory more, one less, one re-rated (Critical -> High, fixed -> unknown).
    let second_build = built(1);
    let mut rerated = fixture_advisory("CVE-2022-37434");
    rerated["severity"] = json!("High");
    rerated["fix"] = json!({"versions": [], "state": "unknown"});
    server.publish(
        DbBuild::from_fixture(&second_build)
            .with_advisory(new_advisory())
            .without_advisory("CVE-2018-25032")
            .without_advisory("CVE-2022-37434")
            .with_advisory(rerated),
    );
    let mark = registry.wait_for_log_quiet().await;
    let started = Instant::now();
    let second = scanner.once();
    let rematch_time = started.elapsed();
    assert_eq!(second.code, Some(0), "{}\n{}", second.stdout, second.stderr);
    let summary = second.summary();
    assert_eq!(summary["queued"], 0, "{summary}");
    assert_eq!(summary["rematch_queued"], N);
    assert_eq!(summary["rematched"], N);
    assert_eq!(second.events("vulnerability DB updated").len(), 1);

    // No image was pulled: the only registry requests are the cycle's listing and HEADs.
    let requests = registry.requests_since_settled(mark).await;
    assert!(
        requests.iter().all(|r| !r.path.contains("/blobs/")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().all(|r| !r.is_manifest("GET")),
        "{requests:#?}"
    );
    assert_eq!(requests.iter().filter(|r| r.is_manifest("HEAD")).count(), N);
    let rematch_bytes: u64 = requests.iter().map(|r| r.bytes).sum();

    // A new result per image, named for the new DB build; the old one stays.
    let second_label = spcs_image_scanner::output::db_build_label(Some(&second_build));
    let names = result_names(&scanner);
    assert_eq!(names.len(), N);
    for image in &images {
        let files = &names[&hex(&image.digest)];
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(
            files
                .iter()
                .any(|f| f.ends_with(&format!("_{second_label}.json"))),
            "{files:?}"
        );
        let record = scanner.image(&image.digest).unwrap();
        assert_eq!(
            record.last_scan.unwrap().db_build.as_deref(),
            Some(second_build.as_str())
        );
    }

    // The "new CVE in an old image" event: one change record per image.
    let changes = change_records(&scanner);
    assert_eq!(changes.len(), N, "{changes:#?}");
    let digests: BTreeSet<&str> = changes
        .iter()
        .map(|c| c["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, images.iter().map(|i| i.digest.as_str()).collect());
    for change in &changes {
        assert_eq!(ids(&change["added"]), vec!["CVE-2099-0001"]);
        assert_eq!(ids(&change["removed"]), vec!["CVE-2018-25032"]);
        let changed = change["changed"].as_array().unwrap();
        assert_eq!(changed.len(), 1, "{change}");
        assert_eq!(changed[0]["before"]["vulnerability"], "CVE-2022-37434");
        assert_eq!(
            (
                changed[0]["before"]["severity"].as_str(),
                changed[0]["after"]["severity"].as_str()
            ),
            (Some("Critical"), Some("High"))
        );
        assert_eq!(
            (
                changed[0]["before"]["fix_state"].as_str(),
                changed[0]["after"]["fix_state"].as_str()
            ),
            (Some("fixed"), Some("unknown"))
        );
        assert_eq!(change["previous_db_build"], first_build.as_str());
        assert_eq!(change["db_build"], second_build.as_str());
    }

    // The DB identity is kept in state.
    let status = db_status(&scanner);
    assert_eq!(status["identity"]["built"], second_build.as_str());
    assert!(status["updated_at"].is_string());

    eprintln!(
        "measured: full scan of {N} images {:.2} s, {} registry requests, {} bytes; \
         re-match of the same {N} {:.2} s, {} requests (listing only), {} bytes; \
         ratio re-match/full: time {:.2}, requests {:.2}, bytes {:.4}",
        full_time.as_secs_f64(),
        full_requests.len(),
        full_bytes,
        rematch_time.as_secs_f64(),
        requests.len(),
        rematch_bytes,
        rematch_time.as_secs_f64() / full_time.as_secs_f64(),
        requests.len() as f64 / full_requests.len() as f64,
        rematch_bytes as f64 / full_bytes.max(1) as f64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_update_keeps_the_current_db_is_recorded_and_scans_go_on() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    let (registry, _pusher, _images) = registry_with_images(1).await;
    let server = DbServer::start(DbBuild::from_fixture(&built(2))).await;
    server.set_mode(Serve::Down);
    let mut scanner = Scanner::new(&registry.url());
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"0 0 0 1 1 *\"",
        server.url()
    );
    let seeded = db_status(&scanner)["identity"]["built"]
        .as_str()
        .unwrap()
        .to_string();

    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(
        run.summary()["scanned"],
        1,
        "scans go on with the current DB"
    );
    let failed = run.events("vulnerability DB update failed; keeping the current DB");
    assert_eq!(failed.len(), 1, "{}", run.stdout);
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("grype db check exited with code 1"),
        "{}",
        failed[0]
    );
    let status = db_status(&scanner);
    assert_eq!(status["identity"]["built"], seeded.as_str());
    assert!(
        status["last_error"].as_str().unwrap().contains("check"),
        "{status}"
    );

    // A newer DB whose archive is corrupt, then truncated: refused, the old DB stays.
    server.publish(DbBuild::from_fixture(&built(1)));
    for mode in [Serve::CorruptArchive, Serve::TruncatedArchive] {
        server.set_mode(mode);
        let (code, stdout, stderr) = run_cli(&scanner, &["db", "update"]);
        assert_eq!(code, Some(1), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("update failed, the current DB is kept"),
            "{stderr}"
        );
        let status = db_status(&scanner);
        assert_eq!(status["identity"]["built"], seeded.as_str());
        assert_eq!(status["identity"]["valid"], true);
        assert!(
            status["last_error"].as_str().unwrap().contains("update"),
            "{status}"
        );
    }
    // Served properly, it installs; the failure is cleared.
    server.set_mode(Serve::Normal);
    let (code, stdout, stderr) = run_cli(&scanner, &["db", "update"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("vulnerability DB updated"), "{stdout}");
    let status = db_status(&scanner);
    assert_eq!(status["identity"]["built"], server.build().built.as_str());
    assert!(status["last_error"].is_null(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_db_holds_scans_or_flags_results_and_no_db_says_how_to_get_one() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    let (registry, _pusher, images) = registry_with_images(1).await;
    let digest = &images[0].digest;
    let mut scanner = Scanner::new(&registry.url());
    DbBuild::from_fixture(&built(24 * 10)).write_db_dir(&scanner.db_dir(), "old-snapshot");

    // on_stale = "hold" (the default): nothing scanned, the digest waits.
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let summary = run.summary();
    assert_eq!(
        (summary["held"].as_u64(), summary["scanned"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );
    assert!(
        run.stdout.contains("older than vulndb.max_age") && run.stdout.contains("held"),
        "{}",
        run.stdout
    );
    assert!(scanner.result_files().is_empty());
    assert_eq!(scanner.image(digest).unwrap().status, ImageStatus::Pending);
    let (code, stdout, _) = run_cli(&scanner, &["db", "status"]);
    assert_eq!(
        code,
        Some(1),
        "db status exits 1 when scans cannot use the DB\n{stdout}"
    );
    assert!(stdout.contains("held"), "{stdout}");

    // on_stale = "scan-and-flag": scanned, and the result says so.
    scanner.vulndb = "update_cron = \"\"\non_stale = \"scan-and-flag\"".into();
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary()["scanned"], 1);
    let scan = scanner.image(digest).unwrap().last_scan.unwrap();
    assert_eq!(scan.flags, vec!["stale_db"]);
    assert_eq!(scanner.result_files()[&hex(digest)].len(), 1);

    // No DB at all: no scan, and a message that says how to get one.
    let empty = Scanner::new(&registry.url());
    empty.remove_db();
    let run = empty.once();
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout.contains("no usable vulnerability DB")
            && run.stdout.contains("spcs-image-scanner db update")
            && run.stdout.contains("db import"),
        "{}",
        run.stdout
    );
    assert!(empty.result_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_while_scans_run_never_break_a_scan() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    const N: usize = 4;
    let (registry, _pusher, images) = registry_with_images(N).await;
    let server = DbServer::start(DbBuild::from_fixture(&built(30))).await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.remove_db();
    scanner.cron = "0 0 0 1 1 *".into();
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"* * * * * *\"",
        server.url()
    );
    // Slow matching, so that updates arrive while re-matches run.
    scanner.grype = Some(wrapper_script(
        scanner.dir.path(),
        "grype-slow",
        "sleep 1.5",
        &support::daemon::grype(),
    ));
    let mut daemon = scanner.spawn_run();
    daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |e| {
            e["scanned"] == N
        })
        .await;
    // Installing is not atomic (delete, then rename): widen that window on purpose.
    std::fs::write(scanner.db_dir().join("standin-install-pause-ms"), "400").unwrap();

    let builds: Vec<String> = (0..3).map(|i| built(20 - i)).collect();
    for (k, build) in builds.iter().enumerate() {
        server.publish(DbBuild::from_fixture(build));
        daemon
            .wait_for(
                "vulnerability DB updated",
                k + 1,
                Duration::from_secs(60),
                |_| true,
            )
            .await;
        if k == 1 {
            // The second update landed while the first round of re-matches was unfinished.
            let finished_for_previous = daemon
                .events("re-match finished")
                .iter()
                .filter(|e| e["db_build"] == builds[0].as_str())
                .count();
            assert!(
                finished_for_previous < N,
                "no overlap: the test would prove nothing"
            );
        }
    }
    let last = builds.last().unwrap().clone();
    // Every image ends up matched against the last DB.
    daemon
        .wait_for("re-match finished", N, Duration::from_secs(120), |e| {
            e["db_build"] == last.as_str()
        })
        .await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)).await, Some(0));
    let output = daemon.output();
    for bad in [
        "scan failed",
        "re-match failed",
        "job could not be recorded",
        "database does not exist",
    ] {
        assert!(!output.contains(bad), "{bad}:\n{output}");
    }
    for (hex, files) in scanner.result_files() {
        for file in files {
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&file).unwrap()).expect("complete JSON");
            let built = doc["descriptor"]["db"]["status"]["built"]
                .as_str()
                .unwrap()
                .to_string();
            let label = spcs_image_scanner::output::db_build_label(Some(&built));
            assert!(
                file.to_string_lossy().ends_with(&format!("_{label}.json")),
                "{hex}: {file:?} vs {built}"
            );
        }
    }
    for image in &images {
        assert_eq!(
            scanner
                .image(&image.digest)
                .unwrap()
                .last_scan
                .unwrap()
                .db_build
                .as_deref(),
            Some(last.as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_rematching_finishes_the_rest_after_restart_without_duplicates() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    const N: usize = 4;
    let (registry, _pusher, images) = registry_with_images(N).await;
    let server = DbServer::start(DbBuild::from_fixture(&built(30))).await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.remove_db();
    scanner.concurrency = 1;
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"0 0 0 1 1 *\"",
        server.url()
    );
    assert_eq!(scanner.once().code, Some(0));

    server.publish(DbBuild::from_fixture(&built(2)).with_advisory(new_advisory()));
    // The third re-match hangs; the daemon is killed while it runs.
    let counter = scanner.dir.path().join("grype-count");
    let marker = scanner.dir.path().join("grype-hangs");
    let pidfile = scanner.dir.path().join("grype.pid");
    scanner.grype = Some(wrapper_script(
        scanner.dir.path(),
        "grype-third-hangs",
        &format!(
            "n=$(cat {c:?} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c:?}; \
             if [ $n -eq 3 ]; then echo $$ > {p:?}; touch {m:?}; sleep 300; fi",
            c = counter.display().to_string(),
            p = pidfile.display().to_string(),
            m = marker.display().to_string()
        ),
        &support::daemon::grype(),
    ));
    let mut daemon = scanner.spawn_run();
    wait_for_file(&marker, Duration::from_secs(120)).await;
    daemon.crash(&pidfile).await;
    assert_eq!(daemon.events("re-match finished").len(), 2);

    scanner.grype = Some(support::daemon::grype());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(
        run.summary()["rematched"],
        2,
        "only the remaining re-matches run"
    );
    let new_label = spcs_image_scanner::output::db_build_label(Some(&server.build().built));
    for (hex, files) in result_names(&scanner) {
        assert_eq!(files.len(), 2, "{hex}: {files:?}");
        let labels: BTreeSet<&str> = files
            .iter()
            .map(|f| f.rsplit_once('_').unwrap().1)
            .collect();
        assert_eq!(labels.len(), 2, "one result per DB build: {files:?}");
        assert!(
            files
                .iter()
                .any(|f| f.ends_with(&format!("_{new_label}.json")))
        );
    }
    let changes = change_records(&scanner);
    let digests: Vec<&str> = changes
        .iter()
        .map(|c| c["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        digests.len(),
        N,
        "every change recorded once, none lost: {digests:?}"
    );
    assert_eq!(digests.iter().collect::<BTreeSet<_>>().len(), N);
    assert_eq!(images.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_image_is_scanned_before_200_pending_rematches() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    const QUEUED: usize = 200;
    let (registry, pusher, images) = registry_with_images(QUEUED).await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.concurrency = 1;
    scanner.cron = "0 0 0 1 1 *".into();

    // The store as if the 200 were scanned against an older DB (a real SBOM of one of
    // them stands in for each cached SBOM): re-matches, no registry pulls.
    let sbom_dir = tempfile::tempdir().unwrap();
    let sbom = sbom_dir.path().join("sbom.json");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/syft/syft-1.18.1-registry-single-arch.json"),
        &sbom,
    )
    .unwrap();
    {
        let store = Store::open(&scanner.state_dir()).unwrap();
        let now = Utc::now();
        let mut batch = Batch::default();
        std::fs::create_dir_all(scanner.state_dir().join("sboms")).unwrap();
        for (i, image) in images.iter().enumerate() {
            let digest = Digest::parse(&image.digest).unwrap();
            let mut record = ImageRecord::new(digest.clone(), image.media_type.clone(), now);
            record.status = ImageStatus::Scanned;
            record.tags.insert(format!("app/svc:v{i}"));
            record.repositories.insert("app/svc".into());
            record.last_scan = Some(ScanRecord {
                finished_at: now,
                mode: ScanMode::Full,
                syft_version: "1.18.1".into(),
                grype_version: Some("0.0.0-test-standin".into()),
                db_build: Some("2000-01-01T00:00:00Z".into()),
                db_schema: None,
                result_file: None,
                sbom_file: format!("sboms/{}.syft.json", digest.hex()),
                packages: 1,
                matches: 0,
                severities: Default::default(),
                flags: Vec::new(),
            });
            batch.put_image(&record);
            batch.put_tag(&TagRecord {
                repository: "app/svc".into(),
                tag: format!("v{i}"),
                digest: digest.clone(),
                image_digest: digest.clone(),
                platform: None,
                first_seen: now,
                last_seen: now,
                changed_at: now,
                previous: Vec::new(),
            });
            std::fs::copy(
                &sbom,
                scanner
                    .state_dir()
                    .join("sboms")
                    .join(format!("{}.syft.json", digest.hex())),
            )
            .unwrap();
        }
        store.commit(batch).await.unwrap();
    }
    let new = pusher
        .push_image(
            "app/new",
            "1",
            &DebianImage::default().with_file("etc/new", b"1"),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();

    let mut daemon = scanner.spawn_run();
    let cycle = daemon
        .wait_for("cycle finished", 1, Duration::from_secs(120), |_| true)
        .await;
    assert_eq!(cycle[0]["rematch_queued"], QUEUED, "{}", cycle[0]);
    assert_eq!(cycle[0]["scanned"], 1, "{}", cycle[0]);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(60)).await, Some(0));

    // In log order: the new image's scan started before any re-match did.
    let output = daemon.output();
    let lines: Vec<serde_json::Value> = output
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let scan_at = lines
        .iter()
        .position(|e| e["message"] == "scan started" && e["digest"] == new.digest.as_str())
        .expect("the new image was scanned");
    let first_rematch = lines
        .iter()
        .position(|e| e["message"] == "re-match started");
    assert!(
        first_rematch.is_none_or(|r| r > scan_at),
        "a re-match started before the new image"
    );
    assert_eq!(
        scanner.image(&new.digest).unwrap().status,
        ImageStatus::Scanned
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_sbom_is_flagged_and_scanned_again_sooner() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    // A Debian root filesystem whose dpkg database lists nothing.
    let empty = pusher
        .push_image(
            "app/empty",
            "1",
            &DebianImage::default().with_packages(&[]),
            ManifestFormat::Oci,
        )
        .await
        .unwrap();
    let mut scanner = Scanner::new(&registry.url());
    scanner.rescan = "empty_sbom_retry = \"1s\"".into();
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let record = scanner.image(&empty.digest).unwrap();
    let scan = record.last_scan.clone().unwrap();
    assert_eq!(scan.packages, 0);
    assert_eq!(scan.flags, vec!["empty_sbom"]);
    let retry = record.next_retry.expect("an empty SBOM is looked at again");
    assert!(run.stdout.contains("flagged empty_sbom"), "{}", run.stdout);

    // Due again after its (short) back-off: a full scan, not a re-match.
    while Utc::now() <= retry + chrono::Duration::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = scanner.once();
    assert_eq!(run.summary()["queued"], 1, "{}", run.stdout);
    assert_eq!(run.events("scan started").len(), 1);
    let record = scanner.image(&empty.digest).unwrap();
    assert_eq!(record.attempts, 2);
    assert!(
        record.next_retry.unwrap() - record.last_scan.unwrap().finished_at
            >= chrono::Duration::seconds(2),
        "doubled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_killed_by_a_signal_or_leaving_an_empty_report_is_a_failure_never_a_clean_result()
{
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let image = pusher
        .push_image("app/svc", "1", &DebianImage::default(), ManifestFormat::Oci)
        .await
        .unwrap();
    for (name, behaviour, expected) in [
        // grype interrupted: exits 0 and leaves an empty report (grype-syft.md §4).
        (
            "grype-sigint",
            "out=${3#json=}; : > \"$out\"; exit 0",
            "grype document is empty",
        ),
        ("grype-killed", "kill -KILL $$", "killed by signal 9"),
    ] {
        let mut scanner = Scanner::new(&registry.url());
        scanner.grype = Some(wrapper_script(
            scanner.dir.path(),
            name,
            behaviour,
            &support::daemon::grype(),
        ));
        let run = scanner.once();
        assert_eq!(run.code, Some(1), "{name}: {}", run.stdout);
        let record = scanner.image(&image.digest).unwrap();
        assert_eq!(record.status, ImageStatus::Failed, "{name}");
        assert!(
            record.last_scan.is_none(),
            "{name}: no clean result recorded"
        );
        assert!(
            record.last_error.as_deref().unwrap().contains(expected),
            "{name}: {:?}",
            record.last_error
        );
        assert!(scanner.result_files().is_empty(), "{name}: no result file");
        let failures = scanner.failure_records();
        assert_eq!(
            failures.len(),
            1,
            "{name}: one record per failure: {failures:?}"
        );
        assert_failure_record(&failures[0].1, &record, "scan", "app/svc:1");
    }

    // A failure record that cannot be written (`failures` is taken by a file): one
    // warning naming the digest; the failure is still recorded in state.
    let mut scanner = Scanner::new(&registry.url());
    scanner.grype = Some(wrapper_script(
        scanner.dir.path(),
        "grype-killed",
        "kill -KILL $$",
        &support::daemon::grype(),
    ));
    std::fs::create_dir_all(scanner.output_dir()).unwrap();
    std::fs::write(scanner.output_dir().join("failures"), b"not a directory").unwrap();
    let run = scanner.once();
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    let warnings = run.events("failure record not written; the failure is in state");
    assert_eq!(warnings.len(), 1, "{}", run.stdout);
    assert_eq!(warnings[0]["digest"], image.digest.as_str());
    let record = scanner.image(&image.digest).unwrap();
    assert_eq!(record.status, ImageStatus::Failed);
    assert!(record.last_error.unwrap().contains("killed by signal 9"));
    assert!(!run.stdout.contains("panicked") && !run.stderr.contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rematch_keeps_the_previous_result_and_writes_one_failure_record_per_attempt() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    let (registry, _pusher, images) = registry_with_images(1).await;
    let digest = &images[0].digest;
    let server = DbServer::start(DbBuild::from_fixture(&built(30))).await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.remove_db();
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"0 0 0 1 1 *\"",
        server.url()
    );
    assert_eq!(scanner.once().code, Some(0));
    assert!(scanner.failure_records().is_empty());
    let first = scanner.image(digest).unwrap().last_scan.unwrap();

    // A new DB, and a grype that fails on every match (its DB commands still work).
    let build = built(2);
    server.publish(DbBuild::from_fixture(&build));
    scanner.grype = Some(wrapper_script(
        scanner.dir.path(),
        "grype-broken",
        "echo 'failed to match: boom' >&2; exit 1",
        &support::daemon::grype(),
    ));
    for attempt in 1..=2 {
        if let Some(due) = scanner.image(digest).unwrap().next_retry {
            while Utc::now() <= due + chrono::Duration::milliseconds(50) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let run = scanner.once();
        assert_eq!(run.summary()["rematch_queued"], 1, "{}", run.stdout);
        assert_eq!(
            run.events("re-match failed; the previous result stands")
                .len(),
            1,
            "{}",
            run.stdout
        );
        let record = scanner.image(digest).unwrap();
        assert_eq!(
            record.status,
            ImageStatus::Scanned,
            "the previous result stands"
        );
        assert_eq!(record.last_scan.as_ref(), Some(&first));
        let failures = scanner.failure_records();
        assert_eq!(
            failures.len(),
            attempt,
            "one per failed attempt: {failures:?}"
        );
        let latest = &failures.last().unwrap().1;
        assert_failure_record(latest, &record, "rematch", "app/svc:v0");
        // The scan was attempt 1: re-matches count on the same record.
        assert_eq!(latest["attempt"], 1 + attempt as u64);
        assert!(
            latest["error"]
                .as_str()
                .unwrap()
                .contains("grype exited with code 1: failed to match: boom"),
            "{latest}"
        );
    }

    // Fixed: the re-match goes through and writes no failure record.
    let due = scanner.image(digest).unwrap().next_retry.unwrap();
    while Utc::now() <= due + chrono::Duration::milliseconds(50) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scanner.grype = Some(support::daemon::grype());
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary()["rematched"], 1, "{}", run.stdout);
    assert_eq!(scanner.failure_records().len(), 2);
    assert_eq!(result_names(&scanner)[&hex(digest)].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_without_a_cached_sbom_gets_a_full_scan_after_a_db_change() {
    if !using_standin() {
        eprintln!("skipped: this test drives the stand-in's DB, and GRYPE names a real grype");
        return;
    }
    let (registry, _pusher, images) = registry_with_images(1).await;
    let server = DbServer::start(DbBuild::from_fixture(&built(30))).await;
    let mut scanner = Scanner::new(&registry.url());
    scanner.remove_db();
    scanner.vulndb = format!(
        "update_url = {:?}\nupdate_cron = \"0 0 0 1 1 *\"",
        server.url()
    );
    assert_eq!(scanner.once().code, Some(0));
    let digest = &images[0].digest;
    std::fs::remove_file(
        scanner
            .state_dir()
            .join("sboms")
            .join(format!("{}.syft.json", hex(digest))),
    )
    .unwrap();

    server.publish(DbBuild::from_fixture(&built(2)));
    let mark = registry.wait_for_log_quiet().await;
    let run = scanner.once();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.events("scan started").len(), 1, "{}", run.stdout);
    assert!(
        run.stdout
            .contains("no cached SBOM: a full scan instead of a re-match")
    );
    // syft pulled the image again: blobs were fetched.
    let requests = registry.requests_since_settled(mark).await;
    assert!(
        requests.iter().any(|r| r.path.contains("/blobs/")),
        "{requests:#?}"
    );
    assert!(
        scanner
            .state_dir()
            .join("sboms")
            .join(format!("{}.syft.json", hex(digest)))
            .exists()
    );
    assert_eq!(result_names(&scanner)[&hex(digest)].len(), 2);
}
