//! The registry client against scripted loopback servers: retries, `Retry-After`,
//! pagination loops, foreign links, the bearer-token challenge (the SPCS flow), and
//! untrusted digests. Each test counts the requests the server received.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use spcs_image_scanner::config::{Config, Environment};
use spcs_image_scanner::registry::{RegistryClient, RegistryError};
use support::scripted_http::{Reply, ScriptedServer};

fn client(url: &str, extra: &str) -> RegistryClient {
    let text = format!(
        "[registry]\nurl = {url:?}\nrequest_timeout = \"5s\"\n{extra}\n[state]\ndir = \"/tmp/unused-s\"\n[output]\ndir = \"/tmp/unused-o\"\n"
    );
    let config =
        Config::from_toml(Path::new("test.toml"), &text, &Environment::default()).expect("config");
    RegistryClient::new(config.registry).expect("client")
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after_then_succeeds() {
    let server = ScriptedServer::start(|_, n| {
        if n == 0 {
            Reply::json(429, "{}").header("Retry-After", "1")
        } else {
            Reply::json(200, r#"{"repositories":["a/b"]}"#)
        }
    })
    .await;
    let started = Instant::now();
    let repos = client(&server.url(), "").list_repositories().await.unwrap();
    assert_eq!(repos, vec!["a/b"]);
    assert_eq!(server.received().len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After: 1 was not honoured"
    );
}

#[tokio::test]
async fn retry_after_beyond_the_cap_fails_at_once() {
    let server =
        ScriptedServer::start(|_, _| Reply::json(429, "{}").header("Retry-After", "3600")).await;
    let err = client(&server.url(), "")
        .list_repositories()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("429"), "{err}");
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let server = ScriptedServer::start(|_, _| Reply::json(503, "{}")).await;
    let c = client(&server.url(), "max_retries = 2");
    let err = c.list_repositories().await.unwrap_err();
    assert!(matches!(err, RegistryError::Status { .. }), "{err}");
    assert!(
        err.to_string().contains("/v2/_catalog") && err.to_string().contains("503"),
        "{err}"
    );
    assert_eq!(server.received().len(), 3, "one try plus two retries");
    assert_eq!(c.stats().total(), 3);
}

#[tokio::test]
async fn pagination_follows_link_and_stops_when_a_page_brings_nothing_new() {
    // Page 2 links back to itself forever; the client must stop.
    let server = ScriptedServer::start(|req, _| {
        if req.target.contains("last=b") {
            Reply::json(200, r#"{"repositories":["c"]}"#)
                .header("Link", "</v2/_catalog?last=b&n=2>; rel=\"next\"")
        } else {
            Reply::json(200, r#"{"repositories":["a","b"]}"#)
                .header("Link", "</v2/_catalog?last=b&n=2>; rel=\"next\"")
        }
    })
    .await;
    let repos = client(&server.url(), "").list_repositories().await.unwrap();
    assert_eq!(repos, vec!["a", "b", "c"]);
    assert_eq!(
        server.received().len(),
        3,
        "first page, second page, second page again (nothing new): stop"
    );
}

#[tokio::test]
async fn a_link_to_another_origin_is_refused() {
    let server = ScriptedServer::start(|_, _| {
        Reply::json(200, r#"{"repositories":["a"]}"#).header(
            "Link",
            "<http://198.51.100.7/v2/_catalog?last=a>; rel=\"next\"",
        )
    })
    .await;
    let err = client(&server.url(), "")
        .list_repositories()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another origin"), "{err}");
    assert_eq!(server.received().len(), 1);
}

#[tokio::test]
async fn invalid_repository_names_from_the_catalog_are_skipped() {
    let server = ScriptedServer::start(|_, _| {
        Reply::json(
            200,
            r#"{"repositories":["ok/repo","../../etc","a/%2e%2e/b","Ünïcode","x/../y"]}"#,
        )
    })
    .await;
    let repos = client(&server.url(), "").list_repositories().await.unwrap();
    assert_eq!(repos, vec!["ok/repo"]);
}

#[tokio::test]
async fn bearer_challenge_is_answered_with_a_token_fetched_with_the_spcs_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "session-token-1\n").unwrap();
    let server = ScriptedServer::start(|req, _| {
        let port = req.headers.get("host").cloned().unwrap_or_default();
        if req.target.starts_with("/token") {
            let expected = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("0auth2accesstoken:session-token-1")
            );
            if req.headers.get("authorization") == Some(&expected) {
                Reply::json(200, r#"{"token":"registry-token-xyz","expires_in":300}"#)
            } else {
                Reply::json(401, "{}")
            }
        } else if req.headers.get("authorization").map(String::as_str) == Some("Bearer registry-token-xyz") {
            Reply::json(200, r#"{"repositories":["db/schema/repo/app"]}"#)
        } else {
            Reply::json(401, "{}").header(
                "WWW-Authenticate",
                &format!("Bearer realm=\"http://{port}/token\",service=\"registry\",scope=\"registry:catalog:list\""),
            )
        }
    })
    .await;
    let extra = format!(
        "auth = \"spcs\"\ntoken_file = {:?}",
        token_file.display().to_string()
    );
    let c = client(&server.url(), &extra);
    assert_eq!(
        c.list_repositories().await.unwrap(),
        vec!["db/schema/repo/app"]
    );
    let received = server.received();
    let methods: Vec<&str> = received
        .iter()
        .map(|r| r.target.split('?').next().unwrap())
        .collect();
    assert_eq!(methods, vec!["/v2/_catalog", "/token", "/v2/_catalog"]);
    // The token is asked for the scope the challenge named, for the service it named.
    assert!(
        received[1]
            .target
            .contains("scope=registry%3Acatalog%3Alist"),
        "{}",
        received[1].target
    );
    assert!(
        received[1].target.contains("service=registry"),
        "{}",
        received[1].target
    );
    // The token is cached: a second listing needs one request.
    c.list_repositories().await.unwrap();
    assert_eq!(server.received().len(), 4);
}

#[tokio::test]
async fn a_digest_header_that_is_not_a_digest_is_refused() {
    let server = ScriptedServer::start(|_, _| {
        Reply::json(200, "{}").header("Docker-Content-Digest", "sha256:../../../etc/passwd")
    })
    .await;
    let err = client(&server.url(), "")
        .head_manifest("a/b", "1")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Invalid { .. }), "{err}");
    let accept = &server.received()[0].headers["accept"];
    for media_type in [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ] {
        assert!(accept.contains(media_type), "{accept}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn requests_in_flight_are_bounded_by_concurrency() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (f, m) = (in_flight.clone(), most.clone());
    let digest = format!("sha256:{}", "a".repeat(64));
    let server = ScriptedServer::start(move |_, _| {
        let now = f.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(now, Ordering::SeqCst);
        // Each answer takes a while (blocking this connection's worker on purpose).
        std::thread::sleep(Duration::from_millis(100));
        f.fetch_sub(1, Ordering::SeqCst);
        Reply::json(200, "{}").header("Docker-Content-Digest", &digest)
    })
    .await;
    let c = std::sync::Arc::new(client(&server.url(), "concurrency = 2"));
    let heads = (0..10).map(|i| {
        let c = c.clone();
        async move { c.head_manifest("a/b", &format!("t{i}")).await }
    });
    for result in futures::future::join_all(heads).await {
        result.unwrap();
    }
    assert_eq!(server.received().len(), 10);
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most registry.concurrency requests at once, and they do overlap"
    );
}
