//! Configuration: a TOML file plus `SCANNER__SECTION__KEY` environment overrides,
//! deserialized into [`RawConfig`] and then validated into [`Config`].
//!
//! Invariants:
//! - Nothing starts (no store opened, no port bound, no request sent) before
//!   [`Config::load`] has returned `Ok`.
//! - Every error names the file (or environment variable) and the key, and says what
//!   would be accepted.
//! - The configuration holds no secret itself: passwords and tokens live in files that
//!   are read when needed ([`crate::registry::auth`]). Credentials inside the registry
//!   URL are refused, so printing the effective configuration never leaks one.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use url::Url;

/// Prefix of environment variables that override config keys, e.g. `SCANNER__REGISTRY__URL`.
pub const ENV_PREFIX: &str = "SCANNER__";

/// Where SPCS mounts the service's OAuth token (`/snowflake/session/token`).
pub const SPCS_TOKEN_FILE: &str = "/snowflake/session/token";

/// An error in the configuration; always names where it came from and which key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: cannot read file")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML parser's message, with line and column.
        message: String,
    },
    /// A key has a value of the wrong type, or is unknown.
    #[error("config {origin}: {key}: {message}")]
    Key {
        /// The file, or the environment variable, the value came from.
        origin: String,
        /// The dotted key, e.g. `registry.concurrency`.
        key: String,
        /// What is wrong and what would be accepted.
        message: String,
    },
}

impl ConfigError {
    fn key(origin: &str, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Key {
            origin: origin.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// How the daemon authenticates to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anonymous access.
    #[default]
    None,
    /// HTTP basic credentials: `username` and the password read from `password_file`.
    Basic,
    /// SPCS: username `0auth2accesstoken`, password = the content of `token_file`,
    /// re-read whenever a token is fetched and after every 401.
    Spcs,
}

/// How the watcher learns an SPCS registry's images, tags and digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListingMode {
    /// The OCI registry API: catalog, tag lists, one manifest HEAD per tag.
    #[default]
    Registry,
    /// `SHOW IMAGES IN IMAGE REPOSITORY` through Snowflake's SQL API: one request per
    /// image repository, the registry API as the fallback ([`crate::registry::spcs_sql`]).
    Sql,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise (SPCS sends stdout to the event table).
    #[default]
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// The file as written, before validation. Field names are the config keys.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// `[registry]`
    pub registry: RawRegistry,
    /// `[schedule]`
    pub schedule: RawSchedule,
    /// `[scanner]`
    pub scanner: RawScanner,
    /// `[vulndb]`
    pub vulndb: RawVulnDb,
    /// `[rescan]`
    pub rescan: RawRescan,
    /// `[state]`
    pub state: RawState,
    /// `[output]`
    pub output: RawOutput,
    /// `[log]`
    pub log: RawLog,
    /// `[api]`
    pub api: RawApi,
}

/// `[registry]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRegistry {
    pub url: String,
    pub auth: AuthMode,
    pub username: String,
    pub password_file: String,
    pub token_file: String,
    pub allow_insecure_http: bool,
    pub repositories: Vec<String>,
    pub image_repositories: Vec<String>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub tags_include: Vec<String>,
    pub tags_exclude: Vec<String>,
    pub max_tags_per_repository: i64,
    pub platform: String,
    pub concurrency: i64,
    pub request_timeout: String,
    pub max_retries: i64,
    pub listing: ListingMode,
    pub sql_url: String,
    pub sql_verify_sample: i64,
}

impl Default for RawRegistry {
    fn default() -> Self {
        RawRegistry {
            url: String::new(),
            auth: AuthMode::None,
            username: String::new(),
            password_file: String::new(),
            token_file: SPCS_TOKEN_FILE.to_string(),
            allow_insecure_http: false,
            repositories: Vec::new(),
            image_repositories: Vec::new(),
            include: vec!["**".to_string()],
            exclude: Vec::new(),
            tags_include: vec!["*".to_string()],
            tags_exclude: Vec::new(),
            max_tags_per_repository: 1000,
            platform: "linux/amd64".to_string(),
            concurrency: 16,
            request_timeout: "30s".to_string(),
            max_retries: 3,
            listing: ListingMode::Registry,
            sql_url: String::new(),
            sql_verify_sample: 1,
        }
    }
}

/// `[schedule]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSchedule {
    pub cron: String,
}

impl Default for RawSchedule {
    fn default() -> Self {
        RawSchedule {
            cron: "0 */5 * * * *".to_string(),
        }
    }
}

/// `[scanner]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScanner {
    pub syft: String,
    pub grype: String,
    pub concurrency: i64,
    pub timeout: String,
    pub retry_initial: String,
    pub retry_max: String,
}

impl Default for RawScanner {
    fn default() -> Self {
        RawScanner {
            syft: "syft".to_string(),
            grype: "grype".to_string(),
            concurrency: 2,
            timeout: "30m".to_string(),
            retry_initial: "5m".to_string(),
            retry_max: "6h".to_string(),
        }
    }
}

/// What to do when the vulnerability DB is older than `vulndb.max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnStale {
    /// Start no scan until a fresh DB arrives.
    #[default]
    Hold,
    /// Scan anyway and mark each result `stale_db`.
    ScanAndFlag,
}

/// `[vulndb]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawVulnDb {
    pub cache_dir: String,
    pub update_url: String,
    pub update_cron: String,
    pub update_timeout: String,
    pub max_age: String,
    pub on_stale: OnStale,
}

impl Default for RawVulnDb {
    fn default() -> Self {
        RawVulnDb {
            cache_dir: String::new(),
            update_url: String::new(),
            update_cron: "0 0 */6 * * *".to_string(),
            update_timeout: "15m".to_string(),
            max_age: "120h".to_string(),
            on_stale: OnStale::Hold,
        }
    }
}

/// `[rescan]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRescan {
    pub window: String,
    pub max_age: String,
    pub empty_sbom_retry: String,
}

impl Default for RawRescan {
    fn default() -> Self {
        RawRescan {
            window: "30d".to_string(),
            max_age: String::new(),
            empty_sbom_retry: "1h".to_string(),
        }
    }
}

/// `[state]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawState {
    pub dir: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            dir: "/state".to_string(),
        }
    }
}

/// `[output]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOutput {
    pub dir: String,
}

impl Default for RawOutput {
    fn default() -> Self {
        RawOutput {
            dir: "/output".to_string(),
        }
    }
}

/// `[log]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: LogFormat,
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: LogFormat::Auto,
            level: "info".to_string(),
        }
    }
}

/// `[api]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawApi {
    pub listen: String,
    pub event_secret_file: String,
    pub max_body_bytes: i64,
    pub request_timeout: String,
    pub ready_max_failing: String,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            listen: "0.0.0.0:8080".to_string(),
            event_secret_file: String::new(),
            max_body_bytes: 65536,
            request_timeout: "10s".to_string(),
            ready_max_failing: "15m".to_string(),
        }
    }
}

/// `[api]`, validated.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where the HTTP API listens; `None` (`listen = ""`) turns it off.
    pub listen: Option<std::net::SocketAddr>,
    /// A file holding the shared secret `POST /events/registry` must present as
    /// `Authorization: Bearer <secret>`; `None` accepts events without one.
    pub event_secret_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// `/readyz` fails once cycles have failed for longer than this.
    pub ready_max_failing: Duration,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    /// What was read, after environment overrides (for `check-config`).
    pub raw: RawConfig,
    pub registry: RegistryConfig,
    pub schedule: ScheduleConfig,
    pub scanner: ScannerConfig,
    pub vulndb: VulnDbConfig,
    pub rescan: RescanConfig,
    pub state_dir: PathBuf,
    pub output_dir: PathBuf,
    pub log: LogConfig,
    pub api: ApiConfig,
}

/// Where and how to reach the registry, and what to watch in it.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `scheme://host[:port]`, no path, no trailing slash.
    pub base_url: Url,
    /// `host[:port]` as used in image references (`registry:<host>/<repo>@<digest>`).
    pub host: String,
    /// The registry is reached over plain HTTP.
    pub plain_http: bool,
    pub auth: AuthConfig,
    pub repositories: Vec<String>,
    pub image_repositories: Vec<String>,
    pub include: Filter,
    pub exclude: Filter,
    pub tags_include: Filter,
    pub tags_exclude: Filter,
    pub max_tags_per_repository: usize,
    pub platform: Platform,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub max_retries: u32,
    /// `registry.listing`, with what the SQL listing needs.
    pub listing: Listing,
}

/// How images, tags and digests are listed (`registry.listing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listing {
    /// Catalog, tag lists and a manifest HEAD per tag.
    Registry,
    /// `SHOW IMAGES IN IMAGE REPOSITORY` per `image_repositories` entry.
    Sql {
        /// The SQL API origin (`https://$SNOWFLAKE_HOST`, or `registry.sql_url`).
        url: Url,
        /// Tags per image repository whose SQL digest is compared with a registry HEAD
        /// on every cycle after the first (the first compares every tag).
        verify_sample: usize,
    },
}

/// Credentials source; the secret itself stays in its file until needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    None,
    Basic {
        username: String,
        password_file: PathBuf,
    },
    Spcs {
        token_file: PathBuf,
    },
}

/// A compiled set of globs, with the patterns kept for display.
#[derive(Debug, Clone)]
pub struct Filter {
    pub patterns: Vec<String>,
    set: GlobSet,
}

impl Filter {
    fn new(
        origin: &str,
        key: &str,
        patterns: &[String],
        literal_separator: bool,
    ) -> Result<Self, ConfigError> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(literal_separator)
                .build()
                .map_err(|e| {
                    ConfigError::key(origin, key, format!("invalid glob {pattern:?}: {e}"))
                })?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| ConfigError::key(origin, key, e.to_string()))?;
        Ok(Filter {
            patterns: patterns.to_vec(),
            set,
        })
    }

    /// A filter from patterns known to be valid (tests, defaults).
    pub fn from_patterns(patterns: &[&str]) -> Self {
        let owned: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        let mut builder = GlobSetBuilder::new();
        for p in &owned {
            if let Ok(g) = Glob::new(p) {
                builder.add(g);
            }
        }
        Filter {
            patterns: owned,
            set: builder.build().unwrap_or_else(|_| GlobSet::empty()),
        }
    }

    /// True when any pattern matches.
    pub fn matches(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// The platform an index is resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(text: &str) -> Option<Platform> {
        let parts: Vec<&str> = text.split('/').collect();
        let valid =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Some(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Some(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => None,
        }
    }
}

/// `[schedule]`, validated.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    pub cron: String,
}

/// `[scanner]`, validated.
#[derive(Debug, Clone)]
pub struct ScannerConfig {
    pub syft: PathBuf,
    /// `None` means SBOM-only mode: inventory and SBOMs, no vulnerability matching.
    pub grype: Option<PathBuf>,
    pub concurrency: usize,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// `[vulndb]`, validated.
#[derive(Debug, Clone)]
pub struct VulnDbConfig {
    /// grype's `GRYPE_DB_CACHE_DIR` (`state.dir/grype-db` when not set).
    pub cache_dir: PathBuf,
    /// grype's `GRYPE_DB_UPDATE_URL` (a mirror); `None` keeps grype's default.
    pub update_url: Option<String>,
    pub update_cron: String,
    pub update_timeout: Duration,
    pub max_age: Duration,
    pub on_stale: OnStale,
}

/// `[rescan]`, validated.
#[derive(Debug, Clone)]
pub struct RescanConfig {
    /// Re-match only digests whose tags were seen within this window.
    pub window: Duration,
    /// Re-match results older than this even without a DB change; `None` = off.
    pub max_age: Option<Duration>,
    /// An empty SBOM is scanned again after this (doubling per attempt).
    pub empty_sbom_retry: Duration,
}

/// `[log]`, validated.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// The environment the config is resolved against: override variables and the
/// SPCS variables used to derive the registry URL. A seam for tests.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The process environment.
    pub fn from_process() -> Self {
        Environment {
            vars: std::env::vars().collect(),
        }
    }

    /// An explicit environment.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Environment {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

impl Config {
    /// Reads `path`, applies the environment overrides, and validates.
    pub fn load(path: &Path, env: &Environment) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text, env)
    }

    /// Parses TOML text as if read from `path`.
    pub fn from_toml(path: &Path, text: &str, env: &Environment) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string().trim_end().to_string(),
                })?;
        let overridden = apply_env_overrides(&mut table, env, &origin)?;
        // A bad value that came from the environment names the variable as well as the
        // file: the operator reading only the file would find nothing wrong in it.
        let blame = |e: ConfigError| match e {
            ConfigError::Key {
                origin,
                key,
                message,
            } => match overridden.get(&key) {
                Some(var) => ConfigError::Key {
                    origin: env_origin(&origin, var),
                    key,
                    message,
                },
                None => ConfigError::Key {
                    origin,
                    key,
                    message,
                },
            },
            other => other,
        };
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                ConfigError::key(&origin, &key, inner.message().to_string())
            })
            .map_err(blame)?;
        Self::validate(path, raw, env).map_err(blame)
    }

    /// Validates every key of `raw`.
    pub fn validate(path: &Path, raw: RawConfig, env: &Environment) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let o = origin.as_str();
        let r = &raw.registry;

        let auth = match r.auth {
            AuthMode::None => AuthConfig::None,
            AuthMode::Basic => {
                if r.username.trim().is_empty() {
                    return Err(ConfigError::key(
                        o,
                        "registry.username",
                        "required when auth = \"basic\"",
                    ));
                }
                if r.password_file.trim().is_empty() {
                    return Err(ConfigError::key(
                        o,
                        "registry.password_file",
                        "required when auth = \"basic\" (a file holding the password; the password itself never goes in the config)",
                    ));
                }
                let password_file = PathBuf::from(&r.password_file);
                check_readable_file(o, "registry.password_file", &password_file)?;
                AuthConfig::Basic {
                    username: r.username.clone(),
                    password_file,
                }
            }
            AuthMode::Spcs => {
                if r.token_file.trim().is_empty() {
                    return Err(ConfigError::key(
                        o,
                        "registry.token_file",
                        "required when auth = \"spcs\"",
                    ));
                }
                let token_file = PathBuf::from(&r.token_file);
                check_readable_file(o, "registry.token_file", &token_file)?;
                AuthConfig::Spcs { token_file }
            }
        };

        let url_text = if r.url.trim().is_empty() {
            if r.auth == AuthMode::Spcs {
                spcs_registry_url(env).ok_or_else(|| {
                    ConfigError::key(
                        o,
                        "registry.url",
                        "empty, and ORGNAME/ACCOUNTNAME are not both set to derive https://<org>-<account>.registry-local.snowflakecomputing.com",
                    )
                })?
            } else {
                return Err(ConfigError::key(
                    o,
                    "registry.url",
                    "required (e.g. \"http://127.0.0.1:5000\")",
                ));
            }
        } else {
            r.url.trim().to_string()
        };
        let (base_url, host, plain_http) = parse_registry_url(o, &url_text, r.allow_insecure_http)?;

        for (key, list) in [
            ("registry.repositories", &r.repositories),
            ("registry.image_repositories", &r.image_repositories),
        ] {
            for name in list {
                if !crate::registry::is_valid_repository_name(name) {
                    return Err(ConfigError::key(
                        o,
                        key,
                        format!(
                            "{name:?} is not a valid repository name (lowercase path components of [a-z0-9._-], separated by '/')"
                        ),
                    ));
                }
            }
        }

        let platform = Platform::parse(&r.platform).ok_or_else(|| {
            ConfigError::key(
                o,
                "registry.platform",
                format!(
                    "{:?} is not os/arch[/variant], e.g. \"linux/amd64\"",
                    r.platform
                ),
            )
        })?;

        let registry = RegistryConfig {
            base_url,
            host,
            plain_http,
            auth,
            repositories: r.repositories.clone(),
            image_repositories: r.image_repositories.clone(),
            include: Filter::new(o, "registry.include", &r.include, false)?,
            exclude: Filter::new(o, "registry.exclude", &r.exclude, false)?,
            tags_include: Filter::new(o, "registry.tags_include", &r.tags_include, false)?,
            tags_exclude: Filter::new(o, "registry.tags_exclude", &r.tags_exclude, false)?,
            max_tags_per_repository: positive(
                o,
                "registry.max_tags_per_repository",
                r.max_tags_per_repository,
                1_000_000,
            )?,
            platform,
            concurrency: positive(o, "registry.concurrency", r.concurrency, 1024)?,
            request_timeout: duration(o, "registry.request_timeout", &r.request_timeout)?,
            max_retries: non_negative(o, "registry.max_retries", r.max_retries, 20)?,
            listing: listing(o, r, env)?,
        };

        let cron = raw.schedule.cron.trim().to_string();
        validate_cron(o, "schedule.cron", &cron)?;

        let s = &raw.scanner;
        if s.syft.trim().is_empty() {
            return Err(ConfigError::key(
                o,
                "scanner.syft",
                "required: the syft executable (a name on PATH or a path)",
            ));
        }
        let scanner = ScannerConfig {
            syft: PathBuf::from(s.syft.trim()),
            grype: if s.grype.trim().is_empty() {
                None
            } else {
                Some(PathBuf::from(s.grype.trim()))
            },
            concurrency: positive(o, "scanner.concurrency", s.concurrency, 256)?,
            timeout: duration(o, "scanner.timeout", &s.timeout)?,
            retry_initial: duration(o, "scanner.retry_initial", &s.retry_initial)?,
            retry_max: duration(o, "scanner.retry_max", &s.retry_max)?,
        };
        if scanner.retry_max < scanner.retry_initial {
            return Err(ConfigError::key(
                o,
                "scanner.retry_max",
                "must not be shorter than scanner.retry_initial",
            ));
        }

        let state_dir = required_dir(o, "state.dir", &raw.state.dir)?;
        let output_dir = required_dir(o, "output.dir", &raw.output.dir)?;
        if state_dir == output_dir {
            return Err(ConfigError::key(
                o,
                "output.dir",
                "must differ from state.dir",
            ));
        }

        let v = &raw.vulndb;
        // Empty: no automatic updates (air-gapped: `db import` or a fresh snapshot).
        if !v.update_cron.trim().is_empty() {
            validate_cron(o, "vulndb.update_cron", v.update_cron.trim())?;
        }
        let update_url = if v.update_url.trim().is_empty() {
            None
        } else {
            let text = v.update_url.trim();
            let url = Url::parse(text).map_err(|e| {
                ConfigError::key(
                    o,
                    "vulndb.update_url",
                    format!("{text:?} is not a URL ({e})"),
                )
            })?;
            match url.scheme() {
                "https" => {}
                "http" if url.host_str().is_some_and(is_loopback_host) || r.allow_insecure_http => {
                }
                _ => {
                    return Err(ConfigError::key(
                        o,
                        "vulndb.update_url",
                        "must be https (plain http only to loopback, or with registry.allow_insecure_http)",
                    ));
                }
            }
            Some(text.to_string())
        };
        let vulndb = VulnDbConfig {
            cache_dir: if v.cache_dir.trim().is_empty() {
                state_dir.join("grype-db")
            } else {
                PathBuf::from(v.cache_dir.trim())
            },
            update_url,
            update_cron: v.update_cron.trim().to_string(),
            update_timeout: duration(o, "vulndb.update_timeout", &v.update_timeout)?,
            max_age: duration(o, "vulndb.max_age", &v.max_age)?,
            on_stale: v.on_stale,
        };
        let rescan = RescanConfig {
            window: duration(o, "rescan.window", &raw.rescan.window)?,
            max_age: if raw.rescan.max_age.trim().is_empty() {
                None
            } else {
                Some(duration(o, "rescan.max_age", &raw.rescan.max_age)?)
            },
            empty_sbom_retry: duration(o, "rescan.empty_sbom_retry", &raw.rescan.empty_sbom_retry)?,
        };

        let level = raw.log.level.trim().to_string();
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(ConfigError::key(
                o,
                "log.level",
                format!(
                    "{level:?} is not a level or filter (e.g. \"info\", \"debug\", \"spcs_image_scanner=debug\")"
                ),
            ));
        }

        let a = &raw.api;
        let listen = if a.listen.trim().is_empty() {
            None
        } else {
            Some(a.listen.trim().parse().map_err(|e| {
                ConfigError::key(
                    o,
                    "api.listen",
                    format!(
                        "{:?} is not ip:port ({e}), e.g. \"0.0.0.0:8080\"; \"\" turns the API off",
                        a.listen
                    ),
                )
            })?)
        };
        let event_secret_file = if a.event_secret_file.trim().is_empty() {
            None
        } else {
            let file = PathBuf::from(a.event_secret_file.trim());
            check_readable_file(o, "api.event_secret_file", &file)?;
            Some(file)
        };
        let api = ApiConfig {
            listen,
            event_secret_file,
            max_body_bytes: positive(o, "api.max_body_bytes", a.max_body_bytes, 16 * 1024 * 1024)?,
            request_timeout: duration(o, "api.request_timeout", &a.request_timeout)?,
            ready_max_failing: duration(o, "api.ready_max_failing", &a.ready_max_failing)?,
        };

        Ok(Config {
            source: path.to_path_buf(),
            api,
            registry,
            schedule: ScheduleConfig { cron },
            scanner,
            vulndb,
            rescan,
            state_dir,
            output_dir,
            log: LogConfig {
                format: raw.log.format,
                level,
            },
            raw,
        })
    }

    /// The effective configuration as TOML, for `check-config`. Holds no secret: the
    /// config refers to secret files and never contains their content.
    pub fn effective_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.registry.url = self
            .registry
            .base_url
            .as_str()
            .trim_end_matches('/')
            .to_string();
        toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// The running config after a reload from `new` (already validated): keys that can
    /// change while running ([`RELOADABLE`]) come from `new`, every other key keeps its
    /// running value. Returns that config, the keys applied and the keys that changed in
    /// the file but need a restart.
    pub fn reloaded(&self, new: &Config, env: &Environment) -> Result<Reload, ConfigError> {
        let old = flatten(&self.raw);
        let fresh = flatten(&new.raw);
        let mut merged = self.raw_table();
        let mut applied = Vec::new();
        let mut restart = Vec::new();
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(fresh.keys()).collect();
        for key in keys {
            if old.get(key) == fresh.get(key) {
                continue;
            }
            if !is_reloadable(key) {
                restart.push(key.clone());
                continue;
            }
            applied.push(key.clone());
            let (section, name) = key.split_once('.').unwrap_or((key.as_str(), ""));
            if let Some(toml::Value::Table(t)) = merged.get_mut(section) {
                match fresh.get(key) {
                    Some(v) => {
                        t.insert(name.to_string(), v.clone());
                    }
                    None => {
                        t.remove(name);
                    }
                }
            }
        }
        let raw: RawConfig =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: new.source.clone(),
                    message: e.to_string(),
                })?;
        let config = Config::validate(&new.source, raw, env)?;
        Ok(Reload {
            config,
            applied,
            restart,
        })
    }

    fn raw_table(&self) -> toml::Table {
        toml::Value::try_from(&self.raw)
            .ok()
            .and_then(|v| v.as_table().cloned())
            .unwrap_or_default()
    }
}

/// Keys a running daemon applies on SIGHUP; a prefix ending in `.` covers a section.
pub const RELOADABLE: &[&str] = &[
    "schedule.",
    "registry.",
    "scanner.concurrency",
    "rescan.",
    "vulndb.update_cron",
];

fn is_reloadable(key: &str) -> bool {
    RELOADABLE.iter().any(|r| {
        if r.ends_with('.') {
            key.starts_with(r)
        } else {
            key == *r
        }
    })
}

/// `section.key` → value.
fn flatten(raw: &RawConfig) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(raw) {
        for (section, value) in sections {
            if let toml::Value::Table(keys) = value {
                for (key, v) in keys {
                    out.insert(format!("{section}.{key}"), v);
                }
            }
        }
    }
    out
}

/// The outcome of [`Config::reloaded`].
#[derive(Debug, Clone)]
pub struct Reload {
    pub config: Config,
    /// Keys whose new value is now in effect.
    pub applied: Vec<String>,
    /// Keys that changed in the file but take effect only after a restart.
    pub restart: Vec<String>,
}

fn check_readable_file(origin: &str, key: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::key(
            origin,
            key,
            format!("{} is not a file", path.display()),
        )),
        Err(e) => Err(ConfigError::key(
            origin,
            key,
            format!("{}: {e}", path.display()),
        )),
    }
}

fn required_dir(origin: &str, key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::key(origin, key, "required: a directory"));
    }
    Ok(PathBuf::from(value.trim()))
}

fn positive(origin: &str, key: &str, value: i64, max: i64) -> Result<usize, ConfigError> {
    if value < 1 || value > max {
        return Err(ConfigError::key(
            origin,
            key,
            format!("{value} is out of range: must be 1..={max}"),
        ));
    }
    Ok(value as usize)
}

fn non_negative(origin: &str, key: &str, value: i64, max: i64) -> Result<u32, ConfigError> {
    if value < 0 || value > max {
        return Err(ConfigError::key(
            origin,
            key,
            format!("{value} is out of range: must be 0..={max}"),
        ));
    }
    Ok(value as u32)
}

fn duration(origin: &str, key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::key(
            origin,
            key,
            format!("{value:?} is not a duration ({e}); use e.g. \"30s\", \"5m\", \"1h\""),
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::key(origin, key, "must be longer than zero"));
    }
    Ok(d)
}

fn validate_cron(origin: &str, key: &str, cron: &str) -> Result<(), ConfigError> {
    let parsed = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(cron);
    if let Err(e) = parsed {
        return Err(ConfigError::key(
            origin,
            key,
            format!("{cron:?}: {e}; expected 6 fields with seconds first, e.g. \"0 */5 * * * *\""),
        ));
    }
    // The scheduler parses again with its own options; make sure it agrees.
    tokio_cron_scheduler::Job::new_async(cron, |_, _| Box::pin(async {})).map_err(|_| {
        ConfigError::key(
            origin,
            key,
            format!("{cron:?} is not accepted by the scheduler"),
        )
    })?;
    Ok(())
}

/// `https://<org>-<account>.registry-local.snowflakecomputing.com` from `ORGNAME` and
/// `ACCOUNTNAME`: lowercase, `_` replaced by `-` (hostnames cannot hold `_`).
pub fn spcs_registry_url(env: &Environment) -> Option<String> {
    let org = env.get("ORGNAME")?.trim();
    let account = env.get("ACCOUNTNAME")?.trim();
    if org.is_empty() || account.is_empty() {
        return None;
    }
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    Some(format!(
        "https://{}-{}.registry-local.snowflakecomputing.com",
        norm(org),
        norm(account)
    ))
}

fn parse_registry_url(
    origin: &str,
    text: &str,
    allow_insecure_http: bool,
) -> Result<(Url, String, bool), ConfigError> {
    let key = "registry.url";
    let url = Url::parse(text)
        .map_err(|e| ConfigError::key(origin, key, format!("{text:?} is not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::key(
            origin,
            key,
            "must not carry credentials; use registry.username and registry.password_file",
        ));
    }
    let plain_http = match url.scheme() {
        "https" => false,
        "http" => true,
        other => {
            return Err(ConfigError::key(
                origin,
                key,
                format!("scheme {other:?} is not http or https"),
            ));
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| ConfigError::key(origin, key, "has no host"))?
        .to_string();
    if url.path() != "/" && !url.path().is_empty() {
        return Err(ConfigError::key(
            origin,
            key,
            format!(
                "must be scheme://host[:port] without a path, got path {:?}",
                url.path()
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::key(
            origin,
            key,
            "must not have a query or fragment",
        ));
    }
    if plain_http && !allow_insecure_http && !is_loopback_host(&host) {
        return Err(ConfigError::key(
            origin,
            key,
            format!(
                "plain http to non-loopback host {host:?} is refused; use https, or set registry.allow_insecure_http = true"
            ),
        ));
    }
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut base = url.clone();
    base.set_path("");
    Ok((base, authority, plain_http))
}

/// `registry.listing` and the keys that go with `"sql"`.
fn listing(origin: &str, r: &RawRegistry, env: &Environment) -> Result<Listing, ConfigError> {
    if r.listing == ListingMode::Registry {
        return Ok(Listing::Registry);
    }
    let key = "registry.listing";
    if r.auth != AuthMode::Spcs {
        return Err(ConfigError::key(
            origin,
            key,
            "\"sql\" needs auth = \"spcs\" (the SQL API is called with the SPCS session token)",
        ));
    }
    if r.image_repositories.is_empty() {
        return Err(ConfigError::key(
            origin,
            key,
            "\"sql\" needs registry.image_repositories (SHOW IMAGES lists one image repository)",
        ));
    }
    for name in &r.image_repositories {
        if crate::registry::spcs_sql::image_repository_identifier(name).is_none() {
            return Err(ConfigError::key(
                origin,
                "registry.image_repositories",
                format!(
                    "{name:?}: with listing = \"sql\" each entry must be db/schema/repo, each part an unquoted identifier ([a-z_][a-z0-9_]*)"
                ),
            ));
        }
    }
    let sql_key = "registry.sql_url";
    let text = if r.sql_url.trim().is_empty() {
        match env.get("SNOWFLAKE_HOST").map(str::trim) {
            Some(host) if !host.is_empty() => format!("https://{host}"),
            _ => {
                return Err(ConfigError::key(
                    origin,
                    sql_key,
                    "empty, and SNOWFLAKE_HOST (set by SPCS) is not set to derive https://$SNOWFLAKE_HOST",
                ));
            }
        }
    } else {
        r.sql_url.trim().to_string()
    };
    let url = Url::parse(&text)
        .map_err(|e| ConfigError::key(origin, sql_key, format!("{text:?} is not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::key(
            origin,
            sql_key,
            "must not carry credentials (the session token is read from registry.token_file)",
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| ConfigError::key(origin, sql_key, format!("{text:?} has no host")))?;
    match url.scheme() {
        "https" => {}
        // The session token is a bearer credential: plain http only where it cannot leave
        // the machine (a test server), whatever allow_insecure_http says.
        "http" if is_loopback_host(host) => {}
        _ => {
            return Err(ConfigError::key(
                origin,
                sql_key,
                format!("{text:?} must be https (plain http only to loopback)"),
            ));
        }
    }
    if (url.path() != "/" && !url.path().is_empty()) || url.query().is_some() {
        return Err(ConfigError::key(
            origin,
            sql_key,
            format!("{text:?} must be scheme://host[:port] without a path or query"),
        ));
    }
    let mut url = url;
    url.set_path("");
    url.set_fragment(None);
    Ok(Listing::Sql {
        url,
        verify_sample: non_negative(
            origin,
            "registry.sql_verify_sample",
            r.sql_verify_sample,
            1000,
        )? as usize,
    })
}

/// True for `localhost`, 127.0.0.0/8 and ::1.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// Applies `SCANNER__SECTION__KEY=value` variables. The value is read according to
/// the type the key has in the defaults: strings verbatim, numbers and booleans parsed,
/// lists as a TOML array (`["a","b"]`) or comma-separated. Returns which variable set
/// each dotted key; errors name the file (`file`) and the variable.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &Environment,
    file: &str,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let defaults = toml::Table::try_from(RawConfig::default()).unwrap_or_default();
    let mut overridden = BTreeMap::new();
    for (name, value) in &env.vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let origin = env_origin(file, name);
        let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        let key = parts.join(".");
        let [section, field] = parts.as_slice() else {
            return Err(ConfigError::key(
                &origin,
                &key,
                "expected SCANNER__<SECTION>__<KEY>, e.g. SCANNER__REGISTRY__URL",
            ));
        };
        let Some(default) = defaults.get(section).and_then(|s| s.get(field)) else {
            return Err(ConfigError::key(&origin, &key, "unknown key"));
        };
        let parsed =
            parse_env_value(default, value).map_err(|m| ConfigError::key(&origin, &key, m))?;
        let section_table = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(t) => {
                t.insert(field.clone(), parsed);
                overridden.insert(key.clone(), name.clone());
            }
            _ => {
                return Err(ConfigError::key(
                    &origin,
                    section,
                    "is not a table in the config file",
                ));
            }
        }
    }
    Ok(overridden)
}

/// Where a value set by environment variable `var` came from, as errors show it.
fn env_origin(file: &str, var: &str) -> String {
    format!("{file} (environment variable {var})")
}

fn parse_env_value(default: &toml::Value, value: &str) -> Result<toml::Value, String> {
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(value.to_string())),
        toml::Value::Integer(_) => value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{value:?} is not an integer")),
        toml::Value::Boolean(_) => match value.trim() {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("{value:?} is not true or false")),
        },
        toml::Value::Array(_) => {
            let v = value.trim();
            if v.starts_with('[') {
                let t: toml::Table = format!("v = {v}").parse().map_err(|e: toml::de::Error| {
                    format!("{value:?} is not a TOML array: {}", e.message())
                })?;
                Ok(t.get("v")
                    .cloned()
                    .unwrap_or(toml::Value::Array(Vec::new())))
            } else if v.is_empty() {
                Ok(toml::Value::Array(Vec::new()))
            } else {
                Ok(toml::Value::Array(
                    v.split(',')
                        .map(|s| toml::Value::String(s.trim().to_string()))
                        .collect(),
                ))
            }
        }
        _ => Err("cannot be set from the environment".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml(
            Path::new("test.toml"),
            text,
            &Environment::from_pairs(env.iter().copied()),
        )
    }

    const MINIMAL: &str = "[registry]\nurl = \"http://127.0.0.1:5000\"\n[state]\ndir = \"/tmp/s\"\n[output]\ndir = \"/tmp/o\"\n";

    #[test]
    fn a_reload_applies_reloadable_keys_and_lists_the_rest() {
        let running = load(MINIMAL, &[]).unwrap();
        let text = format!(
            "{MINIMAL}[schedule]\ncron = \"0 0 * * * *\"\n[scanner]\nconcurrency = 5\ntimeout = \"1m\"\n\
             [log]\nlevel = \"debug\"\n[api]\nlisten = \"127.0.0.1:9\"\n"
        )
        .replace("[registry]\n", "[registry]\nexclude = [\"secret/**\"]\n");
        let fresh = load(&text, &[]).unwrap();
        let r = running.reloaded(&fresh, &Environment::default()).unwrap();
        assert_eq!(
            r.applied,
            ["registry.exclude", "scanner.concurrency", "schedule.cron"]
        );
        assert_eq!(r.restart, ["api.listen", "log.level", "scanner.timeout"]);
        assert_eq!(r.config.schedule.cron, "0 0 * * * *");
        assert_eq!(r.config.scanner.concurrency, 5);
        assert!(r.config.registry.exclude.matches("secret/x"));
        // Not applied: the running values stay.
        assert_eq!(r.config.scanner.timeout, running.scanner.timeout);
        assert_eq!(r.config.log.level, "info");
        assert_eq!(r.config.api.listen, running.api.listen);
        // Nothing changed: nothing listed.
        let same = running.reloaded(&running, &Environment::default()).unwrap();
        assert!(same.applied.is_empty() && same.restart.is_empty());
    }

    #[test]
    fn api_keys_are_validated() {
        let d = load(MINIMAL, &[]).unwrap();
        assert_eq!(d.api.listen, Some("0.0.0.0:8080".parse().unwrap()));
        let off = load(&format!("{MINIMAL}[api]\nlisten = \"\"\n"), &[]).unwrap();
        assert_eq!(off.api.listen, None);
        for (text, key) in [
            ("[api]\nlisten = \"localhost\"\n", "api.listen"),
            ("[api]\nmax_body_bytes = 0\n", "api.max_body_bytes"),
            ("[api]\nrequest_timeout = \"soon\"\n", "api.request_timeout"),
            (
                "[api]\nevent_secret_file = \"/nonexistent/secret\"\n",
                "api.event_secret_file",
            ),
            ("[api]\nport = 1\n", "api"),
        ] {
            let e = load(&format!("{MINIMAL}{text}"), &[]).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.registry.host, "127.0.0.1:5000");
        assert!(c.registry.plain_http);
        assert_eq!(c.registry.concurrency, 16);
        assert_eq!(c.registry.max_tags_per_repository, 1000);
        assert_eq!(c.registry.platform.to_string(), "linux/amd64");
        assert_eq!(c.schedule.cron, "0 */5 * * * *");
        assert_eq!(c.scanner.concurrency, 2);
        assert_eq!(c.scanner.timeout, Duration::from_secs(1800));
        assert_eq!(c.scanner.grype.as_deref(), Some(Path::new("grype")));
        assert!(c.registry.include.matches("a/b/c"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = load(&format!("{MINIMAL}\n[scanner]\nconcurency = 3\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("scanner"), "{e}");
        assert!(e.contains("concurency"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = load(
            "[registry]\nurl = \"http://127.0.0.1:5000\"\nconcurrency = \"many\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registry.concurrency"), "{e}");
    }

    #[test]
    fn zero_and_negative_concurrency_are_refused() {
        for v in ["0", "-3"] {
            let e = load(
                &format!(
                    "[registry]\nurl = \"http://127.0.0.1:5000\"\n[scanner]\nconcurrency = {v}\n"
                ),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("scanner.concurrency"), "{e}");
        }
    }

    #[test]
    fn vulndb_defaults_and_an_empty_update_cron() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.vulndb.cache_dir, Path::new("/tmp/s/grype-db"));
        assert_eq!(c.vulndb.update_cron, "0 0 */6 * * *");
        assert_eq!(c.vulndb.max_age, Duration::from_secs(120 * 3600));
        assert_eq!(c.vulndb.on_stale, OnStale::Hold);
        assert_eq!(c.rescan.window, Duration::from_secs(30 * 86400));
        assert_eq!(c.rescan.max_age, None);
        let c = load(
            &format!("{MINIMAL}[vulndb]\nupdate_cron = \"\"\non_stale = \"scan-and-flag\"\n"),
            &[],
        )
        .unwrap();
        assert!(c.vulndb.update_cron.is_empty());
        assert_eq!(c.vulndb.on_stale, OnStale::ScanAndFlag);
        let e = load(
            &format!("{MINIMAL}[vulndb]\nupdate_cron = \"daily\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vulndb.update_cron"), "{e}");
        let e = load(
            &format!("{MINIMAL}[vulndb]\nupdate_url = \"http://mirror.example.com/db\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vulndb.update_url"), "{e}");
        let e = load(&format!("{MINIMAL}[vulndb]\non_stale = \"ignore\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vulndb.on_stale") && e.contains("scan-and-flag"),
            "{e}"
        );
    }

    #[test]
    fn bad_cron_is_named() {
        let e = load(
            &format!("{MINIMAL}[schedule]\ncron = \"*/5 * * * *\"\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("schedule.cron"), "{e}");
    }

    #[test]
    fn plain_http_to_remote_host_needs_opt_in() {
        let e = load("[registry]\nurl = \"http://registry.example.com\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("registry.url") && e.contains("allow_insecure_http"),
            "{e}"
        );
        let ok = load(
            "[registry]\nurl = \"http://registry.example.com\"\nallow_insecure_http = true\n",
            &[],
        )
        .unwrap();
        assert!(ok.registry.plain_http);
    }

    #[test]
    fn credentials_in_url_are_refused() {
        let e = load(
            "[registry]\nurl = \"https://u:secret@r.example.com\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registry.url"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn env_overrides_by_type() {
        let c = load(
            MINIMAL,
            &[
                ("SCANNER__REGISTRY__URL", "http://127.0.0.1:6000"),
                ("SCANNER__REGISTRY__CONCURRENCY", "4"),
                ("SCANNER__REGISTRY__INCLUDE", "team/**, other/*"),
                ("SCANNER__REGISTRY__TAGS_INCLUDE", "[\"v*\"]"),
                ("SCANNER__SCANNER__GRYPE", ""),
            ],
        )
        .unwrap();
        assert_eq!(c.registry.host, "127.0.0.1:6000");
        assert_eq!(c.registry.concurrency, 4);
        assert_eq!(c.registry.include.patterns, vec!["team/**", "other/*"]);
        assert_eq!(c.registry.tags_include.patterns, vec!["v*"]);
        assert!(c.scanner.grype.is_none());
    }

    #[test]
    fn env_override_errors_name_the_variable() {
        let e = load(MINIMAL, &[("SCANNER__REGISTRY__CONCURRENCY", "lots")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SCANNER__REGISTRY__CONCURRENCY") && e.contains("registry.concurrency"),
            "{e}"
        );
        let e = load(MINIMAL, &[("SCANNER__REGISTRY__NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.nope") && e.contains("unknown"), "{e}");
    }

    #[test]
    fn an_env_value_that_fails_validation_names_the_variable_and_the_file() {
        // The file holds a good value; the error must point at the variable that
        // replaced it, not only at the file.
        let e = load(MINIMAL, &[("SCANNER__REGISTRY__CONCURRENCY", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml")
                && e.contains("SCANNER__REGISTRY__CONCURRENCY")
                && e.contains("registry.concurrency"),
            "{e}"
        );
    }

    #[test]
    fn spcs_url_is_derived_from_org_and_account() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let text = format!(
            "[registry]\nauth = \"spcs\"\ntoken_file = {:?}\n",
            token.display().to_string()
        );
        let c = load(
            &text,
            &[("ORGNAME", "MyOrg"), ("ACCOUNTNAME", "My_Account")],
        )
        .unwrap();
        assert_eq!(
            c.registry.host,
            "myorg-my-account.registry-local.snowflakecomputing.com"
        );
        assert!(!c.registry.plain_http);
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("registry.url") && e.contains("ORGNAME"), "{e}");
    }

    #[test]
    fn missing_token_file_in_spcs_mode_is_named() {
        let e = load("[registry]\nurl = \"https://r.example.com\"\nauth = \"spcs\"\ntoken_file = \"/nonexistent/token\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry.token_file"), "{e}");
    }

    #[test]
    fn basic_auth_needs_username_and_password_file() {
        let e = load(
            "[registry]\nurl = \"https://r.example.com\"\nauth = \"basic\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registry.username"), "{e}");
        let e = load(
            "[registry]\nurl = \"https://r.example.com\"\nauth = \"basic\"\nusername = \"u\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registry.password_file"), "{e}");
    }

    #[test]
    fn bad_auth_mode_lists_accepted_values() {
        let e = load(
            "[registry]\nurl = \"https://r.example.com\"\nauth = \"token\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("registry.auth") && e.contains("spcs"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        for file in ["config/scanner.toml", "config/local.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let table: toml::Table = text.parse().unwrap();
            let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            if file.ends_with("local.toml") {
                Config::validate(&path, raw, &Environment::default())
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            } else {
                assert_eq!(raw.registry.auth, AuthMode::Spcs);
                assert_eq!(raw.registry.token_file, SPCS_TOKEN_FILE);
            }
        }
    }
}
