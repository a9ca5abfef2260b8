//! A fault-injecting HTTP/1.1 proxy on a free loopback port, in front of a real registry
//! (a [`super::registry::TestRegistry`]): the daemon's `registry.url` points at it, and
//! each request matching a [`Rule`] gets that rule's [`Fault`] instead of (or on top of)
//! the registry's answer. Rules can be changed at any time ([`FaultProxy::set_rules`]),
//! so a test switches a fault on, runs cycles, switches it off and watches the recovery.
//!
//! Faults: added latency, a connection reset (RST after the request is read), a status
//! (500, 502, 503 ...) instead of forwarding, 429 with `Retry-After`, a truncated body
//! (the real headers and `Content-Length`, half the body, then close), a replaced body
//! (another body with a matching `Content-Length`: what a digest check must catch), and
//! no answer at all (the socket is held open until the client gives up or the proxy is
//! dropped). A rule may apply to its first N matching requests only, then forward.
//!
//! Every request is logged ([`Seen`]: method, path, kind, user agent, fault applied,
//! when it arrived and when its answer was sent), so tests count requests per
//! `(method, kind)` and per fault.
//!
//! One request per connection: the proxy sends `Connection: close` both ways, which every
//! client here (reqwest, oci-client, syft) handles. It runs on a runtime of its own in a
//! thread of its own, so a test that blocks its thread (e.g. waiting for `once`) does not
//! stall it; dropping the proxy stops it and closes every socket it holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest request or response head read.
const MAX_HEAD: usize = 64 * 1024;
/// How long the proxy waits for a client's request head or for the registry.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a matching request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Waits this long, then forwards.
    Latency(Duration),
    /// Reads the request, then resets the connection (RST, no answer).
    Reset,
    /// Answers this status with a JSON error body, without asking the registry.
    Status(u16),
    /// Answers 429 with `Retry-After: <value>`, without asking the registry.
    TooManyRequests { retry_after: String },
    /// Forwards the registry's headers (with its `Content-Length`), sends half the body,
    /// closes.
    Truncate,
    /// Forwards the registry's status and headers, but sends this body instead of the
    /// registry's, with a `Content-Length` that matches it.
    ReplaceBody(Vec<u8>),
    /// Reads the request and never answers: holds the socket open until the client
    /// closes it or the proxy is dropped.
    Hang,
}

impl Fault {
    /// A short label, used in the per-fault counts (`status 503`, `connection reset` ...).
    pub fn label(&self) -> String {
        match self {
            Fault::Latency(d) => format!("latency {}ms", d.as_millis()),
            Fault::Reset => "connection reset".into(),
            Fault::Status(code) => format!("status {code}"),
            Fault::TooManyRequests { retry_after } => format!("429 retry-after {retry_after}"),
            Fault::Truncate => "truncated body (half sent, then closed)".into(),
            Fault::ReplaceBody(_) => "replaced body".into(),
            Fault::Hang => "no answer (socket held open)".into(),
        }
    }
}

/// What a request path is, in the distribution API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PathKind {
    /// `/v2/` (the API version check).
    Base,
    /// `/v2/_catalog` or a per-repository `/v2/<prefix>/_catalog`.
    Catalog,
    /// `/v2/<repo>/tags/list`.
    TagList,
    /// `/v2/<repo>/manifests/<reference>`.
    Manifest,
    /// `/v2/<repo>/blobs/<digest>`.
    Blob,
    /// Anything else.
    Other,
}

impl PathKind {
    /// The kind of `path` (query ignored).
    pub fn of(path: &str) -> PathKind {
        let path = path.split('?').next().unwrap_or(path);
        if path == "/v2/" || path == "/v2" {
            PathKind::Base
        } else if !path.starts_with("/v2/") {
            PathKind::Other
        } else if path.ends_with("/_catalog") {
            PathKind::Catalog
        } else if path.ends_with("/tags/list") {
            PathKind::TagList
        } else if path.contains("/manifests/") {
            PathKind::Manifest
        } else if path.contains("/blobs/") {
            PathKind::Blob
        } else {
            PathKind::Other
        }
    }
}

/// Which requests get a fault, and which fault.
#[derive(Debug, Clone)]
pub struct Rule {
    method: Option<String>,
    kind: Option<PathKind>,
    path_contains: Option<String>,
    user_agent_prefix: Option<String>,
    first: Option<u64>,
    fault: Fault,
    /// Matching requests seen so far (for `first`).
    matched: u64,
}

impl Rule {
    /// `fault` for every request (narrow it with the builder methods).
    pub fn new(fault: Fault) -> Rule {
        Rule {
            method: None,
            kind: None,
            path_contains: None,
            user_agent_prefix: None,
            first: None,
            fault,
            matched: 0,
        }
    }

    /// Only requests with this method (`HEAD`, `GET`).
    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only requests to this kind of path.
    pub fn kind(mut self, kind: PathKind) -> Rule {
        self.kind = Some(kind);
        self
    }

    /// Only paths containing `part` (e.g. `/manifests/sha256:` for GETs by digest).
    pub fn path_contains(mut self, part: &str) -> Rule {
        self.path_contains = Some(part.to_string());
        self
    }

    /// Only requests whose `User-Agent` starts with `prefix` (the daemon's own requests,
    /// not syft's).
    pub fn user_agent(mut self, prefix: &str) -> Rule {
        self.user_agent_prefix = Some(prefix.to_string());
        self
    }

    /// Only the first `n` matching requests; later ones are forwarded.
    pub fn first(mut self, n: u64) -> Rule {
        self.first = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str, user_agent: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self.kind.is_none_or(|k| k == PathKind::of(path))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.contains(p))
            && self
                .user_agent_prefix
                .as_deref()
                .is_none_or(|p| user_agent.starts_with(p))
    }
}

/// One request the proxy received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path with query.
    pub path: String,
    pub kind: PathKind,
    pub user_agent: String,
    /// The label of the fault applied ([`Fault::label`]); `None` when forwarded as is.
    pub fault: Option<String>,
    /// When its head had been read.
    pub arrived: Instant,
    /// When the answer (or the reset) had been sent; `None` while unanswered.
    pub answered: Option<Instant>,
}

impl Seen {
    /// True for `method` on a path of `kind`.
    pub fn is(&self, method: &str, kind: PathKind) -> bool {
        self.method == method && self.kind == kind
    }
}

/// Requests among `seen` with `method` on a path of `kind`.
pub fn count(seen: &[Seen], method: &str, kind: PathKind) -> usize {
    seen.iter().filter(|s| s.is(method, kind)).count()
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Seen>>,
}

impl Shared {
    /// The fault for this request, if a rule matches (the first matching rule wins; a
    /// rule past its `first` count forwards).
    fn fault_for(&self, method: &str, path: &str, user_agent: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().expect("rules");
        let rule = rules
            .iter_mut()
            .find(|r| r.matches(method, path, user_agent))?;
        rule.matched += 1;
        match rule.first {
            Some(n) if rule.matched > n => None,
            _ => Some(rule.fault.clone()),
        }
    }

    fn answered(&self, index: usize) {
        if let Some(seen) = self.log.lock().expect("log").get_mut(index) {
            seen.answered.get_or_insert_with(Instant::now);
        }
    }
}

/// The proxy; stops (closing every socket it holds) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:PORT`, e.g. [`TestRegistry::host`]),
    /// forwarding everything until rules are set.
    ///
    /// [`TestRegistry::host`]: super::registry::TestRegistry::host
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream: SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("upstream {upstream:?}: {e}"));
        assert!(upstream.ip().is_loopback(), "loopback only: {upstream}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = watch::channel(false);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(serve(listener, upstream, thread_shared, stopped));
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("proxy thread");
        FaultProxy {
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the rules (their `first` counts start again).
    pub fn set_rules(&self, rules: Vec<Rule>) {
        *self.shared.rules.lock().expect("rules") = rules;
    }

    /// Replaces the rules with this one.
    pub fn set(&self, rule: Rule) {
        self.set_rules(vec![rule]);
    }

    /// No faults: everything is forwarded.
    pub fn clear(&self) {
        self.set_rules(Vec::new());
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.log.lock().expect("log").clone()
    }

    /// A mark for [`Self::requests_since`].
    pub fn mark(&self) -> usize {
        self.shared.log.lock().expect("log").len()
    }

    /// Requests after `mark`.
    pub fn requests_since(&self, mark: usize) -> Vec<Seen> {
        self.requests().into_iter().skip(mark).collect()
    }

    /// Requests per `(method, kind)` after `mark`.
    pub fn counts_since(&self, mark: usize) -> BTreeMap<(String, PathKind), usize> {
        let mut out = BTreeMap::new();
        for s in self.requests_since(mark) {
            *out.entry((s.method, s.kind)).or_default() += 1;
        }
        out
    }

    /// Requests per fault label applied after `mark`.
    pub fn faults_since(&self, mark: usize) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for s in self.requests_since(mark) {
            if let Some(f) = s.fault {
                *out.entry(f).or_default() += 1;
            }
        }
        out
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let listener = TcpListener::from_std(listener).expect("proxy listener");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let shared = shared.clone();
                let stopped = stopped.clone();
                connections.spawn(async move {
                    let _ = handle(client, upstream, shared, stopped).await;
                });
            }
            _ = stopped.changed() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// A parsed HTTP head: the first line, the headers in order, and bytes read past it.
struct Head {
    first_line: String,
    headers: Vec<(String, String)>,
    rest: Vec<u8>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.trim().parse().ok()
    }

    /// The head as bytes, with `Connection: close`, and `Content-Length` replaced when
    /// `length` is given.
    fn encode(&self, length: Option<usize>) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first_line);
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "connection" | "keep-alive" | "proxy-connection"
            ) || (length.is_some() && lower == "content-length")
            {
                continue;
            }
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(n) = length {
            out.push_str(&format!("Content-Length: {n}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("head timed out"))??;
        if n == 0 {
            return Err(std::io::Error::other("closed before a complete head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = text.split("\r\n");
    let first_line = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Head {
        first_line,
        headers,
        rest: buf[end + 4..].to_vec(),
    })
}

/// Reads exactly `n` more bytes after `already` (which holds some of them).
async fn read_body(stream: &mut TcpStream, mut already: Vec<u8>, n: usize) -> Vec<u8> {
    let mut chunk = [0u8; 16384];
    while already.len() < n {
        match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => already.extend_from_slice(&chunk[..k]),
        }
    }
    already.truncate(n);
    already
}

/// Reads to the end of the stream (the registry closes after `Connection: close`).
async fn read_to_end(stream: &mut TcpStream, mut already: Vec<u8>) -> Vec<u8> {
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut already)).await;
    already
}

async fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let request = read_head(&mut client).await?;
    let mut parts = request.first_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let user_agent = request.header("user-agent").unwrap_or_default().to_string();
    let fault = shared.fault_for(&method, &path, &user_agent);
    let index = {
        let mut log = shared.log.lock().expect("log");
        log.push(Seen {
            method: method.clone(),
            kind: PathKind::of(&path),
            path: path.clone(),
            user_agent,
            fault: fault.as_ref().map(Fault::label),
            arrived: Instant::now(),
            answered: None,
        });
        log.len() - 1
    };
    let body = match request.content_length() {
        Some(n) if n > 0 => read_body(&mut client, request.rest.clone(), n).await,
        _ => Vec::new(),
    };

    match &fault {
        Some(Fault::Reset) => {
            client.set_zero_linger()?;
            drop(client);
            shared.answered(index);
            return Ok(());
        }
        Some(Fault::Hang) => {
            // Hold the socket: until the client gives up (EOF or error) or the proxy stops.
            let mut sink = [0u8; 1024];
            loop {
                tokio::select! {
                    read = client.read(&mut sink) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = stopped.changed() => break,
                }
            }
            return Ok(());
        }
        Some(Fault::Status(code)) => {
            let reply = error_reply(*code, &[], &method);
            client.write_all(&reply).await?;
            client.flush().await?;
            shared.answered(index);
            return Ok(());
        }
        Some(Fault::TooManyRequests { retry_after }) => {
            let reply = error_reply(429, &[("Retry-After", retry_after.as_str())], &method);
            client.write_all(&reply).await?;
            client.flush().await?;
            shared.answered(index);
            return Ok(());
        }
        Some(Fault::Latency(delay)) => {
            tokio::select! {
                _ = tokio::time::sleep(*delay) => {}
                _ = stopped.changed() => return Ok(()),
            }
        }
        Some(Fault::Truncate) | Some(Fault::ReplaceBody(_)) | None => {}
    }

    // Forward, one request per connection.
    let mut registry = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| std::io::Error::other("connect to the registry timed out"))??;
    let mut out = Head {
        first_line: request.first_line.clone(),
        headers: request.headers.clone(),
        rest: Vec::new(),
    }
    .encode(None);
    out.extend_from_slice(&body);
    registry.write_all(&out).await?;
    registry.flush().await?;
    let response = read_head(&mut registry).await?;
    let no_body = method == "HEAD"
        || response
            .first_line
            .split(' ')
            .nth(1)
            .is_some_and(|s| s == "204" || s == "304");
    match &fault {
        Some(Fault::ReplaceBody(replacement)) => {
            client
                .write_all(&response.encode(Some(replacement.len())))
                .await?;
            if !no_body {
                client.write_all(replacement).await?;
            }
        }
        Some(Fault::Truncate) => {
            client.write_all(&response.encode(None)).await?;
            if !no_body {
                let full = match response.content_length() {
                    Some(n) => read_body(&mut registry, response.rest.clone(), n).await,
                    None => read_to_end(&mut registry, response.rest.clone()).await,
                };
                client.write_all(&full[..full.len() / 2]).await?;
            }
        }
        _ => {
            client.write_all(&response.encode(None)).await?;
            if !no_body {
                client.write_all(&response.rest).await?;
                let _ = tokio::io::copy(&mut registry, &mut client).await;
            }
        }
    }
    client.flush().await?;
    let _ = client.shutdown().await;
    shared.answered(index);
    Ok(())
}

/// A complete error answer (JSON body in the distribution spec's error shape; none for
/// HEAD).
fn error_reply(code: u16, extra: &[(&str, &str)], method: &str) -> Vec<u8> {
    let (reason, error_code) = match code {
        429 => ("Too Many Requests", "TOOMANYREQUESTS"),
        500 => ("Internal Server Error", "UNKNOWN"),
        502 => ("Bad Gateway", "UNKNOWN"),
        503 => ("Service Unavailable", "UNAVAILABLE"),
        _ => ("Injected", "UNKNOWN"),
    };
    let body = format!(
        r#"{{"errors":[{{"code":"{error_code}","message":"injected by the fault proxy","detail":null}}]}}"#
    );
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    if method != "HEAD" {
        out.push_str(&body);
    }
    out.into_bytes()
}
