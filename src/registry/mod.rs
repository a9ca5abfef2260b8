//! The registry client: list repositories and tags, resolve a tag to a digest, fetch a
//! manifest.
//!
//! Every request goes through `reqwest` and one request loop ([`RegistryClient::fetch`]):
//! `_catalog`, `tags/list`, the per-tag manifest HEAD and the manifest GET by digest.
//! `oci-client` is not used for requests: it drops the `Link` header, asks for the wrong
//! scope on the catalog, costs an extra `GET /v2/` per request on a registry without auth,
//! hides `Retry-After` (a throttled manifest GET would be retried after a short back-off
//! whatever the registry asked, and one over the cap would not fail fast), reads a
//! manifest body without a size limit, and reports its own read timeout as a transport
//! error. So a manifest body is checked against its digest here ([`digest_matches`]).
//!
//! Invariants:
//! - At most `registry.concurrency` requests are in flight ([`RegistryClient::permits`]).
//! - Every request has a timeout; retries are bounded by `registry.max_retries`; 429
//!   honours `Retry-After` up to [`MAX_RETRY_AFTER`] (beyond it the request fails at
//!   once), and 5xx and connection errors back off exponentially.
//! - Credentials are re-read from their file for every client built and after every
//!   401.
//! - A manifest is at most [`MAX_MANIFEST_BYTES`], read without buffering more, and used
//!   only if its bytes hash to the digest asked for (or, by tag, to the
//!   `Docker-Content-Digest` the registry sent).
//! - Pagination follows `Link` only to the same origin, stops when a page brings
//!   nothing new, and is capped ([`MAX_PAGES`]).
//! - Names from the registry are validated before use ([`is_valid_repository_name`],
//!   [`is_valid_tag`]).

pub mod auth;
pub mod manifest;
pub mod spcs_sql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, LINK, RETRY_AFTER, WWW_AUTHENTICATE};
use tokio::sync::{Mutex, Semaphore};
use tracing::{debug, warn};
use url::Url;

use crate::config::RegistryConfig;
use crate::digest::Digest;
use auth::{AuthError, Challenge, CredentialSource, Credentials, Secret, parse_challenge};

/// `User-Agent` of every request the daemon makes.
pub const USER_AGENT: &str = concat!("spcs-image-scanner/", env!("CARGO_PKG_VERSION"));

/// Entries asked for per catalog or tags page.
const PAGE_SIZE: usize = 1000;

/// Pages followed per listing before giving up: a pagination loop must end even when a
/// registry keeps answering with new `Link`s.
pub const MAX_PAGES: usize = 1000;

/// Largest listing page read (a 50,000-tag page is about 1 MiB).
const MAX_LIST_BODY: usize = 16 * 1024 * 1024;

/// Largest manifest accepted; the distribution spec lets registries refuse anything
/// above 4 MiB, so anything larger is hostile or broken.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Longest `Retry-After` waited for inside a cycle; beyond it the request fails and the
/// next cycle tries again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// First back-off after a 5xx or connection error; doubles per try.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A registry request failed; messages name the host, method and path.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an unexpected status.
    #[error("registry {host}: {method} {path}: {status}")]
    Status {
        host: String,
        method: &'static str,
        path: String,
        status: String,
    },
    /// 404, or `MANIFEST_UNKNOWN`/`NAME_UNKNOWN`.
    #[error("registry {host}: {method} {path}: not found")]
    NotFound {
        host: String,
        method: &'static str,
        path: String,
    },
    /// Still 401 after fresh credentials.
    #[error("registry {host}: {method} {path}: unauthorized (credentials refused)")]
    Unauthorized {
        host: String,
        method: &'static str,
        path: String,
    },
    /// Connection refused, reset, TLS failure ...
    #[error("registry {host}: {method} {path}: request failed")]
    Transport {
        host: String,
        method: &'static str,
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within `registry.request_timeout`.
    #[error("registry {host}: {method} {path}: no answer within {timeout:?}")]
    Timeout {
        host: String,
        method: &'static str,
        path: String,
        timeout: Duration,
    },
    /// The answer could not be used (bad JSON, bad digest, too large, foreign Link ...).
    #[error("registry {host}: {method} {path}: invalid response: {reason}")]
    Invalid {
        host: String,
        method: &'static str,
        path: String,
        reason: String,
    },
    /// Credentials could not be read.
    #[error("registry {host}: credentials")]
    Credentials {
        host: String,
        #[source]
        source: AuthError,
    },
}

impl RegistryError {
    /// True for errors that say "the registry is not reachable" rather than "this one
    /// thing is wrong": used to stop a cycle early instead of trying every tag.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RegistryError::Transport { .. } | RegistryError::Timeout { .. }
        )
    }

    /// True for 404-like answers.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }
}

/// A tag listing, possibly cut short.
#[derive(Debug, Clone, Default)]
pub struct TagListing {
    /// Tags as listed, validated, deduplicated.
    pub tags: Vec<String>,
    /// The registry had more than we read (pages or entries capped).
    pub truncated: bool,
}

/// Counters of requests made, for the cycle summary and metrics. Shared by every client
/// built over the daemon's life (a config reload builds a new one).
#[derive(Debug, Default)]
pub struct RequestStats {
    pub total: AtomicU64,
    pub errors: AtomicU64,
    pub throttled: AtomicU64,
    /// Requests by outcome: the HTTP status (`"200"`, `"404"` ...), `"timeout"` or
    /// `"transport"` (no answer).
    by_status: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl RequestStats {
    /// Total requests so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one answered (or unanswered) request.
    pub fn record(&self, status: &str) {
        let mut map = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(status.to_string()).or_default() += 1;
    }

    /// Requests by outcome so far.
    pub fn by_status(&self) -> BTreeMap<String, u64> {
        self.by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scheme {
    /// Not learned yet: the first request goes out anonymously and a 401 tells.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// How a request to the registry is done, for retries and auth.
struct ListAuth {
    scheme: Scheme,
    /// Bearer tokens by our scope key.
    tokens: HashMap<String, Secret>,
    /// The scope the registry's challenge asked for, by our scope key (the server knows
    /// best, e.g. for SPCS per-repository catalogs).
    challenged_scopes: HashMap<String, String>,
}

/// The daemon's registry client. Cheap to share (`Arc`).
pub struct RegistryClient {
    cfg: RegistryConfig,
    credentials: CredentialSource,
    http: reqwest::Client,
    list_auth: Mutex<ListAuth>,
    permits: Semaphore,
    stats: Arc<RequestStats>,
}

/// The HTTP client of the registry and SQL API requests: our User-Agent, `timeout` for
/// connecting and for each request, and no redirects (one could carry the
/// `Authorization` header elsewhere; neither API has a reason to redirect).
pub(crate) fn http_client(timeout: std::time::Duration) -> reqwest::Result<reqwest::Client> {
    // reqwest is built without a default TLS crypto provider (ring is much cheaper to
    // build than aws-lc); install it once. An error only means it is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

impl RegistryClient {
    /// Builds the client; sends nothing yet.
    pub fn new(cfg: RegistryConfig) -> Result<Self, RegistryError> {
        Self::with_stats(cfg, Arc::default())
    }

    /// Builds the client counting into `stats` (kept across config reloads).
    pub fn with_stats(
        cfg: RegistryConfig,
        stats: Arc<RequestStats>,
    ) -> Result<Self, RegistryError> {
        let http = http_client(cfg.request_timeout).map_err(|e| RegistryError::Transport {
            host: cfg.host.clone(),
            method: "SETUP",
            path: String::new(),
            source: Box::new(e),
        })?;
        Ok(RegistryClient {
            credentials: CredentialSource::new(cfg.auth.clone()),
            permits: Semaphore::new(cfg.concurrency),
            cfg,
            http,
            list_auth: Mutex::new(ListAuth {
                scheme: Scheme::Unknown,
                tokens: HashMap::new(),
                challenged_scopes: HashMap::new(),
            }),
            stats,
        })
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Request counters.
    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    /// Current credentials, read fresh from their file (for child processes).
    pub fn credentials(&self) -> Result<Option<Credentials>, RegistryError> {
        self.credentials
            .read()
            .map_err(|source| RegistryError::Credentials {
                host: self.cfg.host.clone(),
                source,
            })
    }

    /// The repositories to watch: the configured list, else the per-image-repository
    /// catalogs (SPCS), else `/v2/_catalog`; filtered by `include`/`exclude`, sorted.
    pub async fn list_repositories(&self) -> Result<Vec<String>, RegistryError> {
        let mut names: Vec<String> = if !self.cfg.repositories.is_empty() {
            self.cfg.repositories.clone()
        } else if !self.cfg.image_repositories.is_empty() {
            let mut all = Vec::new();
            for image_repo in &self.cfg.image_repositories {
                let path = format!("/v2/{image_repo}/_catalog");
                let scope = format!("repository:{image_repo}:pull");
                let (listed, truncated) = self
                    .list_pages(&path, &scope, "repositories", usize::MAX)
                    .await?;
                if truncated {
                    warn!(image_repository = %image_repo, "catalog cut short at {MAX_PAGES} pages");
                }
                // SPCS answers with names relative to the image repository, prefixed
                // with `baserepo/`.
                for name in listed {
                    let relative = name.strip_prefix("baserepo/").unwrap_or(&name);
                    all.push(format!("{image_repo}/{relative}"));
                }
            }
            all
        } else {
            let (listed, truncated) = self
                .list_pages(
                    "/v2/_catalog",
                    "registry:catalog:*",
                    "repositories",
                    usize::MAX,
                )
                .await?;
            if truncated {
                warn!("catalog cut short at {MAX_PAGES} pages");
            }
            listed
        };
        names.retain(|name| {
            let ok = is_valid_repository_name(name);
            if !ok {
                warn!(repository = %name.escape_debug(), "skipping invalid repository name from the registry");
            }
            ok && self.cfg.include.matches(name) && !self.cfg.exclude.matches(name)
        });
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// True when the config watches `repository`: a valid name, in
    /// `registry.repositories` or under an `image_repositories` entry when those are
    /// set, and passing `include`/`exclude`.
    pub fn watches(&self, repository: &str) -> bool {
        let cfg = &self.cfg;
        is_valid_repository_name(repository)
            && (cfg.repositories.is_empty() || cfg.repositories.iter().any(|r| r == repository))
            && (cfg.image_repositories.is_empty()
                || cfg.image_repositories.iter().any(|ir| {
                    repository
                        .strip_prefix(ir.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
                }))
            && cfg.include.matches(repository)
            && !cfg.exclude.matches(repository)
    }

    /// Tags of `repository` that pass `tags_include`/`tags_exclude`, at most
    /// `max_tags_per_repository`.
    pub async fn list_tags(&self, repository: &str) -> Result<TagListing, RegistryError> {
        let path = format!("/v2/{repository}/tags/list");
        let scope = format!("repository:{repository}:pull");
        let (listed, mut truncated) = self.list_pages(&path, &scope, "tags", usize::MAX).await?;
        let max = self.cfg.max_tags_per_repository;
        let mut tags = Vec::new();
        for tag in listed {
            if !is_valid_tag(&tag) {
                warn!(repository, tag = %tag.escape_debug(), "skipping invalid tag from the registry");
                continue;
            }
            if !self.cfg.tags_include.matches(&tag) || self.cfg.tags_exclude.matches(&tag) {
                continue;
            }
            if tags.len() == max {
                truncated = true;
                break;
            }
            tags.push(tag);
        }
        Ok(TagListing { tags, truncated })
    }

    /// The digest `repository:tag` points at: `Docker-Content-Digest` of a HEAD that
    /// accepts all four manifest media types (so a list is never rewritten to a child).
    ///
    /// Done with reqwest rather than `oci-client`'s `fetch_manifest_digest`, which on a
    /// registry without auth sends an extra `GET /v2/` before every request (it caches
    /// no "anonymous" token), turns a HEAD 404 or 5xx into a second GET, and hides
    /// `Retry-After`: that would double the cost of every idle cycle.
    pub async fn head_manifest(
        &self,
        repository: &str,
        tag: &str,
    ) -> Result<Digest, RegistryError> {
        let path = format!("/v2/{repository}/manifests/{tag}");
        let url = self
            .cfg
            .base_url
            .join(&path)
            .map_err(|e| self.invalid("HEAD", &path, e.to_string()))?;
        let scope = format!("repository:{repository}:pull");
        let accept = manifest::ACCEPTED.join(", ");
        let (headers, _) = self
            .fetch(reqwest::Method::HEAD, &url, &scope, Some(&accept), 0)
            .await?;
        match headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            Some(value) => {
                Digest::parse(value.trim()).map_err(|e| self.invalid("HEAD", &path, e.to_string()))
            }
            None => {
                // Registries that send no digest header: GET and hash the body.
                let (_, digest) = self.pull_manifest_raw(repository, tag, None).await?;
                Ok(digest)
            }
        }
    }

    /// The manifest `repository@digest`, verified against the digest.
    pub async fn get_manifest(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let (bytes, _) = self
            .pull_manifest_raw(repository, digest.as_str(), Some(digest))
            .await?;
        Ok(bytes)
    }

    /// GET of a manifest (all four media types accepted, at most
    /// [`MAX_MANIFEST_BYTES`]) through [`Self::fetch`], so it has the same retries,
    /// `Retry-After`, timeout and auth as every other request. The body must hash to
    /// `expected` (a GET by digest), else to the `Docker-Content-Digest` header when the
    /// registry sent one; returns the body and its digest.
    async fn pull_manifest_raw(
        &self,
        repository: &str,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<(Bytes, Digest), RegistryError> {
        let path = format!("/v2/{repository}/manifests/{reference}");
        let url = self
            .cfg
            .base_url
            .join(&path)
            .map_err(|e| self.invalid("GET", &path, e.to_string()))?;
        let scope = format!("repository:{repository}:pull");
        let accept = manifest::ACCEPTED.join(", ");
        let (headers, body) = self
            .fetch(
                reqwest::Method::GET,
                &url,
                &scope,
                Some(&accept),
                MAX_MANIFEST_BYTES,
            )
            .await
            .map_err(|e| match e {
                RegistryError::Invalid { reason, .. } if reason.starts_with("response over") => {
                    self.invalid(
                        "GET",
                        &path,
                        format!("manifest over the {MAX_MANIFEST_BYTES}-byte limit"),
                    )
                }
                other => other,
            })?;
        let header = match headers
            .get("docker-content-digest")
            .map(|v| v.to_str().map(str::trim))
        {
            None => None,
            Some(Ok(value)) => {
                Some(Digest::parse(value).map_err(|e| self.invalid("GET", &path, e.to_string()))?)
            }
            Some(Err(_)) => {
                return Err(self.invalid("GET", &path, "Docker-Content-Digest is not text".into()));
            }
        };
        // The digest asked for wins over the header: a by-digest GET must return exactly
        // those bytes whatever the registry claims.
        let digest = match (expected, header) {
            (Some(d), _) => d.clone(),
            (None, Some(d)) => d,
            (None, None) => Digest::sha256_of(&body),
        };
        if !digest_matches(&digest, &body) {
            return Err(self.invalid(
                "GET",
                &path,
                format!(
                    "digest check failed: the {} bytes received are not {digest}",
                    body.len()
                ),
            ));
        }
        Ok((body, digest))
    }

    fn invalid(&self, method: &'static str, path: &str, reason: String) -> RegistryError {
        RegistryError::Invalid {
            host: self.cfg.host.clone(),
            method,
            path: path.to_string(),
            reason,
        }
    }

    /// Follows a paginated listing (`_catalog` or `tags/list`), returning the names
    /// under `field` and whether it was cut short.
    async fn list_pages(
        &self,
        first: &str,
        scope: &str,
        field: &str,
        limit: usize,
    ) -> Result<(Vec<String>, bool), RegistryError> {
        let base = &self.cfg.base_url;
        let mut url = base
            .join(first)
            .map_err(|e| self.invalid("GET", first, e.to_string()))?;
        url.query_pairs_mut()
            .append_pair("n", &PAGE_SIZE.to_string());
        let mut seen = HashSet::new();
        let mut names = Vec::new();
        for _ in 0..MAX_PAGES {
            let (headers, body) = self
                .fetch(reqwest::Method::GET, &url, scope, None, MAX_LIST_BODY)
                .await?;
            let path = path_of(&url);
            let value: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| self.invalid("GET", &path, format!("not JSON: {e}")))?;
            let items = match value.get(field) {
                Some(serde_json::Value::Array(items)) => items.as_slice(),
                Some(serde_json::Value::Null) | None => &[],
                Some(_) => {
                    return Err(self.invalid("GET", &path, format!("`{field}` is not a list")));
                }
            };
            let mut new = 0usize;
            for item in items {
                let Some(name) = item.as_str() else {
                    return Err(self.invalid(
                        "GET",
                        &path,
                        format!("`{field}` holds a non-string"),
                    ));
                };
                if seen.insert(name.to_string()) {
                    names.push(name.to_string());
                    new += 1;
                    if names.len() >= limit {
                        return Ok((names, true));
                    }
                }
            }
            let next = headers
                .get_all(LINK)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(next_link);
            match next {
                // A page that brought nothing new ends the listing, even if it links on:
                // some registries ignore `n`/`last` and would loop forever.
                Some(next) if new > 0 => {
                    let next_url = url.join(&next).map_err(|e| {
                        self.invalid("GET", &path, format!("bad Link {next:?}: {e}"))
                    })?;
                    if next_url.origin() != base.origin() {
                        return Err(self.invalid(
                            "GET",
                            &path,
                            format!(
                                "Link points to another origin: {}",
                                next_url.origin().ascii_serialization()
                            ),
                        ));
                    }
                    url = next_url;
                }
                _ => return Ok((names, false)),
            }
        }
        Ok((names, true))
    }

    /// A GET (with body, at most `body_limit` bytes) or HEAD with auth (Basic or Bearer,
    /// learned from the first challenge), the concurrency bound, and bounded retries:
    /// one credential refresh after a 401, `Retry-After` on 429, back-off on 5xx and
    /// connection errors. Returns only on 200.
    async fn fetch(
        &self,
        method: reqwest::Method,
        url: &Url,
        scope: &str,
        accept: Option<&str>,
        body_limit: usize,
    ) -> Result<(HeaderMap, Bytes), RegistryError> {
        let path = path_of(url);
        let verb: &'static str = if method == reqwest::Method::HEAD {
            "HEAD"
        } else {
            "GET"
        };
        let mut attempt = 0u32;
        let mut auth_retried = false;
        loop {
            let authorization = self.authorization(scope).await?;
            let result = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| self.invalid(verb, &path, "client closed".into()))?;
                self.stats.total.fetch_add(1, Ordering::Relaxed);
                let mut request = self.http.request(method.clone(), url.clone());
                if let Some(value) = &authorization {
                    request = request.header(AUTHORIZATION, value.expose());
                }
                if let Some(accept) = accept {
                    request = request.header(ACCEPT, accept);
                }
                match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        self.stats.record(status.as_str());
                        let headers = response.headers().clone();
                        if status == StatusCode::OK && method != reqwest::Method::HEAD {
                            read_limited(response, body_limit)
                                .await
                                .map(|body| (status, headers, body))
                        } else {
                            Ok((status, headers, Bytes::new()))
                        }
                    }
                    Err(e) => Err(ReadError::Http(e)),
                }
            };
            let (status, headers, body) = match result {
                Ok(r) => r,
                Err(ReadError::TooLarge) => {
                    return Err(self.invalid(
                        verb,
                        &path,
                        format!("response over {body_limit} bytes"),
                    ));
                }
                Err(ReadError::Http(e)) => {
                    self.stats.record(if e.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    });
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if attempt < self.cfg.max_retries {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    return Err(if e.is_timeout() {
                        RegistryError::Timeout {
                            host: self.cfg.host.clone(),
                            method: verb,
                            path,
                            timeout: self.cfg.request_timeout,
                        }
                    } else {
                        RegistryError::Transport {
                            host: self.cfg.host.clone(),
                            method: verb,
                            path,
                            source: Box::new(e),
                        }
                    });
                }
            };
            if status == StatusCode::OK {
                return Ok((headers, body));
            }
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            match status {
                StatusCode::UNAUTHORIZED if !auth_retried => {
                    auth_retried = true;
                    let challenge = headers
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_challenge);
                    debug!(
                        method = verb,
                        path, "401 from registry; reading credentials again"
                    );
                    self.learn_challenge(challenge, scope).await?;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(RegistryError::Unauthorized {
                        host: self.cfg.host.clone(),
                        method: verb,
                        path,
                    });
                }
                StatusCode::NOT_FOUND => {
                    return Err(RegistryError::NotFound {
                        host: self.cfg.host.clone(),
                        method: verb,
                        path,
                    });
                }
                s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                    let wait = if s == StatusCode::TOO_MANY_REQUESTS {
                        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        retry_after(&headers).unwrap_or_else(|| backoff(attempt + 1))
                    } else {
                        backoff(attempt + 1)
                    };
                    if attempt >= self.cfg.max_retries || wait > MAX_RETRY_AFTER {
                        return Err(RegistryError::Status {
                            host: self.cfg.host.clone(),
                            method: verb,
                            path,
                            status: status_text(s.as_u16()),
                        });
                    }
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
                s => {
                    return Err(RegistryError::Status {
                        host: self.cfg.host.clone(),
                        method: verb,
                        path,
                        status: status_text(s.as_u16()),
                    });
                }
            }
        }
    }

    /// The `Authorization` value for a request, if the scheme is known.
    async fn authorization(&self, scope: &str) -> Result<Option<Secret>, RegistryError> {
        let scheme = self.list_auth.lock().await.scheme.clone();
        match scheme {
            Scheme::Unknown => Ok(None),
            Scheme::Basic => Ok(self.credentials()?.map(|c| Secret::new(c.basic_header()))),
            Scheme::Bearer { realm, service } => {
                let requested = {
                    let state = self.list_auth.lock().await;
                    if let Some(token) = state.tokens.get(scope) {
                        return Ok(Some(Secret::new(format!("Bearer {}", token.expose()))));
                    }
                    state
                        .challenged_scopes
                        .get(scope)
                        .cloned()
                        .unwrap_or_else(|| scope.to_string())
                };
                let token = self
                    .fetch_token(&realm, service.as_deref(), &requested)
                    .await?;
                self.list_auth
                    .lock()
                    .await
                    .tokens
                    .insert(scope.to_string(), token.clone());
                Ok(Some(Secret::new(format!("Bearer {}", token.expose()))))
            }
        }
    }

    /// Records what a 401 asked for; drops the rejected token so the next try fetches a
    /// new one with freshly read credentials.
    async fn learn_challenge(
        &self,
        challenge: Option<Challenge>,
        scope: &str,
    ) -> Result<(), RegistryError> {
        let mut state = self.list_auth.lock().await;
        state.tokens.remove(scope);
        state.scheme = match challenge {
            Some(Challenge::Basic) => Scheme::Basic,
            Some(Challenge::Bearer {
                realm,
                service,
                scope: asked,
            }) => {
                if let Some(asked) = asked {
                    state.challenged_scopes.insert(scope.to_string(), asked);
                }
                Scheme::Bearer { realm, service }
            }
            None => {
                // No usable challenge: try Basic if we have credentials.
                if self.credentials()?.is_some() {
                    Scheme::Basic
                } else {
                    Scheme::Unknown
                }
            }
        };
        Ok(())
    }

    /// Gets a bearer token for `scope` from the token realm, with Basic credentials.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Secret, RegistryError> {
        let realm_url = Url::parse(realm)
            .map_err(|e| self.invalid("GET", realm, format!("bad token realm: {e}")))?;
        // Never send the account's credentials over plain HTTP to a host other than the
        // registry itself.
        if realm_url.scheme() != "https" && realm_url.host_str() != self.cfg.base_url.host_str() {
            return Err(self.invalid(
                "GET",
                realm,
                "token realm is plain http on another host".into(),
            ));
        }
        let path = path_of(&realm_url);
        let mut request = self.http.get(realm_url.clone()).query(&[("scope", scope)]);
        if let Some(service) = service {
            request = request.query(&[("service", service)]);
        }
        if let Some(creds) = self.credentials()? {
            request = request.header(AUTHORIZATION, creds.basic_header());
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| self.invalid("GET", &path, "client closed".into()))?;
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(|e| {
            self.stats.record("transport");
            RegistryError::Transport {
                host: self.cfg.host.clone(),
                method: "GET",
                path: path.clone(),
                source: Box::new(e),
            }
        })?;
        self.stats.record(response.status().as_str());
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(RegistryError::Unauthorized {
                    host: self.cfg.host.clone(),
                    method: "GET",
                    path,
                });
            }
            s => {
                return Err(RegistryError::Status {
                    host: self.cfg.host.clone(),
                    method: "GET",
                    path,
                    status: status_text(s.as_u16()),
                });
            }
        }
        let body = read_limited(response, 1024 * 1024)
            .await
            .map_err(|_| self.invalid("GET", &path, "token response unreadable".into()))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| self.invalid("GET", &path, "token response is not JSON".into()))?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or_else(|| self.invalid("GET", &path, "token response has no token".into()))
    }
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

impl From<reqwest::Error> for ReadError {
    fn from(e: reqwest::Error) -> Self {
        ReadError::Http(e)
    }
}

/// Reads a body, refusing more than `limit` bytes (without buffering them).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// True when `body` hashes to `digest` (sha256 or sha512).
fn digest_matches(digest: &Digest, body: &[u8]) -> bool {
    use sha2::Digest as _;
    let actual = match digest.as_str().split_once(':') {
        Some(("sha256", _)) => hex::encode(sha2::Sha256::digest(body)),
        Some(("sha512", _)) => hex::encode(sha2::Sha512::digest(body)),
        _ => return false,
    };
    actual == digest.hex()
}

fn path_of(url: &Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

fn status_text(code: u16) -> String {
    match StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
    {
        Some(reason) => format!("{code} {reason}"),
        None => code.to_string(),
    }
}

/// Exponential back-off for try number `attempt` (1-based), with a little jitter so
/// that many requests failing together do not retry together.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_INITIAL.saturating_mul(1u32 << attempt.saturating_sub(1).min(10));
    let capped = exp.min(BACKOFF_MAX);
    let jitter_ms = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        % 100) as u64;
    capped + Duration::from_millis(jitter_ms)
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The `rel="next"` target of a `Link` header value.
fn next_link(value: &str) -> Option<String> {
    value.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

/// A repository name as the distribution spec allows: lowercase components of
/// `[a-z0-9]` with single `.`, `_`, `__` or runs of `-` inside, joined by `/`; at most 255
/// characters. This rejects `..`, `%2e`, empty components, unicode and absolute paths.
pub fn is_valid_repository_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('/').all(|component| {
        let bytes = component.as_bytes();
        if bytes.is_empty()
            || !bytes[0].is_ascii_alphanumeric()
            || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
        {
            return false;
        }
        let mut prev_sep: Option<u8> = None;
        let mut run = 0;
        for &b in bytes {
            match b {
                b'a'..=b'z' | b'0'..=b'9' => {
                    prev_sep = None;
                    run = 0;
                }
                b'.' | b'_' | b'-' => {
                    run += 1;
                    let ok = match (prev_sep, b) {
                        (None, _) => true,
                        (Some(b'_'), b'_') => run == 2,
                        (Some(b'-'), b'-') => true,
                        _ => false,
                    };
                    if !ok {
                        return false;
                    }
                    prev_sep = Some(b);
                }
                _ => return false,
            }
        }
        true
    })
}

/// A tag as the distribution spec allows: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_distribution_grammar() {
        for ok in [
            "demo",
            "demo/debian-zlib",
            "db/schema/repo/python",
            "a__b",
            "a--b",
            "a.b_c",
            "x1/y2",
        ] {
            assert!(is_valid_repository_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "..",
            "a/../b",
            "a/./b",
            "/abs",
            "a//b",
            "%2e%2e",
            "UPPER",
            "dé",
            "a/",
            "a___b",
            "a._b",
            "-a",
            long.as_str(),
        ] {
            assert!(!is_valid_repository_name(bad), "{bad}");
        }
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for ok in ["1.0", "latest", "_x", "sha256-abc.sig", "V1_2-3"] {
            assert!(is_valid_tag(ok), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in ["", ".x", "-x", "a/b", "a:b", "ü", long.as_str()] {
            assert!(!is_valid_tag(bad), "{bad}");
        }
    }

    #[test]
    fn link_header_next() {
        assert_eq!(
            next_link("</v2/_catalog?last=b&n=2>; rel=\"next\"").as_deref(),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link("<https://x/a>; rel=\"prev\", <https://x/b>; rel=next").as_deref(),
            Some("https://x/b")
        );
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn a_manifest_body_must_hash_to_its_digest() {
        let body = br#"{"schemaVersion":2}"#;
        let sha256 = Digest::sha256_of(body);
        assert!(digest_matches(&sha256, body));
        assert!(!digest_matches(&sha256, &body[..body.len() / 2]));
        assert!(!digest_matches(
            &Digest::sha256_of(b"another manifest"),
            body
        ));
        use sha2::Digest as _;
        let sha512 = Digest::parse(&format!(
            "sha512:{}",
            hex::encode(sha2::Sha512::digest(body))
        ))
        .unwrap();
        assert!(digest_matches(&sha512, body));
        assert!(!digest_matches(&sha512, b"{}"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) < Duration::from_millis(400));
        assert!(backoff(3) >= Duration::from_millis(800));
        assert!(backoff(30) <= BACKOFF_MAX + Duration::from_millis(100));
    }
}
