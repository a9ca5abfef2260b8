//! Self-tests of the grype stand-in's DB commands (`db status|check|update|import`, scans
//! against `$GRYPE_DB_CACHE_DIR`) and of the loopback update server in
//! `support::db_server`. The stand-in is run as a child with a cleared environment plus
//! the variables the daemon passes. Only loopback is contacted.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::daemon::grype_standin;
use support::db_server::{DB_FILE, DbBuild, DbServer, IMPORT_FILE, Serve, sha256_digest};

const SBOM: &str = "tests/fixtures/syft/syft-1.18.1-registry-single-arch.json";
const ADDED_ID: &str = "TEST-STANDIN-0001";

/// The outcome of one stand-in run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "unexpected exit code: {self:?}");
        self
    }
}

/// A cache dir and the environment the daemon gives the stand-in.
struct Grype {
    cache: tempfile::TempDir,
    update_url: Option<String>,
    extra: Vec<(String, String)>,
}

impl Grype {
    fn new(update_url: Option<String>) -> Grype {
        Grype {
            cache: tempfile::tempdir().expect("cache dir"),
            update_url,
            extra: Vec::new(),
        }
    }

    fn cache(&self) -> &Path {
        self.cache.path()
    }

    fn db_dir(&self) -> PathBuf {
        self.cache().join("6")
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = base_command(args);
        cmd.env("GRYPE_DB_CACHE_DIR", self.cache());
        if let Some(url) = &self.update_url {
            cmd.env("GRYPE_DB_UPDATE_URL", url);
        }
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        finish(self.command(args, env)).await
    }

    async fn status(&self) -> Run {
        self.run(&["db", "status", "-o", "json"], &[]).await
    }

    async fn check(&self) -> Run {
        self.run(&["db", "check", "-o", "json"], &[]).await
    }

    async fn update(&self) -> Run {
        self.run(&["db", "update"], &[]).await
    }

    async fn import(&self, file: &Path) -> Run {
        self.run(&["db", "import", file.to_str().expect("utf-8 path")], &[])
            .await
    }

    /// Scans the sample SBOM; returns the run and the report (Null when none was written).
    async fn scan(&self, env: &[(&str, &str)]) -> (Run, Value) {
        let out_dir = tempfile::tempdir().expect("out dir");
        let out = out_dir.path().join("grype.json");
        let target = format!("sbom:{}", manifest_path(SBOM).display());
        let run = self
            .run(&[&target, "-o", &format!("json={}", out.display())], env)
            .await;
        let report = match std::fs::read_to_string(&out) {
            Ok(text) => serde_json::from_str(&text).expect("report is JSON"),
            Err(_) => Value::Null,
        };
        (run, report)
    }

    /// Every file under `<cache>/6` with its bytes.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(self.db_dir()).expect("read <cache>/6") {
            let entry = entry.expect("dir entry");
            files.insert(
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("read file"),
            );
        }
        files
    }

    /// Names in the cache dir other than `6` (left-over temp dirs, hook files).
    fn strays(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.cache())
            .expect("read cache dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n != "6")
            .collect();
        names.sort();
        names
    }
}

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The stand-in with only PATH, HOME, TMPDIR and the daemon's fixed GRYPE_* variables.
fn base_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(grype_standin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("TMPDIR", std::env::temp_dir())
        .env("GRYPE_DB_AUTO_UPDATE", "false")
        .env("GRYPE_CHECK_FOR_APP_UPDATE", "false")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(mut cmd: tokio::process::Command) -> Run {
    let child = cmd.spawn().expect("spawn the grype stand-in");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("stand-in finished within 60 s")
        .expect("stand-in output");
    Run {
        code: output.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// RFC 3339 (UTC, whole seconds) this long ago.
fn ago(d: chrono::Duration) -> String {
    (chrono::Utc::now() - d)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A fixture-style record that matches the sample SBOM's zlib1g on Debian 11.
fn added_advisory() -> Value {
    json!({
        "id": ADDED_ID,
        "package": {"name": "zlib1g", "type": "deb"},
        "distro": {"id": "debian", "versionID": "11"},
        "namespace": "debian:distro:debian:11",
        "dataSource": "https://example.invalid/test-standin-advisory",
        "urls": [],
        "severity": "Medium",
        "description": "Test record added by tests/standin_db.rs; not a real advisory.",
        "affected_versions": ["1:1.2.11.dfsg-2"],
        "fix": {"versions": [], "state": "not-fixed"},
        "cvss": [],
        "epss": [],
        "risk": 0.0
    })
}

fn match_ids(report: &Value) -> Vec<String> {
    report["matches"]
        .as_array()
        .expect("matches array")
        .iter()
        .map(|m| m["vulnerability"]["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test]
async fn empty_cache_dir_has_no_db() {
    let grype = Grype::new(None);
    let status = grype.status().await;
    status.assert_code(1);
    let expected_path = grype.db_dir().join(DB_FILE);
    assert_eq!(
        status.json(),
        json!({"schemaVersion": "", "path": expected_path.to_str().unwrap(),
               "valid": false, "error": "database does not exist"})
    );
    let (scan, report) = grype.scan(&[]).await;
    scan.assert_code(1);
    assert!(
        scan.stderr
            .contains("[0000] ERROR failed to load vulnerability db: database does not exist"),
        "{scan:?}"
    );
    assert_eq!(report, Value::Null, "no report on failure");
}

#[tokio::test]
async fn check_update_and_rematch_against_the_server() {
    let first = DbBuild::from_fixture(&ago(chrono::Duration::hours(30)));
    let server = DbServer::start(first.clone()).await;
    let grype = Grype::new(Some(server.url()));

    // no DB yet: an update is available
    let check = grype.check().await;
    check.assert_code(100);
    assert_eq!(
        check.json(),
        json!({
            "currentDB": null,
            "candidateDB": {"schemaVersion": "v6.1.3", "built": first.built,
                            "path": first.archive_name(), "checksum": sha256_digest(&first.archive())},
            "updateAvailable": true
        })
    );

    let update = grype.update().await;
    update.assert_code(0);
    assert!(
        update
            .stderr
            .contains("Vulnerability database updated to latest version!")
    );
    let status = grype.status().await;
    status.assert_code(0);
    let status = status.json();
    assert_eq!(status["valid"], true);
    assert_eq!(status["built"], first.built.as_str());
    assert_eq!(status["schemaVersion"], "v6.1.3");
    assert_eq!(
        status["path"],
        grype.db_dir().join(DB_FILE).to_str().unwrap()
    );
    let from = status["from"].as_str().expect("from");
    assert!(from.starts_with(&server.archive_url()), "{from}");
    // installed files: the build's bytes and a matching import.json
    let files = grype.snapshot();
    assert_eq!(files[DB_FILE], first.db_bytes());
    let import: Value = serde_json::from_slice(&files[IMPORT_FILE]).expect("import.json");
    assert_eq!(import["digest"], sha256_digest(&first.db_bytes()).as_str());
    assert_eq!(import["source"], from);
    assert_eq!(grype.strays(), Vec::<String>::new(), "no temp dirs left");

    // up to date now
    let check = grype.check().await;
    check.assert_code(0);
    assert_eq!(
        check.json(),
        json!({"currentDB": {"schemaVersion": "v6.1.3", "built": first.built},
               "candidateDB": null, "updateAvailable": false})
    );
    let update = grype.update().await;
    update.assert_code(0);
    assert!(
        update
            .stderr
            .contains("No vulnerability database update available")
    );
    assert_eq!(server.archive_requests(), 1, "{:?}", server.requests());

    let (scan, report) = grype.scan(&[]).await;
    scan.assert_code(0);
    assert_eq!(match_ids(&report), ["CVE-2022-37434", "CVE-2018-25032"]);
    assert_eq!(report["descriptor"]["db"]["status"], status);

    // a newer build with one more advisory
    let second =
        DbBuild::from_fixture(&ago(chrono::Duration::hours(2))).with_advisory(added_advisory());
    server.publish(second.clone());
    let check = grype.check().await;
    check.assert_code(100);
    assert_eq!(check.json()["candidateDB"]["built"], second.built.as_str());
    grype.update().await.assert_code(0);
    let status = grype.status().await;
    status.assert_code(0);
    assert_eq!(status.json()["built"], second.built.as_str());
    let (scan, report) = grype.scan(&[]).await;
    scan.assert_code(0);
    assert_eq!(
        match_ids(&report),
        ["CVE-2022-37434", "CVE-2018-25032", ADDED_ID]
    );
    let db = &report["descriptor"]["db"]["status"];
    assert_eq!(db["built"], second.built.as_str());
    assert!(
        db["from"]
            .as_str()
            .unwrap()
            .contains(&second.archive_name())
    );
    assert_eq!(server.archive_requests(), 2);
    assert!(server.requests().iter().all(|(_, _, code)| *code == 200));
    assert_eq!(grype.strays(), Vec::<String>::new());

    // a listing URL ending in .json is used as is
    let direct = Grype {
        update_url: Some(server.listing_url()),
        ..Grype::new(None)
    };
    direct.check().await.assert_code(100);
}

#[tokio::test]
async fn unreachable_server_fails_cleanly_and_keeps_the_db() {
    let build = DbBuild::from_fixture(&ago(chrono::Duration::hours(30)));
    let server = DbServer::start(build.clone()).await;
    let grype = Grype::new(Some(server.url()));
    grype.update().await.assert_code(0);
    let before = grype.snapshot();
    server.publish(DbBuild::from_fixture(&ago(chrono::Duration::hours(1))));

    server.set_mode(Serve::Down);
    let check = grype.check().await;
    check.assert_code(1);
    assert!(check.stderr.contains("503"), "{check:?}");
    assert_eq!(check.stdout, "");
    let update = grype.update().await;
    update.assert_code(1);
    assert!(
        update
            .stderr
            .contains("unable to check for vulnerability database update"),
        "{update:?}"
    );
    assert_eq!(grype.snapshot(), before);
    let status = grype.status().await;
    status.assert_code(0);
    assert_eq!(status.json()["built"], build.built.as_str());

    // nothing listening at all
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let offline = Grype {
        update_url: Some(format!("http://127.0.0.1:{closed}/databases")),
        ..Grype::new(None)
    };
    let check = offline.check().await;
    check.assert_code(1);
    assert!(check.stderr.contains("unable to reach"), "{check:?}");
    offline.update().await.assert_code(1);
}

#[tokio::test]
async fn corrupt_truncated_and_slow_archives_leave_the_db_alone() {
    let first = DbBuild::from_fixture(&ago(chrono::Duration::hours(30)));
    let server = DbServer::start(first.clone()).await;
    let grype = Grype::new(Some(server.url()));
    grype.update().await.assert_code(0);
    let before = grype.snapshot();
    let second =
        DbBuild::from_fixture(&ago(chrono::Duration::hours(1))).with_advisory(added_advisory());
    server.publish(second.clone());

    server.set_mode(Serve::CorruptArchive);
    let update = grype.update().await;
    update.assert_code(1);
    assert!(update.stderr.contains("checksum mismatch"), "{update:?}");
    assert_eq!(grype.snapshot(), before);
    assert_eq!(grype.strays(), Vec::<String>::new());

    server.set_mode(Serve::TruncatedArchive);
    let update = grype.update().await;
    update.assert_code(1);
    assert!(update.stderr.contains("unable to unarchive"), "{update:?}");
    assert_eq!(grype.snapshot(), before);
    assert_eq!(grype.strays(), Vec::<String>::new());

    server.set_mode(Serve::SlowArchive(Duration::from_secs(20)));
    let started = Instant::now();
    let update = grype
        .run(
            &["db", "update"],
            &[("GRYPE_DB_UPDATE_DOWNLOAD_TIMEOUT", "1s")],
        )
        .await;
    update.assert_code(1);
    assert!(update.stderr.contains("timed out"), "{update:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(grype.snapshot(), before);
    assert_eq!(grype.strays(), Vec::<String>::new());

    let status = grype.status().await;
    status.assert_code(0);
    assert_eq!(status.json()["built"], first.built.as_str());

    // a slow but complete download installs
    server.set_mode(Serve::SlowArchive(Duration::from_millis(500)));
    grype.update().await.assert_code(0);
    assert_eq!(grype.status().await.json()["built"], second.built.as_str());
}

#[tokio::test]
async fn import_of_archives_and_raw_db_files() {
    let grype = Grype::new(None);
    let files = tempfile::tempdir().expect("files");
    let first = DbBuild::from_fixture(&ago(chrono::Duration::hours(30)));
    let archive = files.path().join(first.archive_name());
    std::fs::write(&archive, first.archive()).expect("write archive");
    let import = grype.import(&archive).await;
    import.assert_code(0);
    let status = grype.status().await;
    status.assert_code(0);
    let status = status.json();
    assert_eq!(status["built"], first.built.as_str());
    assert_eq!(status["from"], archive.to_str().unwrap());
    assert_eq!(grype.snapshot()[DB_FILE], first.db_bytes());

    let second =
        DbBuild::from_fixture(&ago(chrono::Duration::hours(1))).without_advisory("CVE-2018-25032");
    let raw = files.path().join("vulnerability.db");
    std::fs::write(&raw, second.db_bytes()).expect("write raw db");
    grype.import(&raw).await.assert_code(0);
    assert_eq!(grype.status().await.json()["built"], second.built.as_str());
    let (scan, report) = grype.scan(&[]).await;
    scan.assert_code(0);
    assert_eq!(match_ids(&report), ["CVE-2022-37434"]);

    let before = grype.snapshot();
    let garbage = files.path().join("garbage.tar.gz");
    std::fs::write(&garbage, b"\x1f\x8bnot really gzip").expect("write garbage");
    grype.import(&garbage).await.assert_code(1);
    let not_db = files.path().join("not-a-db.json");
    std::fs::write(&not_db, b"{\"hello\": 1}").expect("write json");
    grype.import(&not_db).await.assert_code(1);
    grype
        .import(&files.path().join("missing.tar.gz"))
        .await
        .assert_code(1);
    assert_eq!(grype.snapshot(), before);
    assert_eq!(grype.strays(), Vec::<String>::new());
}

#[tokio::test]
async fn old_or_tampered_db_fails_scans() {
    let grype = Grype::new(None);
    let old = DbBuild::from_fixture(&ago(chrono::Duration::days(10)));
    old.write_db_dir(grype.cache(), "seeded-by-test");

    let (scan, report) = grype.scan(&[]).await;
    scan.assert_code(1);
    assert!(
        scan.stderr.contains(
            "[0000] ERROR failed to load vulnerability db: the vulnerability database was built \
             10 days ago (max allowed age is 5 days)"
        ),
        "{scan:?}"
    );
    assert_eq!(report, Value::Null);
    let status = grype.status().await;
    status.assert_code(1);
    assert_eq!(status.json()["valid"], false);
    assert_eq!(status.json()["built"], old.built.as_str());

    let (scan, report) = grype.scan(&[("GRYPE_DB_VALIDATE_AGE", "false")]).await;
    scan.assert_code(0);
    let db = &report["descriptor"]["db"]["status"];
    assert_eq!(db["valid"], true);
    assert_eq!(db["built"], old.built.as_str());
    assert_eq!(db["from"], "seeded-by-test");
    let (scan, _) = grype
        .scan(&[("GRYPE_DB_MAX_ALLOWED_BUILT_AGE", "300h")])
        .await;
    scan.assert_code(0);

    // a DB whose bytes no longer match import.json
    let fresh = DbBuild::from_fixture(&ago(chrono::Duration::hours(1)));
    fresh.write_db_dir(grype.cache(), "seeded-by-test");
    grype.status().await.assert_code(0);
    let mut bytes = fresh.db_bytes();
    bytes.extend_from_slice(b" ");
    std::fs::write(grype.db_dir().join(DB_FILE), bytes).expect("tamper");
    let status = grype.status().await;
    status.assert_code(1);
    assert_eq!(status.json()["error"], "checksum mismatch");
    let (scan, _) = grype.scan(&[]).await;
    scan.assert_code(1);
    assert!(scan.stderr.contains("checksum mismatch"), "{scan:?}");
}

#[tokio::test]
async fn without_cache_dir_the_fixture_is_used() {
    let out_dir = tempfile::tempdir().expect("out dir");
    let out = out_dir.path().join("grype.json");
    let target = format!("sbom:{}", manifest_path(SBOM).display());
    let run = finish(base_command(&[
        &target,
        "-o",
        &format!("json={}", out.display()),
    ]))
    .await;
    run.assert_code(0);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("report")).expect("JSON");
    assert_eq!(match_ids(&report), ["CVE-2022-37434", "CVE-2018-25032"]);
    let db = &report["descriptor"]["db"]["status"];
    assert_eq!(db["from"], "test-fixture");
    assert_eq!(db["built"], "2026-12-01T00:00:00Z");
    assert_eq!(
        db["path"],
        manifest_path("tests/fixtures/advisories.json")
            .to_str()
            .unwrap()
    );
    let status = finish(base_command(&["db", "status", "-o", "json"])).await;
    status.assert_code(0);
    assert_eq!(status.json(), *db);
    // the DB-changing commands need a cache dir
    finish(base_command(&["db", "update"])).await.assert_code(1);
}

#[tokio::test]
async fn install_pause_hook_opens_the_non_atomic_window() {
    let server = DbServer::start(DbBuild::from_fixture(&ago(chrono::Duration::hours(1)))).await;
    let grype = Grype::new(Some(server.url()));
    DbBuild::from_fixture(&ago(chrono::Duration::hours(30))).write_db_dir(grype.cache(), "seed");
    let hook = grype.cache().join("standin-install-pause-ms");
    std::fs::write(&hook, "2500").expect("write hook");

    let updater = grype
        .command(&["db", "update"], &[])
        .spawn()
        .expect("spawn update");
    // wait for the RemoveAll
    let deadline = Instant::now() + Duration::from_secs(20);
    while grype.db_dir().exists() {
        assert!(Instant::now() < deadline, "update never removed <cache>/6");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (scan, _) = grype.scan(&[]).await;
    scan.assert_code(1);
    assert!(scan.stderr.contains("database does not exist"), "{scan:?}");
    let output = tokio::time::timeout(Duration::from_secs(30), updater.wait_with_output())
        .await
        .expect("update finished")
        .expect("update output");
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        grype.status().await.json()["built"],
        server.build().built.as_str()
    );
    assert_eq!(grype.strays(), ["standin-install-pause-ms"]);
}
