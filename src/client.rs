//! `spcs-image-scanner status` and `rescan`: clients of a running daemon's HTTP API.
//!
//! The endpoint is `--endpoint`, else `SPCS_IMAGE_SCANNER_ENDPOINT`, else derived from
//! `api.listen` in the config (`0.0.0.0` and `::` become loopback).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use url::Url;

use crate::commands::CommandError;
use crate::config::Config;

/// How long a client call may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What `rescan` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RescanScope {
    All,
    Repository(String),
    Image(String),
}

fn usage(message: impl Into<String>) -> CommandError {
    CommandError {
        message: message.into(),
        setup: true,
    }
}

fn runtime(message: impl Into<String>) -> CommandError {
    CommandError {
        message: message.into(),
        setup: false,
    }
}

/// The API base URL from the flag, the environment or the config.
pub fn endpoint(flag: Option<&str>, config: Option<&Config>) -> Result<Url, CommandError> {
    let text = match (flag, config) {
        (Some(f), _) => f.to_string(),
        (None, Some(c)) => {
            let addr = c
                .api
                .listen
                .ok_or_else(|| usage("the API is off (api.listen = \"\"): give --endpoint"))?;
            let ip = if addr.ip().is_unspecified() {
                if addr.is_ipv4() {
                    "127.0.0.1".to_string()
                } else {
                    "[::1]".to_string()
                }
            } else if addr.is_ipv6() {
                format!("[{}]", addr.ip())
            } else {
                addr.ip().to_string()
            };
            format!("http://{ip}:{}", addr.port())
        }
        (None, None) => return Err(usage("no endpoint: give --endpoint or a config")),
    };
    let url =
        Url::parse(&text).map_err(|e| usage(format!("--endpoint {text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(usage(format!("--endpoint {text:?}: must be http or https")));
    }
    Ok(url)
}

fn client() -> Result<reqwest::Client, CommandError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .user_agent(crate::registry::USER_AGENT)
        .build()
        .map_err(|e| runtime(format!("cannot build an HTTP client: {e}")))
}

async fn call(
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<(reqwest::StatusCode, Value), CommandError> {
    let response = request
        .send()
        .await
        .map_err(|e| runtime(format!("{what}: {}", crate::scanner::error_chain(&e))))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|e| runtime(format!("{what}: answer is not JSON: {e}")))?;
    Ok((status, body))
}

fn api_error(what: &str, status: reqwest::StatusCode, body: &Value) -> CommandError {
    let message = body["error"].as_str().unwrap_or("no message");
    let field = body["field"]
        .as_str()
        .map(|f| format!(" (field {f})"))
        .unwrap_or_default();
    let e = format!("{what}: {status}: {message}{field}");
    if status.is_client_error() {
        usage(e)
    } else {
        runtime(e)
    }
}

/// `GET /status`, as JSON or a readable summary.
pub async fn status(endpoint: &Url, as_json: bool) -> Result<String, CommandError> {
    let url = endpoint.join("status").map_err(|e| usage(e.to_string()))?;
    let what = format!("GET {url}");
    let (code, body) = call(client()?.get(url), &what).await?;
    if !code.is_success() {
        return Err(api_error(&what, code, &body));
    }
    if as_json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        ));
    }
    Ok(render_status(&body))
}

/// The readable form of `/status`.
pub fn render_status(s: &Value) -> String {
    let mut out = String::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let _ = writeln!(
        out,
        "spcs-image-scanner {} (up since {})",
        text(&s["version"]),
        text(&s["started_at"])
    );
    let _ = writeln!(
        out,
        "registry     {}",
        text(&s["config"]["registry"]["url"])
    );
    let _ = writeln!(
        out,
        "schedule     {}",
        text(&s["config"]["schedule"]["cron"])
    );
    let db = &s["vulndb"];
    let age = db["age_seconds"]
        .as_i64()
        .map(|a| humantime::format_duration(Duration::from_secs(a.max(0) as u64)).to_string())
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "vuln DB      {} (built {}, age {})",
        text(&db["readiness"]),
        text(&db["built"]),
        age
    );
    let c = &s["last_cycle"];
    if c.is_null() {
        let _ = writeln!(out, "last cycle   none yet");
    } else {
        let _ = writeln!(
            out,
            "last cycle   {} {} in {} ms: {} tags, {} added, {} moved, {} removed, {} queued, {} registry requests{}",
            text(&c["finished_at"]),
            text(&c["scope"]),
            text(&c["duration_ms"]),
            text(&c["tags"]),
            text(&c["added"]),
            text(&c["moved"]),
            text(&c["removed"]),
            text(&c["queued"]),
            text(&c["registry_requests"]),
            if c["ok"] == json!(false) {
                format!(" FAILED: {}", text(&c["error"]))
            } else {
                String::new()
            }
        );
    }
    let q = &s["queue"];
    let _ = writeln!(
        out,
        "queue        manual {}, new {}, rematch {}; running {}; requests waiting {}",
        text(&q["depth"]["manual"]),
        text(&q["depth"]["new"]),
        text(&q["depth"]["rematch"]),
        text(&q["running"]),
        text(&q["requests_pending"])
    );
    let statuses = ["pending", "scanning", "scanned", "failed", "unsupported"];
    let _ = writeln!(out, "images       {}", text(&s["images"]["total"]));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<48} {:>8} {:>8} {:>8} {:>8} {:>11}",
        "REPOSITORY", "pending", "scanning", "scanned", "failed", "unsupported"
    );
    let repos: BTreeMap<String, Value> = s["repositories"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for (repo, counts) in &repos {
        let n: Vec<u64> = statuses
            .iter()
            .map(|st| counts[*st].as_u64().unwrap_or(0))
            .collect();
        let _ = writeln!(
            out,
            "{:<48} {:>8} {:>8} {:>8} {:>8} {:>11}",
            repo, n[0], n[1], n[2], n[3], n[4]
        );
    }
    if let Some(failures) = s["recent_failures"].as_array().filter(|f| !f.is_empty()) {
        let _ = writeln!(out);
        let _ = writeln!(out, "recent failures:");
        for f in failures.iter().take(10) {
            let _ = writeln!(
                out,
                "  {} {} {} {}",
                text(&f["at"]),
                text(&f["what"]),
                f["digest"].as_str().unwrap_or(""),
                text(&f["error"])
            );
        }
    }
    out
}

/// `POST /rescan`; prints the request id.
pub async fn rescan(
    endpoint: &Url,
    scope: &RescanScope,
    force: bool,
) -> Result<String, CommandError> {
    let url = endpoint.join("rescan").map_err(|e| usage(e.to_string()))?;
    let body = match scope {
        RescanScope::All => json!({ "scope": "all", "force": force }),
        RescanScope::Repository(r) => json!({ "scope": "repository", "target": r, "force": force }),
        RescanScope::Image(i) => json!({ "scope": "image", "target": i, "force": force }),
    };
    let what = format!("POST {url}");
    let (code, answer) = call(client()?.post(url).json(&body), &what).await?;
    if code != reqwest::StatusCode::ACCEPTED {
        return Err(api_error(&what, code, &answer));
    }
    Ok(format!(
        "rescan {} accepted: request {}{} (follow it at {})\n",
        answer["scope"].as_str().unwrap_or(""),
        answer["request_id"].as_str().unwrap_or(""),
        if answer["coalesced"] == json!(true) {
            ", joined a request for the same scope"
        } else {
            ""
        },
        endpoint
            .join(
                answer["status_url"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches('/')
            )
            .map(|u| u.to_string())
            .unwrap_or_default()
    ))
}
