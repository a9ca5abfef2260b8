//! The HTTP API on `api.listen` (in SPCS an endpoint with `public: false`): health and
//! readiness, status and images, Prometheus metrics, rescan requests (JSON, and the
//! Snowflake service-function protocol), registry push notifications, and a status page.
//!
//! Invariants:
//! - No handler waits for a scan: rescans and events are recorded with
//!   [`Control::submit`](crate::control::Control::submit) and answered at once (202).
//! - Bad input gets 400 with `{"error": ..., "field": ...}`; an unknown image or request
//!   404; bodies over `api.max_body_bytes` 413; a request running longer than
//!   `api.request_timeout` 408; a connection that delivers no complete request head
//!   within twice that (a slowloris client, an idle keep-alive) is closed.
//! - Nothing secret is ever in a response: the config summary holds file paths, not
//!   their content, and the event secret is compared, never echoed.
//! - Registry data (names, tags, errors) is escaped on the HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;
use tracing::{info, warn};

use crate::control::{FieldError, ImageTarget, Scope, Submitted, Trigger};
use crate::daemon::Handles;
use crate::digest::Digest;
use crate::state::{ImageRecord, ImageStatus};
use crate::vulndb::Readiness;

/// The readiness probe's path (`spec/service.yaml` points SPCS at it).
pub const READYZ_PATH: &str = "/readyz";
/// The service function's path (`sql/` binds `scanner_rescan()` to it).
pub const FUNCTION_RESCAN_PATH: &str = "/functions/rescan";
/// Where registries send their notifications.
pub const REGISTRY_EVENTS_PATH: &str = "/events/registry";

/// Severities in display order (grype's names).
pub const SEVERITIES: [&str; 6] = ["Critical", "High", "Medium", "Low", "Negligible", "Unknown"];

/// Binds `addr` and serves until `cancel`; the returned task ends when the server has
/// stopped. Binding errors are returned at once (a taken port is a set-up error).
pub async fn serve(
    addr: SocketAddr,
    handles: Handles,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    // The timeout layer only runs once a request head has been parsed; a client that
    // trickles its head byte by byte would hold a connection (and a task) for ever.
    let listener = DeadlineListener {
        inner: listener,
        limit: head_deadline(handles.config.get().api.request_timeout),
    };
    let app = router(handles);
    info!(listen = %local, "HTTP API listening");
    Ok(tokio::spawn(async move {
        let stop = cancel.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            warn!(error = %e, "HTTP API stopped on an error");
        }
    }))
}

/// How long a connection may take to deliver a request, counted from its opening or
/// from the last bytes of an answer: twice `api.request_timeout`, so that a request
/// whose head arrived in time but whose body stalls still gets its 408 from the timeout
/// layer before the connection is dropped.
fn head_deadline(request_timeout: Duration) -> Duration {
    request_timeout.saturating_mul(2)
}

/// A TCP listener whose connections are closed when a request does not arrive in time
/// (see [`DeadlineStream`]).
struct DeadlineListener {
    inner: tokio::net::TcpListener,
    limit: Duration,
}

impl axum::serve::Listener for DeadlineListener {
    type Io = DeadlineStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let deadline = tokio::time::Instant::now() + self.limit;
                    return (
                        DeadlineStream {
                            inner: stream,
                            limit: self.limit,
                            deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "HTTP API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection with a deadline for reading: reads fail with `TimedOut` once `limit`
/// has passed since the connection opened or since the server last wrote to it, so
/// a slow or silent client (slowloris, an idle keep-alive) is cut off. Writes move the
/// deadline on: a client reading its answers is not a slow one.
struct DeadlineStream {
    inner: tokio::net::TcpStream,
    limit: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineStream {
    fn timed_out(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no complete request within {}",
                humantime::format_duration(self.limit)
            ),
        )
    }
}

impl tokio::io::AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        // Checked before reading: a trickling client always has a byte ready.
        if tokio::time::Instant::now() >= this.deadline.deadline() {
            return Poll::Ready(Err(this.timed_out()));
        }
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }
}

impl tokio::io::AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                let next = tokio::time::Instant::now() + this.limit;
                this.deadline.as_mut().reset(next);
            }
        }
        result
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let result = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = &result {
            if *n > 0 {
                let next = tokio::time::Instant::now() + this.limit;
                this.deadline.as_mut().reset(next);
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The routes, with body-size and time limits.
pub fn router(handles: Handles) -> Router {
    let config = handles.config.get();
    let max_body = config.api.max_body_bytes;
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route(READYZ_PATH, get(readyz))
        .route("/status", get(status))
        .route("/images", get(images))
        .route("/images/{digest}", get(image))
        .route("/metrics", get(metrics))
        .route("/rescan", post(rescan))
        .route("/rescan/{id}", get(rescan_request))
        .route(FUNCTION_RESCAN_PATH, post(function_rescan))
        .route(REGISTRY_EVENTS_PATH, post(registry_events))
        .fallback(|| async { error(StatusCode::NOT_FOUND, None, "no such endpoint") })
        .layer(DefaultBodyLimit::max(config.api.max_body_bytes))
        // Refuses a body whose announced length is over the limit at once (the
        // extractor's own limit only trips once that much has arrived).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            config.api.max_body_bytes,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.api.request_timeout,
        ))
        .layer(axum::middleware::map_response(
            move |response: Response| async move { unread_body(response, max_body) },
        ))
        .with_state(handles)
}

/// A 413 or 408 is answered before the request body has been read: the JSON error
/// shape every other error has, and `Connection: close`, because the unread rest of
/// the body makes the connection unusable and a client that reused it would see its
/// next request fail.
fn unread_body(response: Response, max_body: usize) -> Response {
    let message = match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body over api.max_body_bytes ({max_body} bytes)")
        }
        StatusCode::REQUEST_TIMEOUT => "request not completed within api.request_timeout".into(),
        _ => return response,
    };
    let mut answer = error(response.status(), None, message);
    answer
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

/// An error answer: `{"error": ..., "field": ...}`.
struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// The store failed under a request.
fn internal(e: &crate::state::StateError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        None,
        crate::scanner::error_chain(e),
    )
}

fn all_images(h: &Handles) -> Result<Vec<ImageRecord>, ApiError> {
    h.store.all_images().map_err(|e| internal(&e))
}

fn error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Response {
    ApiError::new(status, field, message).into_response()
}

fn bad_field(e: FieldError) -> Response {
    error(StatusCode::BAD_REQUEST, Some(&e.field), e.message)
}

/// Parses a JSON body, naming the field at fault.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every body this API takes is an object; serde would also read a struct from an
    // array by position (`["all"]` as `{"scope": "all"}`), which no caller means.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Some("body"),
            "invalid JSON body: expected a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    let value = parsed.map_err(|e| {
        let syntax = e.inner().is_syntax() || e.inner().is_eof();
        let path = if syntax {
            ".".to_string()
        } else {
            e.path().to_string()
        };
        let message = e.inner().to_string();
        // "missing field `x`" names the field in the message; the path is its parent.
        let named = message
            .split('`')
            .nth(1)
            .filter(|_| message.starts_with("missing field `"))
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        let field = named.unwrap_or(if path == "." { "body".into() } else { path });
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Some(&field),
            format!("invalid JSON body: {message}"),
        )
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Some("body"),
            format!("invalid JSON body: {e}"),
        )
    })?;
    Ok(value)
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "alive" })).into_response()
}

async fn readyz(State(h): State<Handles>) -> Response {
    let config = h.config.get();
    let now = Utc::now();
    let mut ready = true;
    let store = match h.store.schema_version() {
        Ok(_) => "ok".to_string(),
        Err(e) => {
            ready = false;
            crate::scanner::error_chain(&e)
        }
    };
    let vulndb = match h.vulndb.readiness(now).await {
        Readiness::SbomOnly => "ok (SBOM-only mode)".to_string(),
        Readiness::Ready { stale: false, .. } => "ok".to_string(),
        Readiness::Ready { stale: true, .. } => "ok (stale: results are flagged)".to_string(),
        Readiness::NoDb(m) | Readiness::Held(m) => {
            ready = false;
            m
        }
    };
    let cycles = match h.telemetry.snapshot().failing_since {
        None => "ok".to_string(),
        Some(since) => {
            let failing = (now - since).to_std().unwrap_or_default();
            if failing > config.api.ready_max_failing {
                ready = false;
                format!(
                    "cycles failing since {} (longer than api.ready_max_failing = {})",
                    since.to_rfc3339(),
                    humantime::format_duration(config.api.ready_max_failing)
                )
            } else {
                format!(
                    "failing since {} (within api.ready_max_failing)",
                    since.to_rfc3339()
                )
            }
        }
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({
            "ready": ready,
            "checks": { "store": store, "vulndb": vulndb, "cycles": cycles },
        })),
    )
        .into_response()
}

fn queue_json(h: &Handles) -> Value {
    let depth: BTreeMap<&str, usize> = h
        .queue
        .depth()
        .iter()
        .map(|(lane, n)| (lane.as_str(), *n))
        .collect();
    json!({
        "depth": depth,
        "running": h.queue.running(),
        "requests_pending": h.control.pending(),
    })
}

async fn db_json(h: &Handles) -> Value {
    let state = h.vulndb.state().await;
    let now = Utc::now();
    let identity = state.identity.as_ref();
    json!({
        "readiness": match h.vulndb.readiness(now).await {
            Readiness::SbomOnly => "sbom-only".to_string(),
            Readiness::Ready { stale, .. } => if stale { "ready (stale)".into() } else { "ready".into() },
            Readiness::NoDb(m) => format!("no usable DB: {m}"),
            Readiness::Held(m) => format!("held: {m}"),
        },
        "built": identity.and_then(|i| i.built.clone()),
        "schema_version": identity.and_then(|i| i.schema_version.clone()),
        "age_seconds": identity.and_then(|i| i.age(now)).map(|a| a.num_seconds()),
        "checked_at": state.checked_at,
        "updated_at": state.updated_at,
        "last_error": state.last_error,
    })
}

async fn status(State(h): State<Handles>) -> Response {
    let config = h.config.get();
    let images = match all_images(&h) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_repository: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for image in &images {
        *by_status.entry(image.status.as_str()).or_default() += 1;
        for repo in tag_repositories(image) {
            *by_repository
                .entry(repo)
                .or_default()
                .entry(image.status.as_str())
                .or_default() += 1;
        }
    }
    let mut failed: Vec<&ImageRecord> = images
        .iter()
        .filter(|i| i.status == ImageStatus::Failed)
        .collect();
    failed.sort_by_key(|i| std::cmp::Reverse(i.next_retry));
    let failed: Vec<Value> = failed
        .iter()
        .take(20)
        .map(|i| {
            json!({
                "digest": i.digest.to_string(),
                "tags": i.tags,
                "attempts": i.attempts,
                "error": i.last_error,
                "next_retry": i.next_retry,
            })
        })
        .collect();
    let t = h.telemetry.snapshot();
    let mut summary = serde_json::to_value(&config.raw).unwrap_or(Value::Null);
    summary["registry"]["url"] = Value::String(
        config
            .registry
            .base_url
            .as_str()
            .trim_end_matches('/')
            .to_string(),
    );
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at": h.telemetry.started_at,
        "config": summary,
        "vulndb": db_json(&h).await,
        "last_cycle": t.last_cycle,
        "failing_since": t.failing_since,
        "queue": queue_json(&h),
        "images": { "total": images.len(), "by_status": by_status },
        "repositories": by_repository,
        "failed_images": failed,
        "recent_failures": t.failures,
        "requests": h.control.unfinished(),
    }))
    .into_response()
}

/// Repositories of the tags pointing at an image now.
fn tag_repositories(image: &ImageRecord) -> std::collections::BTreeSet<String> {
    image
        .tags
        .iter()
        .filter_map(|t| crate::state::split_tag_ref(t).map(|(r, _)| r.to_string()))
        .collect()
}

fn image_json(i: &ImageRecord) -> Value {
    let scan = i.last_scan.as_ref();
    json!({
        "digest": i.digest.to_string(),
        "status": i.status.as_str(),
        "tags": i.tags,
        "repositories": i.repositories,
        "media_type": i.media_type,
        "platform": i.platform,
        "first_seen": i.first_seen,
        "attempts": i.attempts,
        "last_error": i.last_error,
        "next_retry": i.next_retry,
        "unsupported_reason": i.unsupported_reason,
        "severities": scan.map(|s| s.severities.clone()).unwrap_or_default(),
        "matches": scan.map(|s| s.matches),
        "result_file": scan.and_then(|s| s.result_file.clone()),
        "last_scan": scan.map(|s| json!({
            "finished_at": s.finished_at,
            "mode": s.mode,
            "db_build": s.db_build,
            "db_schema": s.db_schema,
            "syft_version": s.syft_version,
            "grype_version": s.grype_version,
            "packages": s.packages,
            "matches": s.matches,
            "result_file": s.result_file,
            "sbom_file": s.sbom_file,
            "flags": s.flags,
        })),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesQuery {
    status: Option<String>,
    repository: Option<String>,
}

async fn images(
    State(h): State<Handles>,
    query: Result<Query<ImagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("query"),
                format!(
                    "{}; the parameters are status and repository",
                    e.body_text()
                ),
            );
        }
    };
    let want_status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => match serde_json::from_value::<ImageStatus>(Value::String(s.to_string())) {
            Ok(st) => Some(st),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    Some("status"),
                    "one of pending, scanning, scanned, failed, unsupported",
                );
            }
        },
    };
    let mut all = match all_images(&h) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    all.retain(|i| {
        want_status.is_none_or(|s| i.status == s)
            && q.repository
                .as_deref()
                .is_none_or(|r| r.is_empty() || tag_repositories(i).contains(r))
    });
    let list: Vec<Value> = all.iter().map(image_json).collect();
    axum::Json(json!({ "count": list.len(), "images": list })).into_response()
}

async fn image(State(h): State<Handles>, Path(digest): Path<String>) -> Response {
    let digest = match Digest::parse(&digest) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                Some("digest"),
                format!("not a digest (sha256:<64 hex>): {e}"),
            );
        }
    };
    let found = match h.store.get_image(&digest) {
        Ok(Some(i)) => Some(i),
        Ok(None) => match h.store.get_index(&digest) {
            Ok(Some(index)) => index
                .child
                .and_then(|c| h.store.get_image(&c).ok().flatten()),
            _ => None,
        },
        Err(e) => return internal(&e).into_response(),
    };
    match found {
        Some(i) => axum::Json(image_json(&i)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            Some("digest"),
            format!("no image with digest {digest} is known"),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RescanBody {
    scope: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    force: bool,
}

/// A bare digest must name a known image: the only scope that can be judged unknown at
/// once (a tag may have been pushed a moment ago; the listing will tell).
fn check_known(h: &Handles, scope: &Scope) -> Result<(), ApiError> {
    let Scope::Image(ImageTarget::Digest(d)) = scope else {
        return Ok(());
    };
    let known = h.store.get_image(d).ok().flatten().is_some()
        || h.store.get_index(d).ok().flatten().is_some();
    if known {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Some("target"),
            format!("no image with digest {d} is known"),
        ))
    }
}

fn check_watched(h: &Handles, scope: &Scope) -> Result<(), FieldError> {
    match scope.repository() {
        Some(r) if !h.registry.get().watches(r) => Err(FieldError::new(
            "target",
            format!(
                "repository {r:?} is not watched (registry.repositories, image_repositories, include, exclude)"
            ),
        )),
        _ => Ok(()),
    }
}

fn submit(h: &Handles, scope: &Scope, force: bool, source: &str) -> Result<Submitted, ApiError> {
    h.control
        .submit(scope.clone(), Trigger::Rescan { force }, source)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()))
}

async fn rescan(State(h): State<Handles>, body: Bytes) -> Response {
    let body: RescanBody = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let scope = match Scope::parse(&body.scope, body.target.as_deref()) {
        Ok(s) => s,
        Err(e) => return bad_field(e),
    };
    if let Err(e) = check_watched(&h, &scope) {
        return bad_field(e);
    }
    if let Err(r) = check_known(&h, &scope) {
        return r.into_response();
    }
    match submit(&h, &scope, body.force, "api") {
        Ok(s) => accepted(&s, &scope),
        Err(r) => r.into_response(),
    }
}

fn accepted(s: &Submitted, scope: &Scope) -> Response {
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "request_id": s.request_id,
            "coalesced": s.coalesced,
            "scope": scope.key(),
            "status_url": format!("/rescan/{}", s.request_id),
        })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/rescan/{}", s.request_id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

async fn rescan_request(State(h): State<Handles>, Path(id): Path<String>) -> Response {
    match h.control.get(&id) {
        Some(r) => axum::Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            Some("id"),
            "no such request (or it is too old to be kept)",
        ),
    }
}

#[derive(Debug, Deserialize)]
struct FunctionBody {
    data: Vec<Vec<Value>>,
}

/// Snowflake's service-function protocol: `{"data": [[row, target(, force)], ...]}` →
/// `{"data": [[row, result], ...]}`, one result per row; a bad row gets an error result
/// and does not fail the others.
async fn function_rescan(State(h): State<Handles>, headers: HeaderMap, body: Bytes) -> Response {
    // Who asked, when the function lists CURRENT_USER in CONTEXT_HEADERS.
    let source = match headers
        .get("sf-context-current-user")
        .and_then(|v| v.to_str().ok())
    {
        Some(user) => format!("sql ({})", user.chars().take(128).collect::<String>()),
        None => "sql".to_string(),
    };
    let body: FunctionBody = match parse_json(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut out = Vec::with_capacity(body.data.len());
    for (i, row) in body.data.iter().enumerate() {
        let Some(number) = row.first().and_then(Value::as_i64) else {
            return error(
                StatusCode::BAD_REQUEST,
                Some(&format!("data[{i}][0]")),
                "each row starts with its row number",
            );
        };
        let result = match row.get(1) {
            Some(Value::String(target)) => {
                let force = row.get(2).and_then(Value::as_bool).unwrap_or(false);
                function_row(&h, target, force, &source)
            }
            _ => {
                json!({ "error": "the argument must be a string: all, a repository, or an image reference" })
            }
        };
        out.push(json!([number, result]));
    }
    axum::Json(json!({ "data": out })).into_response()
}

fn function_row(h: &Handles, target: &str, force: bool, source: &str) -> Value {
    let scope = match Scope::infer(target) {
        Ok(s) => s,
        Err(e) => return json!({ "error": e.message }),
    };
    if let Err(e) = check_watched(h, &scope) {
        return json!({ "error": e.message });
    }
    if check_known(h, &scope).is_err() {
        return json!({ "error": format!("no image with digest {target} is known") });
    }
    match h
        .control
        .submit(scope.clone(), Trigger::Rescan { force }, source)
    {
        Ok(s) => json!({
            "request_id": s.request_id,
            "coalesced": s.coalesced,
            "scope": scope.key(),
        }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    action: String,
    #[serde(default)]
    target: Option<EventTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventTarget {
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    media_type: Option<String>,
}

/// Constant-time comparison of the presented and the expected secret.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn registry_events(State(h): State<Handles>, headers: HeaderMap, body: Bytes) -> Response {
    let config = h.config.get();
    if let Some(file) = &config.api.event_secret_file {
        let expected = match std::fs::read_to_string(file) {
            Ok(s) => s.trim().to_string(),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot read api.event_secret_file; refusing events");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    "the event secret cannot be read",
                );
            }
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if expected.is_empty() || !same_secret(presented.as_bytes(), expected.as_bytes()) {
            return error(
                StatusCode::UNAUTHORIZED,
                Some("Authorization"),
                "missing or wrong event secret (Authorization: Bearer <secret>)",
            );
        }
    }
    let envelope: Envelope = match parse_json(&body) {
        Ok(e) => e,
        Err(r) => return r.into_response(),
    };
    let registry = h.registry.get();
    let mut repositories: Vec<String> = Vec::new();
    let mut ignored = 0usize;
    for event in &envelope.events {
        let Some(target) = &event.target else {
            ignored += 1;
            continue;
        };
        let is_manifest = target
            .media_type
            .as_deref()
            .is_none_or(|m| m.contains("manifest") || m.contains("image.index"));
        match target.repository.as_deref() {
            Some(r) if event.action == "push" && is_manifest && registry.watches(r) => {
                if !repositories.iter().any(|x| x == r) {
                    repositories.push(r.to_string());
                }
            }
            _ => ignored += 1,
        }
    }
    let mut requests = Vec::new();
    for r in &repositories {
        match h.control.submit(
            Scope::Repository(r.clone()),
            Trigger::Event,
            "registry event",
        ) {
            Ok(s) => requests.push(
                json!({ "repository": r, "request_id": s.request_id, "coalesced": s.coalesced }),
            ),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, None, e.to_string()),
        }
    }
    if !repositories.is_empty() {
        info!(repositories = ?repositories, ignored, "registry push events: scoped cycles requested");
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "accepted": envelope.events.len() - ignored,
            "ignored": ignored,
            "requests": requests,
        })),
    )
        .into_response()
}

/// Prometheus text exposition format 0.0.4.
async fn metrics(State(h): State<Handles>) -> Response {
    let t = h.telemetry.snapshot();
    let mut m = Metrics::default();
    m.family("spcs_scanner_info", "gauge", "Build information.");
    m.sample(
        "spcs_scanner_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    m.family(
        "spcs_scanner_cycles_total",
        "counter",
        "Cycles run, by scope (all or one repository) and result.",
    );
    for scope in ["all", "repository"] {
        for result in ["ok", "failed"] {
            let n = t.cycles.get(&(scope, result)).copied().unwrap_or(0);
            m.sample(
                "spcs_scanner_cycles_total",
                &[("scope", scope), ("result", result)],
                n as f64,
            );
        }
    }
    m.family(
        "spcs_scanner_cycle_duration_seconds",
        "summary",
        "Wall time of cycles (listing, and for full cycles their scans).",
    );
    m.sample(
        "spcs_scanner_cycle_duration_seconds_sum",
        &[],
        t.cycle_seconds_sum,
    );
    m.sample(
        "spcs_scanner_cycle_duration_seconds_count",
        &[],
        t.cycle_count as f64,
    );
    m.family(
        "spcs_scanner_last_cycle_duration_seconds",
        "gauge",
        "Wall time of the last cycle.",
    );
    m.sample(
        "spcs_scanner_last_cycle_duration_seconds",
        &[],
        t.last_cycle
            .as_ref()
            .map_or(0.0, |c| c.duration_ms as f64 / 1000.0),
    );
    m.family(
        "spcs_scanner_registry_requests_total",
        "counter",
        "Registry requests, by HTTP status (or timeout/transport when unanswered).",
    );
    for (status, n) in h.stats.by_status() {
        m.sample(
            "spcs_scanner_registry_requests_total",
            &[("status", &status)],
            n as f64,
        );
    }
    m.family(
        "spcs_scanner_jobs_total",
        "counter",
        "Scan and re-match jobs, by kind and outcome.",
    );
    for kind in ["scan", "rematch"] {
        for outcome in [
            "scanned",
            "rematched",
            "failed",
            "skipped",
            "held",
            "cancelled",
        ] {
            let n = t.outcomes.get(&(kind, outcome)).copied().unwrap_or(0);
            if n > 0
                || matches!(
                    (kind, outcome),
                    ("scan", "scanned" | "failed") | ("rematch", "rematched" | "failed")
                )
            {
                m.sample(
                    "spcs_scanner_jobs_total",
                    &[("kind", kind), ("outcome", outcome)],
                    n as f64,
                );
            }
        }
    }
    m.family(
        "spcs_scanner_queue_depth",
        "gauge",
        "Jobs waiting, by lane (manual before new before rematch).",
    );
    for (lane, n) in h.queue.depth() {
        m.sample(
            "spcs_scanner_queue_depth",
            &[("lane", lane.as_str())],
            n as f64,
        );
    }
    m.family("spcs_scanner_jobs_running", "gauge", "Jobs running now.");
    m.sample("spcs_scanner_jobs_running", &[], h.queue.running() as f64);
    m.family(
        "spcs_scanner_requests_pending",
        "gauge",
        "Rescan requests and registry events waiting for the control loop.",
    );
    m.sample(
        "spcs_scanner_requests_pending",
        &[],
        h.control.pending() as f64,
    );
    let state = h.vulndb.state().await;
    if let Some(age) = state.identity.as_ref().and_then(|i| i.age(Utc::now())) {
        m.family(
            "spcs_scanner_vulndb_age_seconds",
            "gauge",
            "Age of the vulnerability DB (since its build).",
        );
        m.sample(
            "spcs_scanner_vulndb_age_seconds",
            &[],
            age.num_seconds() as f64,
        );
    }
    m.family(
        "spcs_scanner_config_reloads_total",
        "counter",
        "Config reloads (SIGHUP), by result.",
    );
    for result in ["ok", "failed"] {
        m.sample(
            "spcs_scanner_config_reloads_total",
            &[("result", result)],
            t.reloads.get(result).copied().unwrap_or(0) as f64,
        );
    }
    if let Ok(counts) = h.store.counts() {
        m.family(
            "spcs_scanner_images",
            "gauge",
            "Image digests known, by status.",
        );
        for status in [
            ImageStatus::Pending,
            ImageStatus::Scanning,
            ImageStatus::Scanned,
            ImageStatus::Failed,
            ImageStatus::Unsupported,
        ] {
            let n = counts.images.get(status.as_str()).copied().unwrap_or(0);
            m.sample(
                "spcs_scanner_images",
                &[("status", status.as_str())],
                n as f64,
            );
        }
        m.family("spcs_scanner_tags", "gauge", "Tags watched.");
        m.sample("spcs_scanner_tags", &[], counts.tags as f64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.text,
    )
        .into_response()
}

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let escaped = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn age_text(seconds: i64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
}

/// The status page: server-rendered, no script, no external asset.
async fn page(State(h): State<Handles>) -> Response {
    let mut images = match all_images(&h) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    // Worst first: most critical, then high, then by digest.
    let sev = |i: &ImageRecord, s: &str| {
        i.last_scan
            .as_ref()
            .and_then(|x| x.severities.get(s).copied())
            .unwrap_or(0)
    };
    images.sort_by(|a, b| {
        (sev(b, "Critical"), sev(b, "High"))
            .cmp(&(sev(a, "Critical"), sev(a, "High")))
            .then(a.digest.cmp(&b.digest))
    });
    let t = h.telemetry.snapshot();
    let db = db_json(&h).await;
    let mut html = String::with_capacity(4096 + images.len() * 512);
    html.push_str(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>spcs-image-scanner</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}",
        "table{border-collapse:collapse;margin-top:.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}",
        "td.n{text-align:right}.critical{color:#b00;font-weight:bold}.failed{color:#b00}",
        "dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dt{font-weight:bold}</style>",
        "</head><body><h1>spcs-image-scanner</h1>"
    ));
    let _ = write!(
        html,
        "<dl id=\"summary\"><dt>Version</dt><dd>{}</dd>",
        env!("CARGO_PKG_VERSION")
    );
    let _ = write!(
        html,
        "<dt>Vulnerability DB</dt><dd id=\"db\">{} &middot; built {} &middot; age {}</dd>",
        escape(db["readiness"].as_str().unwrap_or("")),
        escape(db["built"].as_str().unwrap_or("unknown")),
        db["age_seconds"]
            .as_i64()
            .map_or("unknown".to_string(), age_text)
    );
    match &t.last_cycle {
        Some(c) => {
            let _ = write!(
                html,
                "<dt>Last cycle</dt><dd id=\"last-cycle\">{} &middot; {} &middot; {} ms &middot; {} tags, {} added, {} moved, {} removed, {} queued{}</dd>",
                c.finished_at.map(|f| f.to_rfc3339()).unwrap_or_default(),
                escape(&c.scope),
                c.duration_ms,
                c.tags,
                c.added,
                c.moved,
                c.removed,
                c.queued,
                c.error
                    .as_ref()
                    .map(|e| format!(
                        " &middot; <span class=\"failed\">failed: {}</span>",
                        escape(e)
                    ))
                    .unwrap_or_default()
            );
        }
        None => html.push_str("<dt>Last cycle</dt><dd id=\"last-cycle\">none yet</dd>"),
    }
    let depth = h.queue.depth();
    let _ = write!(html, "<dt>Queue</dt><dd id=\"queue\">");
    for (i, (lane, n)) in depth.iter().enumerate() {
        if i > 0 {
            html.push_str(", ");
        }
        let _ = write!(
            html,
            "{}: <span data-lane=\"{}\">{}</span>",
            lane.as_str(),
            lane.as_str(),
            n
        );
    }
    let _ = write!(html, "; running: {}</dd></dl>", h.queue.running());
    let _ = write!(
        html,
        "<h2>Images ({})</h2><table id=\"images\"><thead><tr><th>Tags</th><th>Digest</th><th>Status</th>",
        images.len()
    );
    for s in SEVERITIES {
        let _ = write!(html, "<th>{s}</th>");
    }
    html.push_str("<th>Last scan</th><th>Result</th></tr></thead><tbody>");
    for i in &images {
        let tags = if i.tags.is_empty() {
            "(no tag)".to_string()
        } else {
            i.tags.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        let _ = write!(
            html,
            "<tr data-digest=\"{}\" data-status=\"{}\"><td>{}</td><td title=\"{}\"><code>{}</code></td><td class=\"{}\">{}</td>",
            escape(&i.digest.to_string()),
            i.status.as_str(),
            escape(&tags),
            escape(&i.digest.to_string()),
            escape(&i.digest.to_string()[..19.min(i.digest.to_string().len())]),
            i.status.as_str(),
            i.status.as_str(),
        );
        for s in SEVERITIES {
            let n = sev(i, s);
            let class = if s == "Critical" && n > 0 {
                "n critical"
            } else {
                "n"
            };
            let _ = write!(
                html,
                "<td class=\"{class}\" data-severity=\"{}\">{n}</td>",
                s.to_lowercase()
            );
        }
        let scan = i.last_scan.as_ref();
        let _ = write!(
            html,
            "<td>{}</td><td>{}</td></tr>",
            scan.map(|s| s.finished_at.to_rfc3339()).unwrap_or_default(),
            escape(scan.and_then(|s| s.result_file.as_deref()).unwrap_or(""))
        );
    }
    html.push_str("</tbody></table></body></html>");
    let mut response = Html(html).into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape("<script>\"x\"&'y'</script>"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
    }

    #[test]
    fn json_errors_name_the_field() {
        let r = parse_json::<RescanBody>(br#"{"target": "x"}"#).unwrap_err();
        assert_eq!(
            (r.status, r.field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("scope"))
        );
        let r = parse_json::<RescanBody>(br#"{"scope": "all", "force": "yes"}"#).unwrap_err();
        assert_eq!(r.field.as_deref(), Some("force"));
        let r = parse_json::<RescanBody>(b"{oops").unwrap_err();
        assert_eq!(r.field.as_deref(), Some("body"));
        assert!(parse_json::<RescanBody>(br#"{"scope": "all"}"#).is_ok());
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused_even_if_serde_could_read_it() {
        let bodies: [&[u8]; 4] = [br#"["all"]"#, br#" ["all", null, true]"#, br#""all""#, b"5"];
        for body in bodies {
            let r = parse_json::<RescanBody>(body).unwrap_err();
            assert_eq!(
                (r.status, r.field.as_deref()),
                (StatusCode::BAD_REQUEST, Some("body")),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(parse_json::<RescanBody>(b" \n {\"scope\": \"all\"}").is_ok());
    }
}
