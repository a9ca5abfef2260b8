//! Registry credentials: where they come from and how they are kept out of sight.
//!
//! Invariants:
//! - A password or token is read from its file every time it is needed
//!   ([`CredentialSource::read`]), so a rotated SPCS session token is picked up without a
//!   restart. Nothing caches it beyond one request or one client built from it.
//! - [`Secret`] never prints its content: `Debug` shows `[redacted]` and it has no
//!   `Display`. Callers that must hand the value on (an HTTP header, a child's
//!   environment) call [`Secret::expose`] at that one place.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::config::AuthConfig;

/// The user name SPCS expects with a session token as password.
pub const SPCS_USERNAME: &str = "0auth2accesstoken";

/// Longest credential file accepted: SPCS tokens are a few KiB; anything much larger is a
/// wrong path (a log file, a binary) and is refused rather than sent as a password.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A credential value that never shows up in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A user name and its password (or SPCS token).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

impl Credentials {
    /// `Basic base64(user:password)` for an `Authorization` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// A fingerprint that changes when the credentials change, without keeping them.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.username.as_bytes());
        h.update([0]);
        h.update(self.password.expose().as_bytes());
        h.finalize().into()
    }
}

/// A credential file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read (missing, unreadable, a directory).
    #[error("cannot read {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is empty or only whitespace.
    #[error("{what} file {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    /// The file is too large to be a credential.
    #[error(
        "{what} file {path} is larger than {MAX_SECRET_FILE_BYTES} bytes; is it the right file?"
    )]
    TooLarge { what: &'static str, path: PathBuf },
}

/// Reads credentials according to `registry.auth`.
#[derive(Debug, Clone)]
pub struct CredentialSource {
    config: AuthConfig,
}

impl CredentialSource {
    pub fn new(config: AuthConfig) -> Self {
        CredentialSource { config }
    }

    /// Reads the current credentials from their file; `None` for anonymous access.
    pub fn read(&self) -> Result<Option<Credentials>, AuthError> {
        match &self.config {
            AuthConfig::None => Ok(None),
            AuthConfig::Basic {
                username,
                password_file,
            } => Ok(Some(Credentials {
                username: username.clone(),
                password: read_secret_file("password", password_file)?,
            })),
            AuthConfig::Spcs { token_file } => Ok(Some(Credentials {
                username: SPCS_USERNAME.to_string(),
                password: read_secret_file("token", token_file)?,
            })),
        }
    }
}

fn read_secret_file(what: &'static str, path: &Path) -> Result<Secret, AuthError> {
    let read_err = |source| AuthError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_SECRET_FILE_BYTES {
        return Err(AuthError::TooLarge {
            what,
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let value = text.trim();
    if value.is_empty() {
        return Err(AuthError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(Secret::new(value))
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="..."`.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value (RFC 7235 auth-params, quoted or not).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = match header.split_once(char::is_whitespace) {
        Some((s, p)) => (s, p),
        None => (header, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (quoted[..end].to_string(), &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        match key.as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            "scope" => scope = Some(value),
            _ => {}
        }
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let c = Credentials {
            username: "u".into(),
            password: Secret::new("hunter2"),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn token_file_is_reread_on_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let source = CredentialSource::new(AuthConfig::Spcs {
            token_file: path.clone(),
        });
        let a = source.read().unwrap().unwrap();
        assert_eq!(a.username, SPCS_USERNAME);
        assert_eq!(a.password.expose(), "first");
        std::fs::write(&path, "second").unwrap();
        let b = source.read().unwrap().unwrap();
        assert_eq!(b.password.expose(), "second");
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn empty_or_missing_token_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  \n").unwrap();
        let source = CredentialSource::new(AuthConfig::Spcs {
            token_file: path.clone(),
        });
        assert!(matches!(source.read(), Err(AuthError::Empty { .. })));
        std::fs::remove_file(&path).unwrap();
        let e = source.read().unwrap_err().to_string();
        assert!(
            e.contains("token file") && e.contains(&path.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn parses_bearer_and_basic_challenges() {
        assert_eq!(
            parse_challenge("Basic realm=\"Registry Realm\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                "Bearer realm=\"https://auth.example.com/token\",service=\"registry.example.com\",scope=\"registry:catalog:*\""
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("registry:catalog:*".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=https://a/t, service=s"),
            Some(Challenge::Bearer {
                realm: "https://a/t".into(),
                service: Some("s".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
    }
}
