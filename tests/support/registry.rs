//! A real `docker-registry` (Debian's distribution/registry 2.8) running as a
//! child process on loopback, for integration tests.
//!
//! Each [`TestRegistry`] owns a [`tempfile::TempDir`] holding its config file,
//! its filesystem storage, an optional htpasswd file and its log file. It binds
//! `127.0.0.1:<free port>` (picked by binding port 0, releasing it, then
//! starting the registry on it, retrying with a new port if the registry
//! exits early or never answers).
//!
//! # Request log
//!
//! The registry writes an Apache combined-log line for every request to its
//! stdout, which is redirected (together with stderr) to a log file.
//! [`TestRegistry::requests`] parses those lines; the logrus lines
//! (`time=... msg="response completed"`) are ignored.
//!
//! Timing: the combined line is written (unbuffered, straight to the file)
//! by gorilla's logging handler *inside* the request handler, i.e. before Go's
//! `net/http` flushes the last buffered bytes of the response. So once a
//! client has read a complete response (headers of a `HEAD`, or the whole
//! body of a `GET`, even a multi-megabyte blob) its line is already in the
//! file: checked over hundreds of requests with zero misses. Only a client
//! that stops after the response headers of a large body could race ahead.
//! When in doubt (e.g. a daemon in another process may still be mid-request),
//! use [`TestRegistry::wait_for_log_quiet`],
//! [`TestRegistry::requests_since_settled`] or
//! [`TestRegistry::wait_for_requests`].
//!
//! # Restarts
//!
//! [`TestRegistry::stop`] kills the process and waits until the port is
//! closed; [`TestRegistry::start_again`] restarts it on the same port with the
//! same storage and config; [`TestRegistry::restart_with_credentials`] also
//! rewrites the htpasswd file first. The log file is appended to across
//! restarts, so marks stay valid.
//!
//! # docker-registry 2.8.2 quirks (observed here)
//!
//! - Manifests are content-negotiated: `GET`/`HEAD` of an OCI manifest or OCI
//!   index answers **404 `MANIFEST_UNKNOWN`** unless `Accept` lists that exact
//!   media type (even by digest; `*/*` does not help). A Docker schema2
//!   manifest fetched *by tag* without `Accept:
//!   application/vnd.docker.distribution.manifest.v2+json` answers **400
//!   `MANIFEST_INVALID`** (failed schema1 down-conversion); by digest it is
//!   returned as is. Clients must send all four manifest media types.
//! - There is no tag-delete API; [`TestRegistry::delete_tag_in_storage`]
//!   removes the tag directory, and the running registry reflects it at once
//!   (`tags/list` drops it, `HEAD` gives 404). A repository whose tags are all
//!   gone answers `tags/list` with 200 and `"tags": null`; an unknown
//!   repository gives 404 `NAME_UNKNOWN`.
//! - `DELETE /v2/<repo>/manifests/<digest>` (202) also removes every tag
//!   pointing at that manifest.
//! - An index referencing a manifest missing from the repository is rejected
//!   with 400 `MANIFEST_BLOB_UNKNOWN`.
//! - htpasswd: bcrypt only. The file is re-read whenever its mtime changes
//!   (see [`TestRegistry::set_credentials_live`]), not only at start-up.
//!   The combined log's user field stays `-` even for authenticated requests.
//! - Without `http.secret` the registry generates a random one per start;
//!   a fixed secret is configured so upload URLs survive restarts.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The registry binary; override with the `DOCKER_REGISTRY` environment variable.
const DEFAULT_REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// User-Agent of the readiness probe (deliberately not `spcs-image-scanner/...`).
const PROBE_USER_AGENT: &str = "spcs-image-scanner-tests/registry-probe";
/// How many fresh ports [`TestRegistry::start`] tries before giving up.
const START_ATTEMPTS: usize = 4;
/// How many times [`TestRegistry::start_again`] tries the same port
/// (pauses 0.1 s, 0.2 s, 0.4 s, ... between tries).
const RESTART_ATTEMPTS: usize = 5;
/// Readiness polling: number of `GET /v2/` tries and the pause between them.
const READY_TRIES: usize = 100;
const READY_PAUSE: Duration = Duration::from_millis(50);

/// How clients must authenticate to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// No authentication at all.
    Anonymous,
    /// HTTP Basic auth checked against a bcrypt htpasswd file holding one user.
    Htpasswd { user: String, password: String },
}

/// Options for [`TestRegistry::start`].
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub auth: RegistryAuth,
    /// Realm announced in `WWW-Authenticate` when auth is enabled.
    pub realm: String,
    /// Where the registry sends its event notifications (URL, and the bearer secret
    /// it sends in `Authorization`).
    pub notify: Option<(String, Option<String>)>,
    /// `storage.cache.blobdescriptor: inmemory`, as in Debian's default config (the
    /// benchmark); off for the tests, which change the storage behind its back.
    pub blob_descriptor_cache: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self::anonymous()
    }
}

impl RegistryOptions {
    /// An open registry: anyone may push and pull.
    pub fn anonymous() -> Self {
        Self {
            auth: RegistryAuth::Anonymous,
            realm: "spcs-test-registry".to_string(),
            notify: None,
            blob_descriptor_cache: false,
        }
    }

    /// A registry requiring Basic auth as `user`/`password`.
    pub fn htpasswd(user: &str, password: &str) -> Self {
        Self {
            auth: RegistryAuth::Htpasswd {
                user: user.to_string(),
                password: password.to_string(),
            },
            realm: "spcs-test-registry".to_string(),
            notify: None,
            blob_descriptor_cache: false,
        }
    }

    /// With the in-memory blob descriptor cache of Debian's default registry config.
    pub fn with_blob_descriptor_cache(mut self) -> Self {
        self.blob_descriptor_cache = true;
        self
    }

    /// The registry also sends its push (and pull) notifications to `url`, with
    /// `Authorization: Bearer <secret>` when a secret is given.
    pub fn notifying(mut self, url: &str, secret: Option<&str>) -> Self {
        self.notify = Some((url.to_string(), secret.map(str::to_string)));
        self
    }
}

/// One request, parsed from a combined-log line written by the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRequest {
    /// `GET`, `HEAD`, `PUT`, ...
    pub method: String,
    /// Request URI as sent, including any query string (e.g. `/v2/_catalog?n=5`).
    pub path: String,
    /// HTTP status of the response.
    pub status: u16,
    /// Response body bytes sent (0 for `-`).
    pub bytes: u64,
    /// The `User-Agent` header (empty when the client sent none).
    pub user_agent: String,
}

impl LoggedRequest {
    /// True for a request to `/v2/<repo>/manifests/<reference>` with `method`.
    pub fn is_manifest(&self, method: &str) -> bool {
        self.method == method && manifest_target(&self.path).is_some()
    }

    /// `(repo, reference)` when this is a manifest request.
    pub fn manifest_target(&self) -> Option<(&str, &str)> {
        manifest_target(&self.path)
    }

    /// True when the user agent starts with `prefix`.
    pub fn user_agent_starts_with(&self, prefix: &str) -> bool {
        self.user_agent.starts_with(prefix)
    }
}

fn manifest_target(path: &str) -> Option<(&str, &str)> {
    let path = path.split('?').next().unwrap_or(path);
    let rest = path.strip_prefix("/v2/")?;
    let idx = rest.rfind("/manifests/")?;
    let repo = &rest[..idx];
    let reference = &rest[idx + "/manifests/".len()..];
    (!repo.is_empty() && !reference.is_empty() && !reference.contains('/'))
        .then_some((repo, reference))
}

/// A running `docker-registry serve` child process; see the module docs.
#[derive(Debug)]
pub struct TestRegistry {
    dir: TempDir,
    storage: PathBuf,
    port: u16,
    options: RegistryOptions,
    child: Option<Child>,
    bin: PathBuf,
}

impl TestRegistry {
    /// Starts a registry on a free loopback port and waits until `GET /v2/`
    /// answers (200, or 401 with auth). Panics with the registry's log if it
    /// cannot be started after a few ports.
    pub async fn start(options: RegistryOptions) -> TestRegistry {
        let dir = tempfile::Builder::new()
            .prefix("spcs-test-registry-")
            .tempdir()
            .expect("create temp dir for the test registry");
        let bin = std::env::var_os("DOCKER_REGISTRY")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REGISTRY_BIN));
        assert!(
            bin.exists(),
            "docker-registry not found at {} (install Debian's `docker-registry` package, \
             or set DOCKER_REGISTRY)",
            bin.display()
        );
        let storage = dir.path().join("storage");
        let mut registry = TestRegistry {
            dir,
            storage,
            port: 0,
            options,
            child: None,
            bin,
        };
        fs::create_dir_all(registry.storage_root()).expect("create registry storage dir");
        registry.write_htpasswd();

        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            registry.port = pick_free_port();
            match registry.launch_and_wait().await {
                Ok(()) => return registry,
                Err(why) => failures.push(format!(
                    "attempt {attempt} on port {}: {why}",
                    registry.port
                )),
            }
        }
        panic!(
            "could not start docker-registry:\n{}\n--- registry log ---\n{}",
            failures.join("\n"),
            registry.log_text()
        );
    }

    /// Shorthand for `start(RegistryOptions::anonymous())`.
    pub async fn start_anonymous() -> TestRegistry {
        Self::start(RegistryOptions::anonymous()).await
    }

    /// `127.0.0.1:PORT`, as used in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The port the registry listens on (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Root directory of the filesystem storage driver.
    pub fn storage_root(&self) -> &Path {
        &self.storage
    }

    /// Current credentials when htpasswd auth is enabled.
    pub fn credentials(&self) -> Option<(String, String)> {
        match &self.options.auth {
            RegistryAuth::Anonymous => None,
            RegistryAuth::Htpasswd { user, password } => Some((user.clone(), password.clone())),
        }
    }

    /// The registry process's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child process is currently running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry and waits for it to exit; when this returns the
    /// port refuses connections. Idempotent.
    pub async fn stop(&mut self) {
        self.kill_child();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..100 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "port {} still accepts connections after stopping the registry",
            self.port
        );
    }

    /// Starts the registry again on the same port with the same storage and
    /// config (killing it first if it is running). If the port is busy (the
    /// registry exits with "address already in use") it retries with growing
    /// pauses for about 3 s, then panics with the log.
    pub async fn start_again(&mut self) {
        self.kill_child();
        self.write_htpasswd();
        let mut failures = Vec::new();
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=RESTART_ATTEMPTS {
            match self.launch_and_wait().await {
                Ok(()) => return,
                Err(why) => {
                    failures.push(format!("attempt {attempt} on port {}: {why}", self.port));
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        panic!(
            "could not restart docker-registry on port {}:\n{}\n--- registry log ---\n{}",
            self.port,
            failures.join("\n"),
            self.log_text()
        );
    }

    /// Restarts the registry with htpasswd auth for `user`/`password`
    /// (replacing any previous user; enables auth if it was anonymous).
    pub async fn restart_with_credentials(&mut self, user: &str, password: &str) {
        self.options.auth = RegistryAuth::Htpasswd {
            user: user.to_string(),
            password: password.to_string(),
        };
        self.start_again().await;
    }

    /// Replaces the htpasswd user *without* restarting: registry 2.8.2
    /// re-reads the htpasswd file when its mtime changes (checked on every
    /// request), so the next request already sees the new credentials.
    /// Panics if the registry was started anonymously (auth is configured in
    /// `config.yml`; use [`Self::restart_with_credentials`] to enable it).
    pub fn set_credentials_live(&mut self, user: &str, password: &str) {
        assert!(
            matches!(self.options.auth, RegistryAuth::Htpasswd { .. }),
            "set_credentials_live needs a registry started with htpasswd auth"
        );
        self.options.auth = RegistryAuth::Htpasswd {
            user: user.to_string(),
            password: password.to_string(),
        };
        self.write_htpasswd();
    }

    /// Every request logged so far (across restarts), oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        parse_combined_log(&self.log_text())
    }

    /// A mark to pass to [`Self::requests_since`]: the number of requests
    /// logged so far.
    pub fn mark(&self) -> usize {
        self.requests().len()
    }

    /// Requests logged after `mark` was taken.
    pub fn requests_since(&self, mark: usize) -> Vec<LoggedRequest> {
        self.requests().into_iter().skip(mark).collect()
    }

    /// [`Self::wait_for_log_quiet`] then [`Self::requests_since`].
    pub async fn requests_since_settled(&self, mark: usize) -> Vec<LoggedRequest> {
        self.wait_for_log_quiet().await;
        self.requests_since(mark)
    }

    /// Number of `HEAD /v2/<repo>/manifests/<ref>` requests since `mark` whose
    /// user agent starts with `user_agent_prefix` (waits for the log first).
    pub async fn manifest_heads_since(&self, mark: usize, user_agent_prefix: &str) -> usize {
        self.requests_since_settled(mark)
            .await
            .iter()
            .filter(|r| r.is_manifest("HEAD") && r.user_agent_starts_with(user_agent_prefix))
            .count()
    }

    /// Waits until the number of logged requests has stopped growing for
    /// 150 ms (bounded to about 3 s). Returns the final count.
    pub async fn wait_for_log_quiet(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = self.mark();
        let mut stable_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now = self.mark();
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(150) {
                return now;
            }
            if Instant::now() >= deadline {
                return now;
            }
        }
    }

    /// Waits (bounded by `timeout`) until at least `count` requests matching
    /// `pred` have been logged since `mark`; returns the matches seen.
    pub async fn wait_for_requests(
        &self,
        mark: usize,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&LoggedRequest) -> bool,
    ) -> Vec<LoggedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<_> = self
                .requests_since(mark)
                .into_iter()
                .filter(|r| pred(r))
                .collect();
            if seen.len() >= count || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes only `repo:tag` from storage (registry 2.8 has no tag-delete
    /// API): deletes `<root>/docker/registry/v2/repositories/<repo>/_manifests/tags/<tag>`.
    /// The manifest and other tags pointing at it are kept. The running
    /// registry sees the change immediately (no tag cache is configured).
    pub fn delete_tag_in_storage(&self, repo: &str, tag: &str) {
        assert!(
            !tag.is_empty() && !tag.contains('/') && !tag.contains(".."),
            "invalid tag {tag:?}"
        );
        let dir = self.tag_dir(repo, tag);
        assert!(
            dir.is_dir(),
            "tag {repo}:{tag} is not in storage (no {})",
            dir.display()
        );
        fs::remove_dir_all(&dir)
            .unwrap_or_else(|e| panic!("remove tag dir {}: {e}", dir.display()));
    }

    /// The registry's whole output (stdout and stderr) so far, for debugging.
    pub fn log_text(&self) -> String {
        match fs::read(self.log_path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Path of the log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Path of the generated `config.yml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn tag_dir(&self, repo: &str, tag: &str) -> PathBuf {
        self.storage_root()
            .join("docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
    }

    fn htpasswd_path(&self) -> PathBuf {
        self.dir.path().join("htpasswd")
    }

    fn write_htpasswd(&self) {
        let RegistryAuth::Htpasswd { user, password } = &self.options.auth else {
            return;
        };
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("run `htpasswd -Bbn` (install apache2-utils)");
        assert!(
            out.status.success(),
            "htpasswd -Bbn failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(self.htpasswd_path(), &out.stdout).expect("write htpasswd file");
    }

    fn write_config(&self) {
        let auth = match &self.options.auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Htpasswd { .. } => format!(
                "auth:\n  htpasswd:\n    realm: {:?}\n    path: {:?}\n",
                self.options.realm,
                self.htpasswd_path().display().to_string()
            ),
        };
        let notifications = match &self.options.notify {
            None => String::new(),
            Some((url, secret)) => {
                let headers = secret
                    .as_ref()
                    .map(|s| format!("      headers:\n        Authorization: [\"Bearer {s}\"]\n"))
                    .unwrap_or_default();
                format!(
                    "notifications:\n  endpoints:\n    - name: scanner\n      url: {url:?}\n{headers}\
                     \x20     timeout: 2s\n      threshold: 5\n      backoff: 1s\n"
                )
            }
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n{cache}  filesystem:\n    rootdirectory: {root:?}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: spcs-image-scanner-test-secret\n\
             {auth}{notifications}",
            root = self.storage_root().display().to_string(),
            port = self.port,
            cache = if self.options.blob_descriptor_cache {
                "  cache:\n    blobdescriptor: inmemory\n"
            } else {
                ""
            },
        );
        fs::write(self.config_path(), config).expect("write registry config.yml");
    }

    /// Spawns the child on `self.port` and waits for readiness; on failure
    /// the child is killed and a description returned.
    async fn launch_and_wait(&mut self) -> Result<(), String> {
        self.kill_child();
        self.write_config();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open log file: {e}"))?;
        let log_err: File = log.try_clone().map_err(|e| format!("clone log fd: {e}"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // REGISTRY_* variables override config.yml; never inherit them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        self.child = Some(child);

        let probe = format!("{}/v2/", self.url());
        let expected = match self.options.auth {
            RegistryAuth::Anonymous => 200,
            RegistryAuth::Htpasswd { .. } => 401,
        };
        let mut last_error = String::from("no probe made");
        for _ in 0..READY_TRIES {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("registry exited early with {status}"));
            }
            let port = self.port;
            let answer = tokio::task::spawn_blocking(move || probe_status(port))
                .await
                .map_err(|e| format!("probe task failed: {e}"))?;
            match answer {
                Ok(status) if status == expected => return Ok(()),
                Ok(status) => {
                    last_error = format!("GET {probe} answered {status}, expected {expected}")
                }
                Err(e) => last_error = format!("GET {probe}: {e}"),
            }
            tokio::time::sleep(READY_PAUSE).await;
        }
        self.kill_child();
        Err(format!("never became ready: {last_error}"))
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL: fast and deterministic; the filesystem driver writes
            // data via temp files + rename, so storage stays consistent.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill_child();
    }
}

/// `GET /v2/` over a plain HTTP/1.1 connection (no TLS stack, so no rustls
/// crypto provider is needed); returns the status code.
fn probe_status(port: u16) -> std::io::Result<u16> {
    use std::io::{Error, Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    write!(
        stream,
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {PROBE_USER_AGENT}\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    // "HTTP/1.1 200 OK"
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.trim().parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| Error::other(format!("not an HTTP response: {line:?}")))
}

/// Picks a free loopback port by binding port 0 and releasing it.
fn pick_free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a port");
    listener
        .local_addr()
        .expect("local address of the port-picking listener")
        .port()
}

/// Parses the combined-log lines of `text`, skipping everything else and any
/// unterminated last line (still being written).
pub fn parse_combined_log(text: &str) -> Vec<LoggedRequest> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete.lines().filter_map(parse_combined_line).collect()
}

/// Parses one line like
/// `127.0.0.1 - - [03/Dec/2026:17:40:30 +0000] "HEAD /v2/foo/manifests/x HTTP/1.1" 404 91 "" "curl/7.88.1"`.
pub fn parse_combined_line(line: &str) -> Option<LoggedRequest> {
    if line.starts_with("time=") {
        return None;
    }
    // Skip `host ident user [date]`.
    let after_date = &line[line.find("] \"")? + 2..];
    let (request, rest) = take_quoted(after_date)?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let rest = rest.trim_start();
    let (status, rest) = rest.split_once(' ')?;
    let status: u16 = status.parse().ok()?;
    let (size, rest) = rest.trim_start().split_once(' ')?;
    let bytes = size.parse().unwrap_or(0);
    let (_referer, rest) = take_quoted(rest.trim_start())?;
    let (user_agent, _) = take_quoted(rest.trim_start())?;
    Some(LoggedRequest {
        method,
        path,
        status,
        bytes,
        user_agent,
    })
}

/// Takes a `"..."` string (with `\"` and `\\` escapes) from the start of `s`.
fn take_quoted(s: &str) -> Option<(String, &str)> {
    let body = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, next) = chars.next()?;
                out.push(next);
            }
            '"' => return Some((out, &body[i + 1..])),
            c => out.push(c),
        }
    }
    None
}
