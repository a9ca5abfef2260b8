//! A loopback HTTP server that publishes vulnerability DBs for the grype stand-in
//! (`tests/standin/grype-standin-for-tests`) the way grype's v6 distribution does:
//! `<base>/v6/latest.json` names an archive next to it, with its sha256.
//!
//! The "DB" is the stand-in's JSON format (the shape of `tests/fixtures/advisories.json`),
//! not grype's SQLite DB: a test fixture, never a vulnerability database. [`Serve`] makes
//! the server misbehave (down, corrupt or truncated archive, slow download), and every
//! request is recorded so tests can assert on what was fetched.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use super::http1::read_request;

/// Base path of the published DBs (grype's default is `https://grype.anchore.io/databases`).
const BASE_PATH: &str = "/databases";
/// The file name inside `<cache>/6/` and inside the archive.
pub const DB_FILE: &str = "vulnerability.db";
/// The stand-in's import metadata, next to the DB.
pub const IMPORT_FILE: &str = "import.json";

/// The advisory fixture the builds start from.
pub fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/advisories.json")
}

/// `sha256:<hex>` of some bytes (the stand-in's digest and checksum format).
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One DB build: what `vulnerability.db` will hold.
#[derive(Debug, Clone)]
pub struct DbBuild {
    /// RFC 3339, e.g. `2026-12-02T00:00:00Z`.
    pub built: String,
    /// `vMODEL.REVISION.ADDITION`; the stand-in accepts model 6 only.
    pub schema_version: String,
    /// The `advisories` array, records as in `tests/fixtures/advisories.json`.
    pub advisories: Value,
}

impl DbBuild {
    /// The fixture's advisories and schema version, with this build time.
    pub fn from_fixture(built: &str) -> DbBuild {
        let text = fs::read_to_string(fixture_path()).expect("read tests/fixtures/advisories.json");
        let fixture: Value = serde_json::from_str(&text).expect("advisories.json is JSON");
        DbBuild {
            built: built.to_string(),
            schema_version: fixture["schema_version"]
                .as_str()
                .expect("fixture schema_version")
                .to_string(),
            advisories: fixture["advisories"].clone(),
        }
    }

    /// Adds one advisory record.
    pub fn with_advisory(mut self, advisory: Value) -> Self {
        self.advisories
            .as_array_mut()
            .expect("advisories is an array")
            .push(advisory);
        self
    }

    /// Drops every record with this `id`.
    pub fn without_advisory(mut self, id: &str) -> Self {
        self.advisories
            .as_array_mut()
            .expect("advisories is an array")
            .retain(|a| a["id"] != id);
        self
    }

    /// The bytes of `vulnerability.db` (pretty JSON, deterministic).
    pub fn db_bytes(&self) -> Vec<u8> {
        let doc = json!({
            "_comment": "TEST STAND-IN DB written by tests/support/db_server.rs from the records of \
                         tests/fixtures/advisories.json; read only by the grype stand-in. Not a \
                         vulnerability database.",
            "db_built": self.built,
            "schema_version": self.schema_version,
            "advisories": self.advisories,
        });
        let mut bytes = serde_json::to_vec_pretty(&doc).expect("serialize DB");
        bytes.push(b'\n');
        bytes
    }

    /// The archive name, like grype's `vulnerability-db_v6.1.3_<built>_<unix>.tar.gz`.
    pub fn archive_name(&self) -> String {
        let unix = chrono::DateTime::parse_from_rfc3339(&self.built)
            .map(|t| t.timestamp())
            .unwrap_or(0);
        format!(
            "vulnerability-db_{}_{}_{}.tar.gz",
            self.schema_version, self.built, unix
        )
    }

    /// A `.tar.gz` holding `vulnerability.db` and an `import.json` (which the stand-in
    /// ignores and rewrites on install). Deterministic for equal builds.
    pub fn archive(&self) -> Vec<u8> {
        let db = self.db_bytes();
        let import = serde_json::to_vec_pretty(&json!({
            "digest": sha256_digest(&db),
            "source": "tests/support/db_server.rs",
            "client_version": self.schema_version.trim_start_matches('v'),
        }))
        .expect("serialize import.json");
        let mtime = chrono::DateTime::parse_from_rfc3339(&self.built)
            .map(|t| t.timestamp().max(0) as u64)
            .unwrap_or(0);
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        for (name, data) in [(DB_FILE, &db), (IMPORT_FILE, &import)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(mtime);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, data.as_slice())
                .expect("append to tar");
        }
        tar.into_inner()
            .expect("finish tar")
            .finish()
            .expect("finish gzip")
    }

    /// Installs this build directly as `<cache_dir>/6/{vulnerability.db,import.json}`
    /// (replacing any `6/`), with `source` as import.json's source: seeds a cache dir
    /// without the server.
    pub fn write_db_dir(&self, cache_dir: &Path, source: &str) {
        let dir = cache_dir.join("6");
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("remove old <cache>/6");
        }
        fs::create_dir_all(&dir).expect("create <cache>/6");
        let db = self.db_bytes();
        fs::write(dir.join(DB_FILE), &db).expect("write vulnerability.db");
        let import = json!({
            "digest": sha256_digest(&db),
            "source": source,
            "client_version": "6.1.3",
        });
        fs::write(
            dir.join(IMPORT_FILE),
            serde_json::to_vec_pretty(&import).expect("serialize import.json"),
        )
        .expect("write import.json");
    }
}

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serve {
    /// Listing and archives as published.
    Normal,
    /// 503 for every request.
    Down,
    /// The listing is right, but archive downloads return other bytes of the same length
    /// (the client's checksum check must fail).
    CorruptArchive,
    /// Archives are cut in half and the listing's checksum is that of the cut bytes, so
    /// the checksum passes and unpacking fails.
    TruncatedArchive,
    /// Archive bodies are sent in 10 pieces spread over this long (headers at once).
    SlowArchive(Duration),
}

struct Published {
    build: DbBuild,
    name: String,
    archive: Vec<u8>,
}

struct State {
    mode: Serve,
    current: Published,
    /// Every archive ever published, by name (old listings' archives stay downloadable).
    archives: HashMap<String, Vec<u8>>,
    requests: Vec<(String, String, u16)>,
}

/// The update server; stops when dropped.
pub struct DbServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

enum Body {
    Bytes(Vec<u8>),
    Slow(Vec<u8>, Duration),
}

struct Answer {
    status: u16,
    content_type: &'static str,
    body: Body,
}

impl DbServer {
    /// Starts on a free loopback port, publishing `build`.
    pub async fn start(build: DbBuild) -> DbServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let current = publish_of(build);
        let state = Arc::new(Mutex::new(State {
            mode: Serve::Normal,
            archives: HashMap::from([(current.name.clone(), current.archive.clone())]),
            current,
            requests: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve_connection(stream, state).await;
                });
            }
        });
        DbServer { addr, state, task }
    }

    /// Base URL for `GRYPE_DB_UPDATE_URL` / `vulndb.update_url`:
    /// `http://127.0.0.1:PORT/databases`.
    pub fn url(&self) -> String {
        format!("http://{}{BASE_PATH}", self.addr)
    }

    /// `<url>/v6/latest.json`.
    pub fn listing_url(&self) -> String {
        format!("{}/v6/latest.json", self.url())
    }

    /// URL of the currently published archive.
    pub fn archive_url(&self) -> String {
        format!("{}/v6/{}", self.url(), self.state().current.name)
    }

    /// The currently published build.
    pub fn build(&self) -> DbBuild {
        self.state().current.build.clone()
    }

    /// Publishes a new build: the listing names it from now on.
    pub fn publish(&self, build: DbBuild) {
        let published = publish_of(build);
        let mut state = self.state();
        state
            .archives
            .insert(published.name.clone(), published.archive.clone());
        state.current = published;
    }

    /// Changes how the server answers from the next request on.
    pub fn set_mode(&self, mode: Serve) {
        self.state().mode = mode;
    }

    /// Requests so far: (method, path without query, status sent).
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        self.state().requests.clone()
    }

    /// How many archive downloads (GETs under `v6/` other than the listing) were answered.
    pub fn archive_requests(&self) -> usize {
        let listing = format!("{BASE_PATH}/v6/latest.json");
        self.requests()
            .iter()
            .filter(|(m, p, _)| m == "GET" && p.starts_with(BASE_PATH) && *p != listing)
            .count()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("db server state")
    }
}

impl Drop for DbServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn publish_of(build: DbBuild) -> Published {
    Published {
        name: build.archive_name(),
        archive: build.archive(),
        build,
    }
}

fn listing(build: &DbBuild, name: &str, archive: &[u8]) -> Vec<u8> {
    let doc = json!({
        "status": "active",
        "schemaVersion": build.schema_version,
        "built": build.built,
        "path": name,
        "checksum": sha256_digest(archive),
    });
    serde_json::to_vec(&doc).expect("serialize listing")
}

fn truncated(archive: &[u8]) -> Vec<u8> {
    archive[..archive.len() / 2].to_vec()
}

fn answer(state: &State, method: &str, path: &str) -> Answer {
    let text = |status: u16, body: &str| Answer {
        status,
        content_type: "text/plain",
        body: Body::Bytes(body.as_bytes().to_vec()),
    };
    if state.mode == Serve::Down {
        return text(503, "service unavailable (db_server Serve::Down)\n");
    }
    if method != "GET" && method != "HEAD" {
        return text(405, "method not allowed\n");
    }
    let Some(rest) = path
        .strip_prefix(BASE_PATH)
        .and_then(|p| p.strip_prefix("/v6/"))
    else {
        return text(404, "not found\n");
    };
    if rest == "latest.json" {
        let current = &state.current;
        let archive = match state.mode {
            Serve::TruncatedArchive => truncated(&current.archive),
            _ => current.archive.clone(),
        };
        return Answer {
            status: 200,
            content_type: "application/json",
            body: Body::Bytes(listing(&current.build, &current.name, &archive)),
        };
    }
    let Some(archive) = state.archives.get(rest) else {
        return text(404, "no such archive\n");
    };
    let body = match &state.mode {
        Serve::CorruptArchive => Body::Bytes(
            archive
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ 0x5a ^ (i as u8))
                .collect(),
        ),
        Serve::TruncatedArchive => Body::Bytes(truncated(archive)),
        Serve::SlowArchive(total) => Body::Slow(archive.clone(), *total),
        Serve::Normal | Serve::Down => Body::Bytes(archive.clone()),
    };
    Answer {
        status: 200,
        content_type: "application/gzip",
        body,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// `%XX` decoding of a request path (the archive names hold `:`, which clients may escape).
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if let Some(b) = escaped {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let Some(request) = read_request(&mut reader).await else {
            return Ok(());
        };
        let method = request.method.clone();
        let path = percent_decode(request.path());
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));

        let reply = {
            let mut state = state.lock().expect("db server state");
            let reply = answer(&state, &method, &path);
            state
                .requests
                .push((method.clone(), path.clone(), reply.status));
            reply
        };
        let body_len = match &reply.body {
            Body::Bytes(b) | Body::Slow(b, _) => b.len(),
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {body_len}\r\nConnection: {}\r\n\r\n",
            reply.status,
            reason(reply.status),
            reply.content_type,
            if close { "close" } else { "keep-alive" },
        );
        write.write_all(head.as_bytes()).await?;
        if method != "HEAD" {
            match reply.body {
                Body::Bytes(bytes) => write.write_all(&bytes).await?,
                Body::Slow(bytes, total) => {
                    let pieces = 10;
                    let size = bytes.len().div_ceil(pieces).max(1);
                    for chunk in bytes.chunks(size) {
                        write.write_all(chunk).await?;
                        write.flush().await?;
                        tokio::time::sleep(total / pieces as u32).await;
                    }
                }
            }
        }
        write.flush().await?;
        if close {
            return Ok(());
        }
    }
}
