//! A typed model of the Snowpark Container Services service specification (the YAML of
//! CREATE SERVICE / EXECUTE JOB SERVICE), as documented in Snowflake's specification
//! reference (docs.snowflake.com/en/developer-guide/snowpark-container-services/
//! specification-reference, block-storage-volume, snowflake-stage-volume).
//!
//! Every struct denies unknown fields, so a misspelled key (`volumeMount:`,
//! `readinesProbe:`) is an error rather than a silently ignored setting. Closed sets from
//! the reference are enums. Used by `tests/deployment.rs` through `#[path]`; the model
//! exists to reject what SPCS would not accept, so not every field is read.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file: `spec`, plus the optional top-level `capabilities` and `serviceRoles`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SpecFile {
    pub spec: Spec,
    pub capabilities: Option<Capabilities>,
    pub service_roles: Option<Vec<ServiceRole>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub containers: Vec<Container>,
    pub endpoints: Option<Vec<Endpoint>>,
    pub volumes: Option<Vec<Volume>>,
    pub log_exporters: Option<LogExporters>,
    pub platform_monitor: Option<PlatformMonitor>,
    /// Autoscaling policies: the reference leaves the content open (`{...}`).
    pub resource_management: Option<serde_norway::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    /// Values must be strings (quote numbers and booleans).
    pub env: Option<BTreeMap<String, String>>,
    pub readiness_probe: Option<Probe>,
    pub liveness_probe: Option<Probe>,
    pub volume_mounts: Option<Vec<VolumeMount>>,
    pub resources: Option<Resources>,
    pub mount_session_token: Option<bool>,
    pub session_token_config: Option<SessionTokenConfig>,
    pub secrets: Option<Vec<Secret>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    pub port: u16,
    pub path: String,
    pub period_seconds: Option<u32>,
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub requests: Option<ResourceAmounts>,
    pub limits: Option<ResourceAmounts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceAmounts {
    /// E.g. `2Gi`, `512M`, `0.4Gi` (units M, Mi, G, Gi).
    pub memory: Option<String>,
    /// CPU units, e.g. `1`, `0.5`.
    pub cpu: Option<f64>,
    #[serde(rename = "nvidia.com/gpu")]
    pub gpu: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionTokenConfig {
    pub path: Option<String>,
    pub permission: Option<String>,
    pub mount_connection_config: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Secret {
    pub snowflake_secret: SnowflakeSecret,
    pub directory_path: Option<String>,
    pub env_var_name: Option<String>,
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// `snowflakeSecret: <name>` or `snowflakeSecret: {objectName|objectReference: <name>}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SnowflakeSecret {
    Name(String),
    Object(SnowflakeSecretObject),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnowflakeSecretObject {
    pub object_name: Option<String>,
    pub object_reference: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecretKeyRef {
    Username,
    Password,
    SecretString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub name: String,
    pub port: Option<u16>,
    /// `<a>-<b>`, TCP and non-public endpoints only.
    pub port_range: Option<String>,
    /// Default false.
    pub public: Option<bool>,
    /// Default HTTP.
    pub protocol: Option<Protocol>,
    pub cors_settings: Option<CorsSettings>,
}

impl Endpoint {
    pub fn is_public(&self) -> bool {
        self.public.unwrap_or(false)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::Http)
    }
}

/// `TCP` or `HTTP` in the reference's syntax block; public and service-function
/// endpoints "must be HTTP(S)", hence `HTTPS` too.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Http,
    Https,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSettings {
    #[serde(rename = "Access-Control-Allow-Origin")]
    pub allow_origin: Option<Vec<String>>,
    #[serde(rename = "Access-Control-Allow-Methods")]
    pub allow_methods: Option<Vec<String>>,
    #[serde(rename = "Access-Control-Allow-Headers")]
    pub allow_headers: Option<Vec<String>>,
    #[serde(rename = "Access-Control-Expose-Headers")]
    pub expose_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    /// The deprecated `source: "@stage"` form is not accepted.
    pub source: VolumeSource,
    /// memory and block volumes only.
    pub size: Option<String>,
    /// stage volumes only.
    pub uid: Option<u32>,
    /// stage volumes only.
    pub gid: Option<u32>,
    pub block_config: Option<BlockConfig>,
    pub stage_config: Option<StageConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeSource {
    Local,
    Stage,
    Memory,
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BlockConfig {
    pub initial_contents: Option<InitialContents>,
    pub iops: Option<u32>,
    /// MiB/s.
    pub throughput: Option<u32>,
    pub encryption: Option<Encryption>,
    /// Default true for services, false for jobs.
    pub snapshot_on_delete: Option<bool>,
    /// `<hours>h` or `<days>d`.
    pub snapshot_delete_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InitialContents {
    pub from_snapshot: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Encryption {
    SnowflakeSse,
    SnowflakeFull,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StageConfig {
    /// `"@db.schema.stage/optional/folder"`.
    pub name: Option<String>,
    /// Only for static stage content.
    pub metadata_cache: Option<String>,
    pub resources: Option<Resources>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LogExporters {
    pub event_table_config: Option<EventTableConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventTableConfig {
    pub log_level: Option<LogLevel>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Info,
    Error,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlatformMonitor {
    pub metric_config: Option<MetricConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    pub groups: Vec<MetricGroup>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MetricGroup {
    System,
    SystemLimits,
    Status,
    Network,
    Storage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Capabilities {
    pub security_context: Option<SecurityContext>,
    /// Not in the official reference; seen only in a Snowflake employee's sample.
    pub snowflake_image_repository: Option<ImageRepositoryAccess>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecurityContext {
    pub execute_as_caller: Option<bool>,
    pub enable_custom_credentials: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageRepositoryAccess {
    pub read_write: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRole {
    pub name: String,
    pub endpoints: Vec<String>,
}

/// Parses a spec file's text; the error names the path of the offending key.
pub fn parse(text: &str) -> Result<SpecFile, String> {
    serde_norway::from_str(text).map_err(|e| e.to_string())
}
