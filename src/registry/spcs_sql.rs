//! The SPCS fast path: an image repository's images, tags and digests from one
//! `SHOW IMAGES IN IMAGE REPOSITORY <db>.<schema>.<repo>` through Snowflake's SQL API v2
//! (`POST /api/v2/statements`), instead of a catalog, a tag list per image and a
//! manifest HEAD per tag.
//!
//! The watcher ([`crate::watcher`]) uses it when `registry.listing = "sql"`, and falls
//! back to the registry API for an image repository whenever this fails, and for good
//! when a digest it returns differs from the registry's manifest HEAD.
//!
//! Invariants:
//! - The session token is read from `registry.token_file` for every request (SPCS
//!   rewrites it), sent only as `Authorization: Bearer`, and never logged or put in an
//!   error. A 401 re-reads it and retries once.
//! - Every request has a timeout (`registry.request_timeout`); 429 is retried at most
//!   `registry.max_retries` times, a 202 is polled at most [`MAX_POLLS`] times, at most
//!   [`MAX_PARTITIONS`] partitions are read, each body at most [`MAX_BODY`] bytes, and an
//!   answer with more than [`MAX_ROWS`] rows is refused as a whole (a partial listing
//!   would look like removed tags).
//! - The statement is built only from a config entry checked by
//!   [`image_repository_identifier`] (unquoted identifiers), never from input.
//! - Rows are untrusted: image names, tags and digests are validated like the registry's
//!   ([`is_valid_repository_name`], [`is_valid_tag`], [`Digest::parse`]); a bad row is
//!   skipped and counted, never used. A tag listed with two digests is reported as a
//!   conflict, not guessed.
//! - Follow-up requests (polls, partitions) go only to `/api/v2/statements/<handle>` on
//!   the configured origin, with a validated handle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderMap};
use serde::Deserialize;
use tracing::debug;
use url::Url;

use super::auth::{AuthError, CredentialSource, Secret};
use super::{is_valid_repository_name, is_valid_tag};
use crate::config::{AuthConfig, Listing, RegistryConfig};
use crate::digest::Digest;

/// Most rows accepted from one image repository (SHOW commands return at most 10,000
/// rows per the docs; this leaves room without letting a hostile answer grow memory).
pub const MAX_ROWS: usize = 100_000;

/// Largest response body read (one partition, or the first answer).
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// Partitions followed per statement.
pub const MAX_PARTITIONS: usize = 1000;

/// Polls of a statement still running (202) before giving up.
pub const MAX_POLLS: u32 = 30;

const POLL_INITIAL: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(5);

/// Longest `Retry-After` honoured on a 429; beyond it the listing falls back at once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

const STATEMENTS_PATH: &str = "/api/v2/statements";

/// `db/schema/repo` → `db.schema.repo` when each part is an unquoted Snowflake
/// identifier (`[a-z_][a-z0-9_]*`, at most 255 characters): the only form the statement
/// is ever built from, so nothing from outside the config reaches the SQL text.
pub fn image_repository_identifier(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('/').collect();
    let identifier = |p: &&str| {
        let b = p.as_bytes();
        !b.is_empty()
            && b.len() <= 255
            && (b[0].is_ascii_lowercase() || b[0] == b'_')
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
    };
    (parts.len() == 3 && parts.iter().all(identifier)).then(|| parts.join("."))
}

/// What went wrong with one image repository's listing; the watcher falls back to the
/// registry API for it.
#[derive(Debug, thiserror::Error)]
#[error("SQL API {host}: SHOW IMAGES IN IMAGE REPOSITORY {image_repository}: {problem}")]
pub struct SqlError {
    pub host: String,
    pub image_repository: String,
    #[source]
    pub problem: Problem,
}

/// The failure itself. Messages never carry the token or a response body beyond the
/// SQL API's error code.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// An unexpected HTTP status (5xx, 403, 404, 408 ...).
    #[error("{status}")]
    Status { status: String },
    /// 422: the statement failed (no such repository, no privilege ...).
    #[error("statement failed: code {code:?}, sqlState {sql_state:?}")]
    Failed { code: String, sql_state: String },
    /// Still 401 after re-reading the token.
    #[error("unauthorized (the session token was refused twice)")]
    Unauthorized,
    /// Still 429 after the allowed retries, or asked to wait too long.
    #[error("throttled (429) after {0} tries")]
    Throttled(u32),
    /// No answer within `registry.request_timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, TLS ...
    #[error("request failed")]
    Transport(#[source] reqwest::Error),
    /// 202 after [`MAX_POLLS`] polls.
    #[error("statement still running after {0} polls")]
    StillRunning(u32),
    /// An answer that cannot be used (not JSON, missing columns, too large ...).
    #[error("invalid response: {0}")]
    Invalid(String),
    /// The token file could not be read.
    #[error("session token")]
    Credentials(#[source] AuthError),
}

/// One image repository as SHOW IMAGES lists it, validated.
#[derive(Debug, Clone, Default)]
pub struct ImageListing {
    /// `db/schema/repo/image` → tag → digest.
    pub images: BTreeMap<String, BTreeMap<String, Digest>>,
    /// Tags listed with more than one digest, by repository: neither is trusted.
    pub conflicts: BTreeMap<String, BTreeSet<String>>,
    /// Rows and tags skipped as invalid (bad names, digests, paths, cells).
    pub skipped: usize,
    /// Rows read.
    pub rows: usize,
    /// SQL API requests this listing took.
    pub requests: u64,
}

/// The SQL API client. One per watcher.
pub struct SqlLister {
    base: Url,
    host: String,
    credentials: CredentialSource,
    http: reqwest::Client,
    timeout: Duration,
    max_retries: u32,
    requests: AtomicU64,
}

/// The ResultSet / QueryStatus / QueryFailureStatus fields used.
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(rename = "resultSetMetaData")]
    meta: Option<Meta>,
    data: Option<Vec<serde_json::Value>>,
    code: Option<String>,
    #[serde(rename = "sqlState")]
    sql_state: Option<String>,
    #[serde(rename = "statementHandle")]
    handle: Option<String>,
    #[serde(rename = "statementStatusUrl")]
    status_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    #[serde(rename = "rowType", default)]
    row_type: Vec<Column>,
    #[serde(rename = "partitionInfo", default)]
    partitions: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Column {
    name: String,
}

/// Column positions of the SHOW IMAGES answer.
struct Columns {
    image_name: usize,
    tags: usize,
    digest: usize,
    image_path: Option<usize>,
}

impl SqlLister {
    /// The lister for `cfg` when `registry.listing = "sql"` (with SPCS auth), else
    /// `None`. Sends nothing yet.
    pub fn new(cfg: &RegistryConfig) -> Result<Option<Self>, Problem> {
        let Listing::Sql { url, .. } = &cfg.listing else {
            return Ok(None);
        };
        if !matches!(cfg.auth, AuthConfig::Spcs { .. }) {
            return Ok(None);
        }
        let http = super::http_client(cfg.request_timeout).map_err(Problem::Transport)?;
        Ok(Some(SqlLister {
            host: url.host_str().unwrap_or_default().to_string(),
            base: url.clone(),
            credentials: CredentialSource::new(cfg.auth.clone()),
            http,
            timeout: cfg.request_timeout,
            max_retries: cfg.max_retries,
            requests: AtomicU64::new(0),
        }))
    }

    /// SQL API requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Lists `image_repository` (`db/schema/repo`, a config entry).
    pub async fn list_images(&self, image_repository: &str) -> Result<ImageListing, SqlError> {
        let before = self.requests();
        let err = |problem| SqlError {
            host: self.host.clone(),
            image_repository: image_repository.to_string(),
            problem,
        };
        let identifier = image_repository_identifier(image_repository).ok_or_else(|| {
            err(Problem::Invalid(
                "not db/schema/repo of unquoted identifiers".into(),
            ))
        })?;
        let mut listing = self.run(image_repository, &identifier).await.map_err(err)?;
        listing.requests = self.requests() - before;
        Ok(listing)
    }

    async fn run(&self, image_repository: &str, identifier: &str) -> Result<ImageListing, Problem> {
        let statement = format!("SHOW IMAGES IN IMAGE REPOSITORY {identifier}");
        let body = serde_json::json!({
            "statement": statement,
            "timeout": self.timeout.as_secs().max(1),
            "parameters": { "query_tag": "spcs-image-scanner" },
        });
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut answer = self.post_statement(&body, &request_id).await?;
        // 202: poll the statement until it has a result.
        let mut polls = 0;
        let mut wait = POLL_INITIAL;
        while answer.0 == StatusCode::ACCEPTED {
            if polls >= MAX_POLLS {
                return Err(Problem::StillRunning(polls));
            }
            let handle = answer_handle(&answer.1)?;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POLL_MAX);
            polls += 1;
            answer = self.get_statement(&handle, None).await?;
        }
        let (_, first) = answer;
        let meta = first
            .meta
            .as_ref()
            .ok_or_else(|| Problem::Invalid("no resultSetMetaData".into()))?;
        let columns = columns(&meta.row_type)?;
        let mut listing = ImageListing::default();
        let mut rows = first.data.unwrap_or_default();
        check_rows(listing.rows + rows.len())?;
        listing.rows += rows.len();
        add_rows(image_repository, &columns, &rows, &mut listing);
        let partitions = meta.partitions.len();
        if partitions > MAX_PARTITIONS {
            return Err(Problem::Invalid(format!(
                "{partitions} partitions (at most {MAX_PARTITIONS})"
            )));
        }
        if partitions > 1 {
            let handle = first
                .handle
                .as_deref()
                .filter(|h| is_valid_handle(h))
                .ok_or_else(|| Problem::Invalid("partitioned result without a handle".into()))?
                .to_string();
            for n in 1..partitions {
                let (status, part) = self.get_statement(&handle, Some(n)).await?;
                if status != StatusCode::OK {
                    return Err(Problem::Status {
                        status: status.to_string(),
                    });
                }
                rows = part.data.unwrap_or_default();
                check_rows(listing.rows + rows.len())?;
                listing.rows += rows.len();
                add_rows(image_repository, &columns, &rows, &mut listing);
            }
        }
        Ok(listing)
    }

    async fn post_statement(
        &self,
        body: &serde_json::Value,
        request_id: &str,
    ) -> Result<(StatusCode, Answer), Problem> {
        let url = self.url(STATEMENTS_PATH)?;
        self.send(|retry| {
            let mut query = vec![("requestId", request_id.to_string())];
            if retry {
                // The documented idempotent retry: same requestId plus retry=true.
                query.push(("retry", "true".into()));
            }
            self.http
                .post(url.clone())
                .query(&query)
                .header(CONTENT_TYPE, "application/json")
                .json(body)
        })
        .await
    }

    async fn get_statement(
        &self,
        handle: &str,
        partition: Option<usize>,
    ) -> Result<(StatusCode, Answer), Problem> {
        let url = self.url(&format!("{STATEMENTS_PATH}/{handle}"))?;
        self.send(|_| {
            let request = self.http.get(url.clone());
            match partition {
                Some(n) => request.query(&[("partition", n.to_string())]),
                None => request,
            }
        })
        .await
    }

    fn url(&self, path: &str) -> Result<Url, Problem> {
        self.base
            .join(path)
            .map_err(|e| Problem::Invalid(format!("bad URL: {e}")))
    }

    /// One request with the fresh token, 401 → re-read and retry once, 429 → bounded
    /// retries. Returns 200 and 202 answers; everything else is a [`Problem`].
    async fn send(
        &self,
        build: impl Fn(bool) -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Answer), Problem> {
        let mut refused = false;
        let mut throttled = 0u32;
        let mut retry = false;
        loop {
            let token = self.token()?;
            let request = build(retry)
                .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
                .header("X-Snowflake-Authorization-Token-Type", "OAUTH")
                .header(ACCEPT, "application/json");
            self.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.send().await.map_err(|e| {
                if e.is_timeout() {
                    Problem::Timeout(self.timeout)
                } else {
                    Problem::Transport(e)
                }
            })?;
            let status = response.status();
            match status {
                StatusCode::OK | StatusCode::ACCEPTED => {
                    let headers = response.headers().clone();
                    let body = self.read_body(response).await?;
                    return Ok((status, parse_answer(&headers, &body)?));
                }
                StatusCode::UNAUTHORIZED if !refused => {
                    // SPCS rotates the token file; the next read has the new one.
                    debug!("SQL API refused the session token; re-reading it once");
                    refused = true;
                    retry = true;
                }
                StatusCode::UNAUTHORIZED => return Err(Problem::Unauthorized),
                StatusCode::TOO_MANY_REQUESTS => {
                    throttled += 1;
                    let wait =
                        retry_after(response.headers()).unwrap_or_else(|| backoff(throttled));
                    if throttled > self.max_retries || wait > MAX_RETRY_AFTER {
                        return Err(Problem::Throttled(throttled));
                    }
                    retry = true;
                    tokio::time::sleep(wait).await;
                }
                StatusCode::UNPROCESSABLE_ENTITY => {
                    let body = self.read_body(response).await.unwrap_or_default();
                    let failure: Option<Answer> = serde_json::from_slice(&body).ok();
                    let clip = |s: Option<String>| {
                        s.unwrap_or_default()
                            .chars()
                            .filter(|c| c.is_ascii_alphanumeric())
                            .take(16)
                            .collect::<String>()
                    };
                    let (code, sql_state) = match failure {
                        Some(f) => (clip(f.code), clip(f.sql_state)),
                        None => (String::new(), String::new()),
                    };
                    return Err(Problem::Failed { code, sql_state });
                }
                s => {
                    return Err(Problem::Status {
                        status: s.to_string(),
                    });
                }
            }
        }
    }

    fn token(&self) -> Result<Secret, Problem> {
        match self.credentials.read() {
            Ok(Some(c)) => Ok(c.password),
            Ok(None) => Err(Problem::Invalid("no session token configured".into())),
            Err(e) => Err(Problem::Credentials(e)),
        }
    }

    async fn read_body(&self, mut response: reqwest::Response) -> Result<Bytes, Problem> {
        let too_large = || Problem::Invalid(format!("body larger than {MAX_BODY} bytes"));
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }
        let mut buf = Vec::new();
        loop {
            let chunk = response.chunk().await.map_err(|e| {
                if e.is_timeout() {
                    Problem::Timeout(self.timeout)
                } else {
                    Problem::Transport(e)
                }
            })?;
            let Some(chunk) = chunk else { break };
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }
}

fn parse_answer(headers: &HeaderMap, body: &[u8]) -> Result<Answer, Problem> {
    let gzip = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("gzip"))
        || body.starts_with(&[0x1f, 0x8b]);
    if gzip {
        // reqwest is built without its gzip feature here; the registry API takes over.
        return Err(Problem::Invalid(
            "gzip-encoded answer (not supported by this build)".into(),
        ));
    }
    // A partition may come as a bare array of rows.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        let data: Vec<serde_json::Value> = serde_json::from_slice(body)
            .map_err(|_| Problem::Invalid("rows are not a JSON array".into()))?;
        return Ok(Answer {
            meta: None,
            data: Some(data),
            code: None,
            sql_state: None,
            handle: None,
            status_url: None,
        });
    }
    serde_json::from_slice(body).map_err(|e| {
        Problem::Invalid(format!(
            "not a ResultSet (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

/// The statement handle of a 202, from `statementHandle` or the last segment of
/// `statementStatusUrl`; validated so that a poll goes nowhere but
/// `/api/v2/statements/<handle>`.
fn answer_handle(answer: &Answer) -> Result<String, Problem> {
    let from_url = answer.status_url.as_deref().and_then(|u| {
        let path = u.split(['?', '#']).next().unwrap_or(u);
        path.rsplit('/').next().map(str::to_string)
    });
    answer
        .handle
        .clone()
        .or(from_url)
        .filter(|h| is_valid_handle(h))
        .ok_or_else(|| Problem::Invalid("202 without a usable statement handle".into()))
}

/// Handles are UUID-like: letters, digits, `-` and `_`.
fn is_valid_handle(handle: &str) -> bool {
    !handle.is_empty()
        && handle.len() <= 128
        && handle
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn columns(row_type: &[Column]) -> Result<Columns, Problem> {
    let find = |name: &str| {
        row_type
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    };
    let need = |name: &str| {
        find(name).ok_or_else(|| Problem::Invalid(format!("no column {name:?} in rowType")))
    };
    Ok(Columns {
        image_name: need("image_name")?,
        tags: need("tags")?,
        digest: need("digest")?,
        image_path: find("image_path"),
    })
}

fn check_rows(rows: usize) -> Result<(), Problem> {
    if rows > MAX_ROWS {
        return Err(Problem::Invalid(format!(
            "more than {MAX_ROWS} rows; refusing a partial listing"
        )));
    }
    Ok(())
}

/// `tags` as SHOW IMAGES prints it: a JSON array string (`["1.0","latest"]`, possibly
/// pretty-printed) or a comma list (`1.0,latest`). `None` when it is neither.
pub fn parse_tags(text: &str) -> Option<Vec<String>> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        return serde_json::from_str::<Vec<String>>(trimmed).ok();
    }
    Some(
        trimmed
            .split(',')
            .map(|t| t.trim().trim_matches('"').to_string())
            .filter(|t| !t.is_empty())
            .collect(),
    )
}

/// Validates and adds rows; bad rows and tags are counted in `listing.skipped`.
fn add_rows(
    image_repository: &str,
    columns: &Columns,
    rows: &[serde_json::Value],
    listing: &mut ImageListing,
) {
    for row in rows {
        if !add_row(image_repository, columns, row, listing) {
            listing.skipped += 1;
        }
    }
}

fn add_row(
    image_repository: &str,
    columns: &Columns,
    row: &serde_json::Value,
    listing: &mut ImageListing,
) -> bool {
    let Some(cells) = row.as_array() else {
        return false;
    };
    let cell = |i: usize| cells.get(i).and_then(serde_json::Value::as_str);
    let (Some(name), Some(tags), Some(digest)) = (
        cell(columns.image_name),
        cell(columns.tags),
        cell(columns.digest),
    ) else {
        return false;
    };
    let repository = format!("{image_repository}/{name}");
    if !is_valid_repository_name(&repository) {
        return false;
    }
    let Ok(digest) = Digest::parse(digest) else {
        return false;
    };
    // `image_path` (db/schema/repo/image:tag), when given, must name the same image:
    // a row that says otherwise is not trusted.
    if let Some(path) = columns.image_path.and_then(cell) {
        let path = path.trim().trim_start_matches('/');
        let image = path.split(['@']).next().unwrap_or(path);
        let image = match image.rsplit_once(':') {
            Some((before, tag)) if !tag.contains('/') => before,
            _ => image,
        };
        if !path.is_empty() && !image.eq_ignore_ascii_case(&repository) {
            return false;
        }
    }
    let Some(tags) = parse_tags(tags) else {
        return false;
    };
    let entry = listing.images.entry(repository.clone()).or_default();
    let mut bad_tags = 0;
    for tag in tags {
        if !is_valid_tag(&tag) {
            bad_tags += 1;
            continue;
        }
        match entry.get(&tag) {
            Some(existing) if *existing != digest => {
                listing
                    .conflicts
                    .entry(repository.clone())
                    .or_default()
                    .insert(tag);
            }
            Some(_) => {}
            None => {
                entry.insert(tag, digest.clone());
            }
        }
    }
    listing.skipped += bad_tags;
    true
}

/// `Retry-After` in seconds (the SQL API sends no dates).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// Exponential back-off with a little jitter for try `attempt` (1-based).
fn backoff(attempt: u32) -> Duration {
    let exp = Duration::from_millis(200).saturating_mul(1u32 << attempt.saturating_sub(1).min(8));
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 100)
        .unwrap_or(0);
    exp.min(Duration::from_secs(10)) + Duration::from_millis(u64::from(jitter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_unquoted_three_part_names() {
        assert_eq!(
            image_repository_identifier("db/schema/repo").as_deref(),
            Some("db.schema.repo")
        );
        assert_eq!(
            image_repository_identifier("_a/b1/c_2").as_deref(),
            Some("_a.b1.c_2")
        );
        for bad in [
            "db/schema",
            "db/schema/repo/x",
            "db/sch-ema/repo",
            "db/schema/re.po",
            "DB/schema/repo",
            "1db/schema/repo",
            "db//repo",
            "db/schema/repo;drop",
        ] {
            assert!(image_repository_identifier(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tags_come_as_json_arrays_or_comma_lists() {
        assert_eq!(
            parse_tags("[\n  \"1.0\",\n  \"latest\"\n]").unwrap(),
            vec!["1.0", "latest"]
        );
        assert_eq!(parse_tags("1.0, latest").unwrap(), vec!["1.0", "latest"]);
        assert_eq!(parse_tags("").unwrap(), Vec::<String>::new());
        assert_eq!(parse_tags("[]").unwrap(), Vec::<String>::new());
        assert!(parse_tags("[1, 2").is_none());
    }

    #[test]
    fn handles_cannot_steer_a_poll_elsewhere() {
        assert!(is_valid_handle("019c06a4-0000-1111-2222-abcdef"));
        for bad in ["", "../x", "a/b", "a?b", "a b", "%2e%2e"] {
            assert!(!is_valid_handle(bad), "{bad}");
        }
    }

    #[test]
    fn rows_are_validated_and_bad_ones_counted() {
        let columns = Columns {
            image_name: 0,
            tags: 1,
            digest: 2,
            image_path: Some(3),
        };
        let d = format!("sha256:{}", "a".repeat(64));
        let rows = serde_json::json!([
            ["app", "[\"1\",\"2\"]", d, "db/s/r/app:1"],
            ["../etc", "[\"1\"]", d, null],
            ["app", "[\"1\"]", "sha256:xyz", null],
            ["app", "[\"bad/tag\", \"3\"]", d, null],
            ["app", "[\"1\"]", d, "other/s/r/app:1"],
            [1, 2, 3],
            "not a row",
        ]);
        let mut listing = ImageListing::default();
        add_rows("db/s/r", &columns, rows.as_array().unwrap(), &mut listing);
        let tags = &listing.images["db/s/r/app"];
        assert_eq!(tags.keys().collect::<Vec<_>>(), ["1", "2", "3"]);
        // ../etc, bad digest, foreign image_path, non-string cells, not an array, bad tag.
        assert_eq!(listing.skipped, 6);
    }
}
