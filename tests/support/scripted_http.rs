//! A tiny HTTP/1.1 server on a free loopback port that answers from a script: for
//! misbehaviour that a real docker-registry cannot be made to show (429 with
//! `Retry-After`, 5xx, looping pagination, foreign `Link`s, bearer challenges). It records
//! every request it got, so tests assert on request counts and headers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use super::http1::read_request;

/// A request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path with query.
    pub target: String,
    /// Header names lowercased.
    pub headers: BTreeMap<String, String>,
}

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Handler = dyn Fn(&Received, usize) -> Reply + Send + Sync;

/// The server; stops when dropped.
pub struct ScriptedServer {
    pub port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedServer {
    /// Starts a server; `handler` gets each request and how many came before it.
    pub async fn start(
        handler: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let Some(request) = read_request(&mut reader).await else {
                            return;
                        };
                        let request = Received {
                            method: request.method,
                            target: request.target,
                            headers: request.headers.into_iter().collect(),
                        };
                        let seen = {
                            let mut log = log.lock().expect("log");
                            log.push(request.clone());
                            log.len() - 1
                        };
                        let reply = handler(&request, seen);
                        let mut text = format!("HTTP/1.1 {} X\r\n", reply.status);
                        for (k, v) in &reply.headers {
                            text.push_str(&format!("{k}: {v}\r\n"));
                        }
                        text.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
                        if request.method != "HEAD" {
                            text.push_str(&reply.body);
                        }
                        if write.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ScriptedServer {
            port,
            received,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("log").clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
