//! Reading one HTTP/1.1 request off a connection, for the tests' small loopback servers
//! and proxies (they answer what a real registry cannot be made to do, or stand between
//! the daemon and one). Bodies are read by `Content-Length` only: the daemon sends no
//! chunked requests.

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

/// One request as it came in.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path with query.
    pub target: String,
    /// In arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// Reads the next request; `None` at the end of the connection, on an I/O error or on a
/// request line without a method and target (the caller closes the connection).
pub async fn read_request(reader: &mut (impl AsyncBufRead + Unpin)) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut request = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let length: usize = request
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    request.body = vec![0u8; length];
    if length > 0 {
        reader.read_exact(&mut request.body).await.ok()?;
    }
    Some(request)
}
