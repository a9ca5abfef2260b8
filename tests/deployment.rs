//! Offline checks of the deployment files: the SPCS specifications (`spec/*.yaml`), the
//! `Dockerfile` and `.dockerignore`, and how they fit the daemon (its env vars, its API
//! paths and port, its config) and the SQL that deploys them (`sql/*.sql`).
//!
//! Nothing here needs Snowflake, a network or a docker engine. Everything read is inside
//! the repository. Each rule is a small function returning the problems it finds
//! (`file: key: what is wrong`); the tests assert there are none, and feed the same
//! functions broken samples to show each rule can fail.

#[path = "support/spcs_spec.rs"]
mod spcs_spec;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use spcs_image_scanner::api::{FUNCTION_RESCAN_PATH, READYZ_PATH};
use spcs_image_scanner::config::{ENV_PREFIX, SPCS_TOKEN_FILE};
use spcs_spec::{Protocol, SpecFile, VolumeSource};

/// Long-running services: may have endpoints, must have the readiness probe.
const SERVICE_SPECS: [&str; 1] = ["spec/service.yaml"];
/// Job services: run to completion, cannot serve service functions (no endpoints).
const JOB_SPECS: [&str; 2] = ["spec/job.yaml", "spec/db-seed-job.yaml"];
/// The service's private HTTP endpoint (the API, the service function's target).
const API_ENDPOINT: &str = "api";
/// The liveness probe's path (the API's health route).
const LIVENESS_PATH: &str = "/healthz";
/// The oldest grype that reads the current DB schema (v6.1.3+).
const MIN_GRYPE: (u64, u64, u64) = (0, 97, 0);
/// The daemon's exit code for a bad config (`EXIT_USAGE` in src/main.rs).
const EXIT_USAGE: i32 = 64;
/// The daemon's own binary name (the image's ENTRYPOINT).
const BINARY: &str = "spcs-image-scanner";

// ---------------------------------------------------------------------------------------
// Reading the repository

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn load_spec(rel: &str) -> SpecFile {
    spcs_spec::parse(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn all_specs() -> impl Iterator<Item = &'static str> {
    SERVICE_SPECS.into_iter().chain(JOB_SPECS)
}

fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// `text` with `from` replaced by `to`; panics when `from` is not there, so a broken
/// sample can never pass because the sample was not broken.
fn mutate(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "sample: {from:?} not found");
    text.replacen(from, to, 1)
}

/// Asserts that `problems` is not empty and one of them contains `needle`.
fn assert_flagged(sample: &str, problems: &[String], needle: &str) {
    assert!(
        problems.iter().any(|p| p.contains(needle)),
        "{sample}: expected a problem mentioning {needle:?}, got {problems:#?}"
    );
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// True if `word` occurs in `text` not as part of a longer identifier.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------------------
// 1. Spec files: typed, strict, and the rules the reference gives

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    Job,
}

/// Everything wrong with one spec file's text.
fn spec_problems(file: &str, text: &str, kind: Kind) -> Vec<String> {
    let spec = match spcs_spec::parse(text) {
        Ok(s) => s,
        Err(e) => return vec![format!("{file}: {e}")],
    };
    let mut p = Vec::new();
    p.extend(check_names(file, &spec));
    p.extend(check_volume_mounts(file, &spec));
    p.extend(check_volumes(file, &spec));
    p.extend(check_resources(file, &spec));
    p.extend(check_endpoints(file, &spec, kind));
    p.extend(check_service_roles(file, &spec));
    p.extend(check_templates_documented(file, text));
    p
}

/// The reference's rule for container names (applied to volume names too): at most 63
/// characters, lowercase letters, digits and '-', starting with a letter, ending with a
/// letter or digit.
fn is_spcs_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn check_names(file: &str, spec: &SpecFile) -> Vec<String> {
    let mut p = Vec::new();
    if spec.spec.containers.is_empty() {
        p.push(format!("{file}: spec.containers: empty"));
    }
    let containers = spec.spec.containers.iter().map(|c| ("containers", &c.name));
    let volumes = spec
        .spec
        .volumes
        .iter()
        .flatten()
        .map(|v| ("volumes", &v.name));
    let mut seen = BTreeSet::new();
    for (list, name) in containers.chain(volumes) {
        if !is_spcs_name(name) {
            p.push(format!(
                "{file}: spec.{list}: name {name:?} breaks the naming rule (<= 63 chars of [a-z0-9-], starts with a letter, ends with a letter or digit)"
            ));
        }
        if !seen.insert((list, name)) {
            p.push(format!(
                "{file}: spec.{list}: name {name:?} is declared twice"
            ));
        }
    }
    p
}

fn check_volume_mounts(file: &str, spec: &SpecFile) -> Vec<String> {
    let mut p = Vec::new();
    let declared: BTreeSet<&str> = spec
        .spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mut mounted = BTreeSet::new();
    for c in &spec.spec.containers {
        let mut paths = BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            let key = format!("spec.containers[{}].volumeMounts[{}]", c.name, m.name);
            if !declared.contains(m.name.as_str()) {
                p.push(format!(
                    "{file}: {key}: names no volume declared in spec.volumes"
                ));
            }
            mounted.insert(m.name.as_str());
            if !m.mount_path.starts_with('/') {
                p.push(format!(
                    "{file}: {key}.mountPath: {:?} is not absolute",
                    m.mount_path
                ));
            }
            let normal = m.mount_path.trim_end_matches('/').to_string();
            if !paths.insert(normal) {
                p.push(format!(
                    "{file}: {key}.mountPath: {:?} is mounted twice in this container",
                    m.mount_path
                ));
            }
        }
    }
    for v in &declared {
        if !mounted.contains(v) {
            p.push(format!(
                "{file}: spec.volumes[{v}]: declared but mounted by no container"
            ));
        }
    }
    p
}

/// `<integer>Gi` within 1..=65536 (AWS), as a number of GiB.
fn block_size_gib(size: &str) -> Option<u32> {
    let n = size.strip_suffix("Gi")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|g| (1..=65536).contains(g))
}

fn check_volumes(file: &str, spec: &SpecFile) -> Vec<String> {
    let mut p = Vec::new();
    let mut blocks = 0;
    for v in spec.spec.volumes.iter().flatten() {
        let key = format!("spec.volumes[{}]", v.name);
        let is = |s: VolumeSource| v.source == s;
        if is(VolumeSource::Block) {
            blocks += 1;
            match &v.size {
                None => p.push(format!("{file}: {key}.size: required for a block volume")),
                Some(s) if block_size_gib(s).is_none() => p.push(format!(
                    "{file}: {key}.size: {s:?} is not an integer with the Gi suffix in 1Gi..65536Gi"
                )),
                Some(_) => {}
            }
        }
        if is(VolumeSource::Stage) {
            let name = v.stage_config.as_ref().and_then(|s| s.name.as_deref());
            if name.is_none_or(|n| n.trim().is_empty()) {
                p.push(format!(
                    "{file}: {key}.stageConfig.name: required for a stage volume"
                ));
            }
        }
        if v.size.is_some() && !is(VolumeSource::Block) && !is(VolumeSource::Memory) {
            p.push(format!(
                "{file}: {key}.size: only memory and block volumes have a size"
            ));
        }
        if (v.uid.is_some() || v.gid.is_some()) && !is(VolumeSource::Stage) {
            p.push(format!(
                "{file}: {key}.uid/gid: only stage volumes take uid/gid"
            ));
        }
        if v.block_config.is_some() && !is(VolumeSource::Block) {
            p.push(format!("{file}: {key}.blockConfig: only for block volumes"));
        }
        if v.stage_config.is_some() && !is(VolumeSource::Stage) {
            p.push(format!("{file}: {key}.stageConfig: only for stage volumes"));
        }
    }
    if blocks > 3 {
        p.push(format!(
            "{file}: spec.volumes: {blocks} block volumes, at most 3 per service"
        ));
    }
    p
}

/// Bytes of a memory quantity with unit M, Mi, G or Gi (e.g. `2Gi`, `0.4Gi`, `512M`).
fn memory_bytes(text: &str) -> Option<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let factor = match unit {
        "M" => 1e6,
        "Mi" => 1_048_576.0,
        "G" => 1e9,
        "Gi" => 1_073_741_824.0,
        _ => return None,
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn resource_problems(file: &str, key: &str, r: &spcs_spec::Resources) -> Vec<String> {
    let mut p = Vec::new();
    let mut memory = BTreeMap::new();
    for (side, amounts) in [("requests", &r.requests), ("limits", &r.limits)] {
        let Some(a) = amounts else { continue };
        if let Some(m) = &a.memory {
            match memory_bytes(m) {
                Some(b) => {
                    memory.insert(side, b);
                }
                None => p.push(format!(
                    "{file}: {key}.{side}.memory: {m:?} is not a number with unit M, Mi, G or Gi"
                )),
            }
        }
        if a.cpu.is_some_and(|c| c <= 0.0) {
            p.push(format!("{file}: {key}.{side}.cpu: must be positive"));
        }
    }
    if let (Some(req), Some(lim)) = (memory.get("requests"), memory.get("limits")) {
        if req > lim {
            p.push(format!(
                "{file}: {key}: requests.memory is above limits.memory"
            ));
        }
    }
    let cpu = |a: &Option<spcs_spec::ResourceAmounts>| a.as_ref().and_then(|a| a.cpu);
    if let (Some(req), Some(lim)) = (cpu(&r.requests), cpu(&r.limits)) {
        if req > lim {
            p.push(format!("{file}: {key}: requests.cpu is above limits.cpu"));
        }
    }
    p
}

fn check_resources(file: &str, spec: &SpecFile) -> Vec<String> {
    let mut p = Vec::new();
    for c in &spec.spec.containers {
        if let Some(r) = &c.resources {
            let key = format!("spec.containers[{}].resources", c.name);
            p.extend(resource_problems(file, &key, r));
        }
    }
    for v in spec.spec.volumes.iter().flatten() {
        if let Some(r) = v.stage_config.as_ref().and_then(|s| s.resources.as_ref()) {
            let key = format!("spec.volumes[{}].stageConfig.resources", v.name);
            p.extend(resource_problems(file, &key, r));
        }
    }
    p
}

fn check_endpoints(file: &str, spec: &SpecFile, kind: Kind) -> Vec<String> {
    let mut p = Vec::new();
    let endpoints = spec.spec.endpoints.as_deref().unwrap_or_default();
    if kind == Kind::Job && !endpoints.is_empty() {
        p.push(format!(
            "{file}: spec.endpoints: a job service cannot have endpoints (service functions cannot target jobs)"
        ));
    }
    let mut names = BTreeSet::new();
    for e in endpoints {
        let key = format!("spec.endpoints[{}]", e.name);
        if !names.insert(e.name.as_str()) {
            p.push(format!("{file}: {key}: declared twice"));
        }
        if e.port.is_some() == e.port_range.is_some() {
            p.push(format!(
                "{file}: {key}: needs exactly one of port and portRange"
            ));
        }
        if e.port_range.is_some() && (e.is_public() || e.protocol() != Protocol::Tcp) {
            p.push(format!(
                "{file}: {key}.portRange: only for non-public TCP endpoints"
            ));
        }
        if e.is_public() && e.protocol() == Protocol::Tcp {
            p.push(format!(
                "{file}: {key}.protocol: a public endpoint must be HTTP(S)"
            ));
        }
    }
    if kind == Kind::Service {
        match endpoints.iter().find(|e| e.name == API_ENDPOINT) {
            None => p.push(format!(
                "{file}: spec.endpoints: no endpoint {API_ENDPOINT:?} (the API, target of the service function)"
            )),
            Some(e) => {
                if e.is_public() {
                    p.push(format!(
                        "{file}: spec.endpoints[{API_ENDPOINT}].public: must be false (the API has no login of its own)"
                    ));
                }
                if e.protocol() != Protocol::Http {
                    p.push(format!(
                        "{file}: spec.endpoints[{API_ENDPOINT}].protocol: must be HTTP (service functions need HTTP)"
                    ));
                }
            }
        }
    }
    p
}

fn check_service_roles(file: &str, spec: &SpecFile) -> Vec<String> {
    let endpoints: BTreeSet<&str> = spec
        .spec
        .endpoints
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    let mut p = Vec::new();
    for role in spec.service_roles.iter().flatten() {
        if role.endpoints.is_empty() {
            p.push(format!(
                "{file}: serviceRoles[{}].endpoints: empty",
                role.name
            ));
        }
        for e in &role.endpoints {
            if !endpoints.contains(e.as_str()) {
                p.push(format!(
                    "{file}: serviceRoles[{}].endpoints: {e:?} is not a declared endpoint",
                    role.name
                ));
            }
        }
    }
    p
}

/// The names of the `{{ name }}` (or `{{ name | default(...) }}`) template values in
/// `text`, outside comments.
fn template_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            let Some(len) = rest[start..].find("}}") else {
                break;
            };
            let inner = &rest[start + 2..start + len];
            names.insert(inner.split('|').next().unwrap_or("").trim().to_string());
            rest = &rest[start + len + 2..];
        }
    }
    names
}

/// The comment lines the file starts with.
fn header_comment(text: &str) -> String {
    text.lines()
        .take_while(|l| l.trim_start().starts_with('#') || l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_templates_documented(file: &str, text: &str) -> Vec<String> {
    let header = header_comment(text);
    template_names(text)
        .into_iter()
        .filter(|name| !contains_word(&header, name))
        .map(|name| {
            format!("{file}: {{{{ {name} }}}}: template value not documented in the header comment")
        })
        .collect()
}

#[test]
fn every_spec_file_is_checked() {
    let known: BTreeSet<&str> = all_specs().collect();
    for path in files_under(&repo().join("spec")) {
        let r = rel(&path);
        if r.ends_with(".yaml") || r.ends_with(".yml") {
            assert!(
                known.contains(r.as_str()),
                "{r}: not in SERVICE_SPECS or JOB_SPECS of tests/deployment.rs"
            );
        }
    }
}

#[test]
fn spec_files_parse_strictly_and_follow_the_reference() {
    for file in SERVICE_SPECS {
        assert_no_problems(file, &spec_problems(file, &read(file), Kind::Service));
    }
    for file in JOB_SPECS {
        assert_no_problems(file, &spec_problems(file, &read(file), Kind::Job));
    }
}

#[test]
fn spec_model_rejects_misspelled_keys() {
    let service = read("spec/service.yaml");
    for (from, to, needle) in [
        ("volumeMounts:", "volumeMount:", "volumeMount"),
        ("readinessProbe:", "readinesProbe:", "readinesProbe"),
        ("fromSnapshot:", "fromSnapShot:", "fromSnapShot"),
        ("serviceRoles:", "serviceRole:", "serviceRole"),
        ("source: block", "source: blok", "blok"),
        ("protocol: HTTP", "protocol: GRPC", "GRPC"),
        ("logLevel: INFO", "logLevel: DEBUG", "DEBUG"),
        ("system_limits", "system_limit", "system_limit"),
    ] {
        let sample = mutate(&service, from, to);
        let problems = spec_problems("sample", &sample, Kind::Service);
        assert_flagged(&format!("{from} -> {to}"), &problems, needle);
    }
}

#[test]
fn spec_rules_reject_broken_samples() {
    let service = read("spec/service.yaml");
    let job = read("spec/job.yaml");
    let cases: [(&str, &str, &str, Kind, &str); 14] = [
        (
            &service,
            "- name: scanner",
            "- name: Scanner_1",
            Kind::Service,
            "naming rule",
        ),
        (
            &service,
            "- name: state\n    source",
            "- name: -state\n    source",
            Kind::Service,
            "naming rule",
        ),
        (
            &service,
            "- name: results\n      mountPath",
            "- name: result\n      mountPath",
            Kind::Service,
            "names no volume",
        ),
        (
            &service,
            "mountPath: /state",
            "mountPath: state",
            Kind::Service,
            "not absolute",
        ),
        (
            &service,
            "mountPath: /state",
            "mountPath: /grype-db",
            Kind::Service,
            "mounted twice",
        ),
        (
            &service,
            "size: 20Gi",
            "size: 20G",
            Kind::Service,
            "Gi suffix",
        ),
        (
            &service,
            "size: 20Gi",
            "size: 70000Gi",
            Kind::Service,
            "1Gi..65536Gi",
        ),
        (
            &service,
            "source: stage\n",
            "source: stage\n    size: 1Gi\n",
            Kind::Service,
            "only memory and block",
        ),
        (
            &service,
            "name: \"{{ results_stage }}\"",
            "metadataCache: 1h",
            Kind::Service,
            "stageConfig.name",
        ),
        (
            &service,
            "memory: 6Gi",
            "memory: 6GB",
            Kind::Service,
            "unit M, Mi, G or Gi",
        ),
        (
            &service,
            "public: false",
            "public: true",
            Kind::Service,
            "must be false",
        ),
        (
            &service,
            "endpoints: [api]",
            "endpoints: [apí]",
            Kind::Service,
            "not a declared endpoint",
        ),
        (
            &job,
            "  volumes:",
            "  endpoints:\n  - name: api\n    port: 8080\n  volumes:",
            Kind::Job,
            "cannot have endpoints",
        ),
        (
            &job,
            "image_repositories => '\"app_db/app_schema/app_repo\"')",
            ")",
            Kind::Job,
            "not documented",
        ),
    ];
    for (text, from, to, kind, needle) in cases {
        let sample = mutate(text, from, to);
        assert_flagged(
            &format!("{from:?} -> {to:?}"),
            &spec_problems("sample", &sample, kind),
            needle,
        );
    }
    // A fourth block volume, and an undocumented template value.
    let four = mutate(
        &service,
        "\n  - name: results\n    source",
        "\n  - {name: b3, source: block, size: 1Gi}\n  - {name: b4, source: block, size: 1Gi}\n  - name: results\n    source",
    );
    assert_flagged(
        "4 block volumes",
        &check_volumes("sample", &spcs_spec::parse(&four).unwrap()),
        "at most 3",
    );
    let undocumented = mutate(
        &service,
        "SCANNER__LOG__FORMAT: json",
        "SCANNER__LOG__FORMAT: \"{{ log_format }}\"",
    );
    assert_flagged(
        "template",
        &check_templates_documented("sample", &undocumented),
        "log_format",
    );
}

#[test]
fn job_template_values_are_the_services() {
    // job.yaml documents its values "as in service.yaml": each must be one of those.
    let service = template_names(&read("spec/service.yaml"));
    let job = template_names(&read("spec/job.yaml"));
    let extra: Vec<_> = job.difference(&service).collect();
    assert!(
        extra.is_empty(),
        "spec/job.yaml: template values {extra:?} are not in spec/service.yaml, whose header documents them"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Env vars: every one a spec sets is one the daemon reads; README documents them

/// String literals that follow `needle` (e.g. `env = "` → the name) in `text`.
fn literals_after(text: &str, needle: &str) -> Vec<String> {
    text.match_indices(needle)
        .filter_map(|(i, _)| {
            let rest = &text[i + needle.len()..];
            rest.find('"').map(|end| rest[..end].to_string())
        })
        .collect()
}

/// Every string literal in the `const PASSTHROUGH_ENV` array of src/scanner/mod.rs.
fn passthrough_env() -> Vec<String> {
    let text = read("src/scanner/mod.rs");
    let start = text
        .find("const PASSTHROUGH_ENV")
        .expect("src/scanner/mod.rs: no const PASSTHROUGH_ENV");
    let body = &text[start..];
    let body = &body[body
        .find("= [")
        .expect("src/scanner/mod.rs: PASSTHROUGH_ENV = [")
        + 3..];
    let body = &body[..body.find("];").expect("end of PASSTHROUGH_ENV")];
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// The env var names the daemon reads: clap `env = "…"` attributes, `env.get("…")` and
/// `std::env::var("…")` calls in src/ (outside unit tests), and the variables it passes
/// through to syft and grype.
fn daemon_env_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = passthrough_env().into_iter().collect();
    for path in files_under(&repo().join("src")) {
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for needle in ["env = \"", "env.get(\"", "env::var(\"", "env::var_os(\""] {
            names.extend(literals_after(code, needle));
        }
    }
    names
}

/// The `section.key` names of config/scanner.toml (which lists every key).
fn config_keys() -> BTreeSet<String> {
    let config: toml::Table = read("config/scanner.toml")
        .parse()
        .expect("config/scanner.toml");
    config
        .iter()
        .filter_map(|(s, v)| v.as_table().map(|t| (s, t)))
        .flat_map(|(s, t)| t.keys().map(move |k| format!("{s}.{k}")))
        .collect()
}

/// `SCANNER__REGISTRY__URL` → `registry.url`.
fn override_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    (parts.len() == 2).then(|| parts.join("."))
}

fn env_var_problems(
    file: &str,
    names: &BTreeSet<String>,
    daemon: &BTreeSet<String>,
    keys: &BTreeSet<String>,
) -> Vec<String> {
    let mut p = Vec::new();
    for name in names {
        if name.starts_with(ENV_PREFIX) {
            match override_key(name) {
                Some(key) if keys.contains(&key) => {}
                Some(key) => p.push(format!(
                    "{file}: env {name}: {key} is not a key of config/scanner.toml"
                )),
                None => p.push(format!(
                    "{file}: env {name}: not of the form SCANNER__<SECTION>__<KEY>"
                )),
            }
        } else if !daemon.contains(name) {
            p.push(format!(
                "{file}: env {name}: the daemon does not read this variable"
            ));
        }
    }
    p
}

fn spec_env(spec: &SpecFile) -> BTreeMap<String, String> {
    spec.spec
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn the_env_scan_finds_what_the_daemon_is_known_to_read() {
    let names = daemon_env_names();
    for known in [
        "SPCS_IMAGE_SCANNER_CONFIG",
        "SPCS_IMAGE_SCANNER_ENDPOINT",
        "RUST_LOG",
        "ORGNAME",
        "ACCOUNTNAME",
        "PATH",
        "HTTPS_PROXY",
    ] {
        assert!(
            names.contains(known),
            "scan of src/ missed {known}: {names:?}"
        );
    }
}

#[test]
fn spec_env_vars_are_ones_the_daemon_reads() {
    let daemon = daemon_env_names();
    let keys = config_keys();
    for file in all_specs() {
        let names = spec_env(&load_spec(file)).into_keys().collect();
        assert_no_problems(file, &env_var_problems(file, &names, &daemon, &keys));
    }
    let bad: BTreeSet<String> = [
        "SCANNER__REGISTRY__IMAGE_REPOSITORYS",
        "SCANNER__URL",
        "GRYPE_DB_CACHE_DIR",
    ]
    .map(String::from)
    .into();
    let problems = env_var_problems("sample", &bad, &daemon, &keys);
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

/// Plausible USING values for the template values of the specs.
fn plausible_template_value(name: &str) -> Option<&'static str> {
    Some(match name {
        "image" => "/db/schema/repo/spcs-image-scanner:0.1.0",
        "results_stage" => "@db.schema.scan_results_stage",
        "orgname" => "MYORG",
        "accountname" => "MY_ACCOUNT",
        "image_repositories" => "app_db/app_schema/app_repo,other_db/s/r",
        _ => return None,
    })
}

fn render_templates(file: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("{{") {
        let len = rest[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("{file}: unclosed {{{{ in {value:?}"));
        let name = rest[start + 2..start + len]
            .split('|')
            .next()
            .unwrap()
            .trim();
        let v = plausible_template_value(name).unwrap_or_else(|| {
            panic!("{file}: no plausible value for {{{{ {name} }}}}: add one to plausible_template_value")
        });
        out.push_str(&rest[..start]);
        out.push_str(v);
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Runs `spcs-image-scanner --config config/scanner.toml check-config` with only PATH
/// and `env`.
fn check_config(env: &BTreeMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spcs-image-scanner"))
        .current_dir(repo())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .args(["--config", "config/scanner.toml", "check-config"])
        .output()
        .expect("run spcs-image-scanner")
}

/// The spec's container env with template values filled in. With `auth = "spcs"` the
/// daemon requires the token file SPCS mounts (/snowflake/session/token) to exist: the
/// one variable added is SCANNER__REGISTRY__TOKEN_FILE, pointing at a stand-in file.
fn runnable_env(file: &str, spec: &SpecFile, token: &Path) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = spec_env(spec)
        .into_iter()
        .map(|(k, v)| {
            let v = render_templates(file, &v);
            (k, v)
        })
        .collect();
    let auth = env
        .get("SCANNER__REGISTRY__AUTH")
        .map_or("spcs", String::as_str);
    if auth == "spcs" {
        for c in &spec.spec.containers {
            assert_ne!(
                c.mount_session_token,
                Some(false),
                "{file}: spec.containers[{}].mountSessionToken: false, but the registry auth is the session token",
                c.name
            );
            assert!(
                c.session_token_config
                    .as_ref()
                    .is_none_or(|s| s.path.is_none()),
                "{file}: spec.containers[{}].sessionTokenConfig.path moves the token away from {SPCS_TOKEN_FILE}",
                c.name
            );
        }
        assert!(
            !env.contains_key("SCANNER__REGISTRY__TOKEN_FILE"),
            "{file}: sets SCANNER__REGISTRY__TOKEN_FILE; the test assumes the default {SPCS_TOKEN_FILE}"
        );
        env.insert(
            "SCANNER__REGISTRY__TOKEN_FILE".into(),
            token.display().to_string(),
        );
    }
    env
}

/// The value `raw` (an env override) should give a key whose effective value is `effective`.
fn expected_override(effective: &toml::Value, raw: &str) -> toml::Value {
    match effective {
        toml::Value::Array(_) if raw.trim_start().starts_with('[') => {
            let t: toml::Table = format!("v = {raw}").parse().expect("TOML array");
            t["v"].clone()
        }
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().expect("integer")),
        toml::Value::Boolean(_) => toml::Value::Boolean(raw.trim() == "true"),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn effective_config(file: &str, out: &Output) -> toml::Table {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{file}: check-config with the spec's env failed ({}):\n{}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(": OK"),
        "{file}: check-config printed no OK:\n{stdout}"
    );
    stdout
        .parse()
        .unwrap_or_else(|e| panic!("{file}: check-config output is not TOML: {e}\n{stdout}"))
}

fn effective<'a>(config: &'a toml::Table, key: &str) -> &'a toml::Value {
    let (section, field) = key.split_once('.').expect("section.key");
    config
        .get(section)
        .and_then(|s| s.get(field))
        .unwrap_or_else(|| panic!("effective config has no {key}"))
}

#[test]
fn the_daemon_accepts_each_spec_env_and_applies_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "stand-in session token").expect("token");
    for file in all_specs() {
        let spec = load_spec(file);
        let env = runnable_env(file, &spec, &token);
        let config = effective_config(file, &check_config(&env));
        for (name, raw) in &env {
            let Some(key) = override_key(name) else {
                continue;
            };
            let got = effective(&config, &key);
            let mut want = expected_override(got, raw);
            if key == "registry.url" {
                want = toml::Value::String(raw.trim_end_matches('/').to_string());
            }
            assert_eq!(got, &want, "{file}: env {name}: effective {key}");
        }
        if file == "spec/service.yaml" {
            assert_eq!(
                effective(&config, "registry.url").as_str(),
                Some("https://myorg-my-account.registry-local.snowflakecomputing.com"),
                "{file}: registry.url derived from ORGNAME=MYORG, ACCOUNTNAME=MY_ACCOUNT"
            );
            assert_eq!(
                effective(&config, "registry.image_repositories"),
                &toml::Value::Array(vec![
                    "app_db/app_schema/app_repo".into(),
                    "other_db/s/r".into()
                ]),
                "{file}: registry.image_repositories"
            );
            assert_eq!(
                effective(&config, "api.listen").as_str(),
                Some("0.0.0.0:8080"),
                "{file}: api.listen"
            );
        }
    }
}

#[test]
fn the_daemon_rejects_a_misspelled_override() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "stand-in session token").expect("token");
    let file = "spec/service.yaml";
    let mut env = runnable_env(file, &load_spec(file), &token);
    env.insert(
        "SCANNER__REGISTRY__IMAGE_REPOSITORYS".into(),
        "app_db/app_schema/app_repo".into(),
    );
    let out = check_config(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_USAGE),
        "a misspelled override must be refused as a bad config; stderr: {stderr}"
    );
    assert!(
        stderr.contains("SCANNER__REGISTRY__IMAGE_REPOSITORYS") && stderr.contains("unknown key"),
        "the error must name the variable: {stderr}"
    );
}

/// The env var names README.md must list: all the daemon reads, and all the specs set.
fn env_names_to_document() -> BTreeSet<String> {
    let mut names = daemon_env_names();
    for file in all_specs() {
        names.extend(spec_env(&load_spec(file)).into_keys());
    }
    names
}

fn undocumented(readme: &str, names: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .cloned()
        .collect()
}

#[test]
fn readme_documents_every_env_var() {
    let names = env_names_to_document();
    let missing = undocumented(&read("README.md"), &names);
    assert!(
        missing.is_empty(),
        "README.md: env vars not written as `NAME`: {missing:?}\n(all required: {names:?})"
    );
    assert_eq!(
        undocumented(
            "`RUST_LOG` and RUST_LOG_STYLE",
            &["RUST_LOG", "HOME"].map(String::from).into()
        ),
        vec!["HOME".to_string()]
    );
}

// ---------------------------------------------------------------------------------------
// 3. The service's endpoint and probes match the daemon's API, and the SQL matches both

fn listen_port() -> u16 {
    let config: toml::Table = read("config/scanner.toml").parse().expect("TOML");
    let listen = config["api"]["listen"].as_str().expect("api.listen");
    listen
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("config/scanner.toml: api.listen {listen:?}: {e}"))
        .port()
}

fn probe_problems(file: &str, spec: &SpecFile, listen_port: u16) -> Vec<String> {
    let mut p = Vec::new();
    let api = spec
        .spec
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.name == API_ENDPOINT);
    let Some(port) = api.and_then(|e| e.port) else {
        return vec![format!(
            "{file}: spec.endpoints[{API_ENDPOINT}].port: missing"
        )];
    };
    if port != listen_port {
        p.push(format!(
            "{file}: spec.endpoints[{API_ENDPOINT}].port: {port}, but config/scanner.toml api.listen is on {listen_port}"
        ));
    }
    for c in &spec.spec.containers {
        let key = format!("spec.containers[{}]", c.name);
        match &c.readiness_probe {
            None => p.push(format!("{file}: {key}.readinessProbe: missing")),
            Some(r) => {
                if r.path != READYZ_PATH {
                    p.push(format!(
                        "{file}: {key}.readinessProbe.path: {:?}, the daemon serves {READYZ_PATH}",
                        r.path
                    ));
                }
                if r.port != port {
                    p.push(format!(
                        "{file}: {key}.readinessProbe.port: {}, endpoint {API_ENDPOINT} is {port}",
                        r.port
                    ));
                }
            }
        }
        if let Some(l) = &c.liveness_probe {
            if l.path != LIVENESS_PATH {
                p.push(format!(
                    "{file}: {key}.livenessProbe.path: {:?}, expected {LIVENESS_PATH}",
                    l.path
                ));
            }
            if l.port != port {
                p.push(format!(
                    "{file}: {key}.livenessProbe.port: {}, endpoint {API_ENDPOINT} is {port}",
                    l.port
                ));
            }
        }
        if let Some(listen) = c.env.as_ref().and_then(|e| e.get("SCANNER__API__LISTEN")) {
            let overridden = listen.trim().parse::<SocketAddr>().map(|a| a.port());
            if overridden != Ok(port) {
                p.push(format!(
                    "{file}: {key}.env.SCANNER__API__LISTEN: {listen:?} does not listen on endpoint port {port}"
                ));
            }
        }
    }
    p
}

#[test]
fn service_probes_and_endpoint_match_the_api() {
    let file = "spec/service.yaml";
    let spec = load_spec(file);
    let port = listen_port();
    assert_no_problems(file, &probe_problems(file, &spec, port));
    let api = read("src/api.rs");
    assert!(
        api.contains(&format!(".route(\"{LIVENESS_PATH}\"")),
        "src/api.rs: no route {LIVENESS_PATH} for the livenessProbe"
    );

    let text = read(file);
    for (from, to, needle) in [
        ("path: /readyz", "path: /ready", "readinessProbe.path"),
        ("path: /healthz", "path: /health", "livenessProbe.path"),
        (
            "livenessProbe:\n      port: 8080",
            "livenessProbe:\n      port: 8081",
            "livenessProbe.port",
        ),
        (
            "SCANNER__LOG__FORMAT: json",
            "SCANNER__API__LISTEN: \"0.0.0.0:9090\"",
            "SCANNER__API__LISTEN",
        ),
        (
            "SCANNER__LOG__FORMAT: json",
            "SCANNER__API__LISTEN: \"\"",
            "SCANNER__API__LISTEN",
        ),
    ] {
        let sample = spcs_spec::parse(&mutate(&text, from, to)).unwrap();
        assert_flagged(to, &probe_problems("sample", &sample, port), needle);
    }
    assert_flagged(
        "listen port",
        &probe_problems("sample", &spec, 9090),
        "api.listen",
    );
}

/// `text` without `--` and `/* */` comments (quoted strings kept).
fn strip_sql_comments(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        } else if !quoted && c == '-' && chars.peek() == Some(&'-') {
            for c in chars.by_ref() {
                if c == '\n' {
                    out.push('\n');
                    break;
                }
            }
            continue;
        } else if !quoted && c == '/' && chars.peek() == Some(&'*') {
            chars.next();
            let mut prev = ' ';
            for c in chars.by_ref() {
                if prev == '*' && c == '/' {
                    break;
                }
                prev = c;
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Byte offsets just after each case-insensitive whole-word `keyword` in `sql`.
fn after_keyword(sql: &str, keyword: &str) -> Vec<usize> {
    let upper = sql.to_ascii_uppercase();
    let ident = |c: Option<char>| c.is_some_and(|c| is_word_char(c) || c == '$');
    upper
        .match_indices(&keyword.to_ascii_uppercase())
        .filter(|(i, k)| {
            !ident(upper[..*i].chars().next_back()) && !ident(upper[i + k.len()..].chars().next())
        })
        .map(|(i, k)| i + k.len())
        .collect()
}

/// `= <ident>`, `= "<ident>"` or `= '<text>'` at the start of `rest`: the value.
fn assigned_value(rest: &str) -> Option<String> {
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    // A literal inside dynamic SQL (EXECUTE IMMEDIATE '...'): quotes are doubled.
    if let Some(r) = rest.strip_prefix("''") {
        return r.find("''").map(|end| r[..end].to_string());
    }
    for q in ['"', '\''] {
        if let Some(r) = rest.strip_prefix(q) {
            return r.find(q).map(|end| r[..end].to_string());
        }
    }
    let end = rest
        .find(|c: char| !(is_word_char(c) || c == '$' || c == '.'))
        .unwrap_or(rest.len());
    (end > 0).then(|| rest[..end].to_string())
}

/// The statement around offset `at`: up to the next `;`.
fn statement_from(sql: &str, at: usize) -> &str {
    let rest = &sql[at..];
    &rest[..rest.find(';').unwrap_or(rest.len())]
}

/// `(endpoint, path)` of each `ENDPOINT = <name> ... AS '<path>'` (a service function).
fn service_functions(sql: &str) -> Vec<(String, Option<String>)> {
    after_keyword(sql, "ENDPOINT")
        .into_iter()
        .filter_map(|at| {
            let endpoint = assigned_value(&sql[at..])?;
            let stmt = statement_from(sql, at);
            let path = after_keyword(stmt, "AS").into_iter().find_map(|a| {
                let r = stmt[a..].trim_start().strip_prefix('\'')?;
                r.find('\'').map(|end| r[..end].to_string())
            });
            Some((endpoint, path))
        })
        .collect()
}

fn service_function_problems(file: &str, sql: &str, endpoints: &BTreeSet<String>) -> Vec<String> {
    let mut p = Vec::new();
    for (endpoint, path) in service_functions(sql) {
        if !endpoints.iter().any(|e| e.eq_ignore_ascii_case(&endpoint)) {
            p.push(format!(
                "{file}: ENDPOINT = {endpoint}: spec/service.yaml declares no such endpoint ({endpoints:?})"
            ));
        }
        match path {
            Some(path) if path == FUNCTION_RESCAN_PATH => {}
            other => p.push(format!(
                "{file}: ENDPOINT = {endpoint} AS {other:?}: the daemon's service function path is {FUNCTION_RESCAN_PATH} (if another was added, teach this test its constant)"
            )),
        }
    }
    p
}

/// Role names in `SERVICE ROLE <service>!<role>`.
fn granted_service_roles(sql: &str) -> Vec<String> {
    after_keyword(sql, "SERVICE ROLE")
        .into_iter()
        .filter_map(|at| {
            let stmt = statement_from(sql, at);
            let upper = stmt.to_ascii_uppercase();
            let end = [" TO ", " FROM ", "\n"]
                .iter()
                .filter_map(|k| upper.get(1..)?.find(k).map(|i| i + 1))
                .min()
                .unwrap_or(stmt.len());
            let role = stmt[..end].rsplit_once('!')?.1;
            Some(role.trim().trim_matches('"').to_string())
        })
        .collect()
}

fn sql_files() -> Vec<(String, String)> {
    files_under(&repo().join("sql"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .map(|p| {
            (
                rel(&p),
                strip_sql_comments(&std::fs::read_to_string(&p).expect("sql")),
            )
        })
        .collect()
}

#[test]
fn sql_service_functions_use_the_api_endpoint_and_path() {
    let spec = load_spec("spec/service.yaml");
    let endpoints: BTreeSet<String> = spec
        .spec
        .endpoints
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    let mut roles: BTreeSet<String> = spec
        .service_roles
        .iter()
        .flatten()
        .map(|r| r.name.to_ascii_lowercase())
        .collect();
    roles.insert("all_endpoints_usage".into());
    let mut problems = Vec::new();
    for (file, sql) in sql_files() {
        problems.extend(service_function_problems(&file, &sql, &endpoints));
        for role in granted_service_roles(&sql) {
            if !roles.contains(&role.to_ascii_lowercase()) {
                problems.push(format!(
                    "{file}: SERVICE ROLE ...!{role}: not a serviceRoles name of spec/service.yaml"
                ));
            }
        }
    }
    assert_no_problems("sql/", &problems);

    let service_sql = "sql/50_service.sql";
    if repo().join(service_sql).exists() {
        let sql = strip_sql_comments(&read(service_sql));
        let functions = service_functions(&sql);
        assert!(
            functions
                .iter()
                .any(|(e, p)| e.eq_ignore_ascii_case(API_ENDPOINT)
                    && p.as_deref() == Some(FUNCTION_RESCAN_PATH)),
            "{service_sql}: no service function with ENDPOINT = {API_ENDPOINT} AS '{FUNCTION_RESCAN_PATH}' (found {functions:?})"
        );
    } else {
        eprintln!("{service_sql} does not exist yet: the service function check is skipped");
    }

    // The parser on samples: comments ignored, wrong path and endpoint caught.
    let good = "-- ENDPOINT = nope AS '/x'\nCREATE FUNCTION scanner_rescan(s VARCHAR) RETURNS VARIANT\n  SERVICE = scanner ENDPOINT = api\n  AS '/functions/rescan';";
    assert_eq!(
        service_functions(&strip_sql_comments(good)),
        vec![("api".to_string(), Some(FUNCTION_RESCAN_PATH.to_string()))]
    );
    let bad = mutate(
        &mutate(good, "= api", "= \"rpc\""),
        "'/functions/rescan'",
        "'/rescan'",
    );
    let problems = service_function_problems("sample", &strip_sql_comments(&bad), &endpoints);
    assert_flagged("endpoint", &problems, "no such endpoint");
    assert_flagged("path", &problems, "/rescan");
    assert_eq!(
        granted_service_roles(
            "GRANT SERVICE ROLE <% db %>.<% schema %>.scanner!api_caller TO ROLE ops;"
        ),
        vec!["api_caller".to_string()]
    );
}

/// `(spec file, USING keys)` for each `SPECIFICATION_TEMPLATE_FILE = '<f>' ... USING (...)`.
fn template_uses(sql: &str) -> Vec<(String, BTreeSet<String>)> {
    after_keyword(sql, "SPECIFICATION_TEMPLATE_FILE")
        .into_iter()
        .filter_map(|at| {
            let file = assigned_value(&sql[at..])?;
            let stmt = statement_from(sql, at);
            let using = *after_keyword(stmt, "USING").first()?;
            let body = stmt[using..].trim_start().strip_prefix('(')?;
            let mut keys = BTreeSet::new();
            for (i, _) in body.match_indices("=>") {
                let before = body[..i].trim_end();
                let start = before
                    .rfind(|c: char| !is_word_char(c))
                    .map_or(0, |j| j + 1);
                keys.insert(before[start..].to_ascii_lowercase());
            }
            Some((file, keys))
        })
        .collect()
}

/// The repository file of a spec the SQL names on its stage (`specs/service.yaml` →
/// `spec/service.yaml`: the specs are copied flat into a stage folder).
fn spec_in_repo(stage_path: &str) -> String {
    format!(
        "spec/{}",
        stage_path.rsplit('/').next().unwrap_or(stage_path)
    )
}

#[test]
fn sql_supplies_every_template_value_of_the_specs_it_uses() {
    let mut problems = Vec::new();
    let mut deployed = BTreeSet::new();
    for (file, sql) in sql_files() {
        for (spec_file, keys) in template_uses(&sql) {
            let spec_path = spec_in_repo(&spec_file);
            deployed.insert(spec_path.clone());
            if !repo().join(&spec_path).exists() {
                problems.push(format!(
                    "{file}: SPECIFICATION_TEMPLATE_FILE = '{spec_file}': no {spec_path}"
                ));
                continue;
            }
            for name in template_names(&read(&spec_path)) {
                if !keys.contains(&name) {
                    problems.push(format!(
                        "{file}: USING for {spec_file}: no value for {{{{ {name} }}}}"
                    ));
                }
            }
        }
    }
    assert_no_problems("sql/", &problems);
    let unused: Vec<&str> = all_specs().filter(|f| !deployed.contains(*f)).collect();
    assert!(
        unused.is_empty(),
        "{unused:?}: named by no SPECIFICATION_TEMPLATE_FILE in sql/ (or this parser missed it)"
    );
    let sample = "EXECUTE JOB SERVICE IN COMPUTE POOL p FROM @s SPECIFICATION_TEMPLATE_FILE = 'job.yaml'\n  USING (image => '\"<% image %>\"', orgname => '\"o\"');";
    let uses = template_uses(sample);
    assert_eq!(
        uses,
        vec![(
            "job.yaml".to_string(),
            ["image", "orgname"].map(String::from).into()
        )]
    );
}

/// `(name, volume)` of each `CREATE [OR REPLACE] SNAPSHOT [IF NOT EXISTS] <name> ...
/// VOLUME "<volume>"`; the name upper-cased, without database and schema.
fn created_snapshots(sql: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for at in after_keyword(sql, "SNAPSHOT") {
        let before = sql[..at].to_ascii_uppercase();
        let words: Vec<&str> = before.split_whitespace().rev().skip(1).take(3).collect();
        if !matches!(
            words.as_slice(),
            ["CREATE", ..] | ["REPLACE", "OR", "CREATE"]
        ) {
            continue;
        }
        let stmt = statement_from(sql, at);
        let mut tokens = stmt.split_whitespace();
        let mut name = tokens.next().unwrap_or("");
        if name.eq_ignore_ascii_case("IF") {
            name = tokens.nth(2).unwrap_or("");
        }
        // `GRANT CREATE SNAPSHOT, ... ON SCHEMA`: a privilege, not a snapshot.
        if !name.starts_with(|c: char| is_word_char(c) || c == '"' || c == '<')
            || name.eq_ignore_ascii_case("ON")
        {
            continue;
        }
        let volume = after_keyword(stmt, "VOLUME")
            .first()
            .and_then(|v| stmt[*v..].trim_start().strip_prefix('"'))
            .and_then(|r| r.split('"').next())
            .map(String::from);
        let name = name.rsplit('.').next().unwrap_or("").to_ascii_uppercase();
        out.push((name, volume));
    }
    out
}

/// The largest size (GiB) of a block volume `volume` in the specs `sql` deploys, or
/// None when none of them has such a block volume.
fn source_volume_gib(sql: &str, volume: &str) -> Option<u32> {
    template_uses(sql)
        .into_iter()
        .flat_map(|(spec_file, _)| load_spec(&spec_in_repo(&spec_file)).spec.volumes)
        .flatten()
        .filter(|v| v.name == volume && v.source == VolumeSource::Block)
        .map(|v| v.size.as_deref().and_then(block_size_gib).unwrap_or(0))
        .max()
}

#[test]
fn the_seed_snapshot_is_what_the_specs_mount() {
    // sql/ snapshots a block volume of a spec it deploys; the specs mount that snapshot
    // on a volume at least as large.
    let mut created: BTreeMap<String, u32> = BTreeMap::new();
    let mut problems = Vec::new();
    for (file, sql) in sql_files() {
        for (name, volume) in created_snapshots(&sql) {
            let gib = volume.as_deref().and_then(|v| source_volume_gib(&sql, v));
            if gib.is_none() {
                problems.push(format!(
                    "{file}: CREATE SNAPSHOT {name} VOLUME {volume:?}: not a block volume of a spec this file deploys"
                ));
            }
            let max = created.entry(name).or_insert(0);
            *max = (*max).max(gib.unwrap_or(0));
        }
    }
    for file in all_specs() {
        for v in load_spec(file).spec.volumes.iter().flatten() {
            let Some(from) = v
                .block_config
                .as_ref()
                .and_then(|b| b.initial_contents.as_ref())
            else {
                continue;
            };
            let key = format!(
                "{file}: spec.volumes[{}].blockConfig.initialContents.fromSnapshot",
                v.name
            );
            let snapshot = from.from_snapshot.rsplit('.').next().unwrap_or("");
            let size = v.size.as_deref().and_then(block_size_gib).unwrap_or(0);
            match created.get(&snapshot.to_ascii_uppercase()) {
                None => problems.push(format!(
                    "{key}: {snapshot} is created by no sql/ file ({created:?})"
                )),
                Some(src) if size < *src => problems.push(format!(
                    "{key}: the volume ({size}Gi) is smaller than the {src}Gi volume {snapshot} is taken from"
                )),
                Some(_) => {}
            }
        }
    }
    assert_no_problems("snapshot wiring", &problems);
    let sample = "CREATE OR REPLACE SNAPSHOT db.s.seed_x FROM SERVICE j VOLUME \"grype-db\" INSTANCE 0;\nGRANT CREATE SNAPSHOT, CREATE SERVICE ON SCHEMA s TO ROLE r;";
    assert_eq!(
        created_snapshots(sample),
        vec![("SEED_X".to_string(), Some("grype-db".to_string()))]
    );
}

// ---------------------------------------------------------------------------------------
// 4. The Dockerfile pins versions and checksums; .dockerignore keeps the context small

#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    /// The image after ARG substitution.
    image: String,
    platform: Option<String>,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

#[derive(Debug)]
struct Dockerfile {
    /// Every ARG default in the file (global and per stage).
    args: BTreeMap<String, String>,
    stages: Vec<Stage>,
}

/// Instructions with line continuations joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_string(),
                });
                current.clear();
            }
        }
    }
    out
}

/// `${VAR}` and `$VAR` replaced from `args`; unknown variables are left as they are.
fn substitute(text: &str, args: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(end) => (&r[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after
                    .find(|c: char| !is_word_char(c))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match args.get(name) {
            Some(v) if len > 0 => out.push_str(v),
            _ => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &rest[i + 1 + len..];
    }
    out.push_str(rest);
    out
}

fn parse_arg(args: &str) -> Option<(String, String)> {
    let (name, value) = args.split_once('=')?;
    Some((
        name.trim().to_string(),
        value.trim().trim_matches('"').to_string(),
    ))
}

fn parse_dockerfile(text: &str) -> Dockerfile {
    let mut global = BTreeMap::new();
    let mut all = BTreeMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for ins in dockerfile_instructions(text) {
        if ins.keyword == "ARG" {
            if let Some((k, v)) = parse_arg(&ins.args) {
                if stages.is_empty() {
                    global.insert(k.clone(), v.clone());
                }
                all.insert(k, v);
            }
        }
        if ins.keyword == "FROM" {
            let mut platform = None;
            let mut words = Vec::new();
            for w in ins.args.split_whitespace() {
                match w.strip_prefix("--platform=") {
                    Some(p) => platform = Some(substitute(p, &global)),
                    None => words.push(w),
                }
            }
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("AS") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                image: substitute(words.first().copied().unwrap_or(""), &global),
                platform,
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(ins);
        }
    }
    Dockerfile { args: all, stages }
}

/// Why `image` is not pinned to a version, if it is not. A digest pins; otherwise the
/// tag must name a version (hold a digit) and not be `latest`. Distroless images have
/// no version tags (only `latest`, `nonroot`, `debug`...): for them the Debian release
/// in the image name (`cc-debian12`) counts.
fn image_pin_problem(image: &str) -> Option<String> {
    if image == "scratch" {
        return None;
    }
    if image.contains('$') {
        return Some(format!(
            "{image}: has an unresolved variable (an ARG without a default?)"
        ));
    }
    if let Some((_, digest)) = image.split_once('@') {
        return match digest.strip_prefix("sha256:") {
            Some(h) if is_sha256_hex(h) => None,
            _ => Some(format!("{image}: digest is not sha256:<64 hex>")),
        };
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let Some((name, tag)) = last.split_once(':') else {
        return Some(format!("{image}: no tag (a bare name means latest)"));
    };
    if tag.split(['-', '.', '_']).any(|part| part == "latest") {
        return Some(format!("{image}: tag {tag:?} floats"));
    }
    let distroless =
        image.starts_with("gcr.io/distroless/") && name.ends_with(|c: char| c.is_ascii_digit());
    if tag.chars().any(|c| c.is_ascii_digit()) || distroless {
        None
    } else {
        Some(format!("{image}: tag {tag:?} names no version"))
    }
}

fn check_base_images_pinned(df: &Dockerfile) -> Vec<String> {
    let names: BTreeSet<&str> = df.stages.iter().filter_map(|s| s.name.as_deref()).collect();
    df.stages
        .iter()
        .filter(|s| !names.contains(s.image.as_str()))
        .filter_map(|s| image_pin_problem(&s.image))
        .map(|p| format!("Dockerfile: FROM {p}"))
        .collect()
}

fn check_final_platform(df: &Dockerfile) -> Vec<String> {
    match df.stages.last() {
        None => vec!["Dockerfile: no FROM".into()],
        Some(s) if s.platform.as_deref() == Some("linux/amd64") => vec![],
        Some(s) => vec![format!(
            "Dockerfile: final FROM {}: --platform is {:?}, SPCS runs linux/amd64 only",
            s.image, s.platform
        )],
    }
}

fn semver(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u64>().ok());
    let v = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(v)
}

fn check_tool_pins(df: &Dockerfile) -> Vec<String> {
    let mut p = Vec::new();
    match df.args.get("GRYPE_VERSION").map(|v| (v, semver(v))) {
        Some((_, Some(v))) if v >= MIN_GRYPE => {}
        other => p.push(format!(
            "Dockerfile: ARG GRYPE_VERSION: {other:?}, need a version >= {}.{}.{} (older grype cannot read the current DB)",
            MIN_GRYPE.0, MIN_GRYPE.1, MIN_GRYPE.2
        )),
    }
    for arg in ["GRYPE_SHA256", "SYFT_WHEEL_SHA256"] {
        match df.args.get(arg) {
            Some(v) if is_sha256_hex(v) => {}
            other => p.push(format!(
                "Dockerfile: ARG {arg}: {other:?} is not 64 lowercase hex digits"
            )),
        }
    }
    p
}

/// Every RUN that fetches something verifies it against a pinned `*_SHA256` ARG:
/// `sha256sum -c` for URLs, `--require-hashes` for pip. ADD of a URL needs --checksum.
fn check_downloads_verified(df: &Dockerfile) -> Vec<String> {
    let mut p = Vec::new();
    for stage in &df.stages {
        for ins in &stage.instructions {
            let a = &ins.args;
            let url = a.contains("http://") || a.contains("https://");
            let pip = a.contains("pip download") || a.contains("pip install");
            let short: String = a.chars().take(60).collect();
            if ins.keyword == "ADD" && url && !a.contains("--checksum=sha256:") {
                p.push(format!(
                    "Dockerfile: ADD {short}...: a URL without --checksum"
                ));
            }
            if ins.keyword != "RUN" || !(url || pip) {
                continue;
            }
            let pinned = a.contains("_SHA256}") || a.contains("_SHA256\"");
            if url && !(a.contains("sha256sum -c") && pinned) {
                p.push(format!(
                    "Dockerfile: RUN {short}...: downloads without sha256sum -c against a *_SHA256 ARG"
                ));
            }
            if pip && !(a.contains("--require-hashes") && pinned) {
                p.push(format!(
                    "Dockerfile: RUN {short}...: pip without --require-hashes and a *_SHA256 ARG"
                ));
            }
        }
    }
    p
}

fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args).ok()
}

fn check_final_stage(df: &Dockerfile) -> Vec<String> {
    let Some(stage) = df.stages.last() else {
        return vec!["Dockerfile: no FROM".into()];
    };
    let mut p = Vec::new();
    let last = |k: &str| stage.instructions.iter().rev().find(|i| i.keyword == k);
    if stage.instructions.iter().any(|i| i.keyword == "RUN") {
        p.push(
            "Dockerfile: final stage: has a RUN (no shell or package manager runs there)".into(),
        );
    }
    match last("USER").map(|u| u.args.split(':').next().unwrap_or("").trim().to_string()) {
        None => p.push("Dockerfile: final stage: no USER (runs as root)".into()),
        Some(u) if u == "root" || u == "0" || u.is_empty() => {
            p.push(format!("Dockerfile: final stage: USER {u} is root"))
        }
        Some(_) => {}
    }
    for (k, want) in [("ENTRYPOINT", BINARY), ("CMD", "run")] {
        let got = last(k).and_then(|i| exec_form(&i.args));
        if got != Some(vec![want.to_string()]) {
            p.push(format!(
                "Dockerfile: final stage: {k} is {got:?}, expected [{want:?}] (exec form)"
            ));
        }
    }
    let copies_certs = stage.instructions.iter().any(|i| {
        i.keyword == "COPY"
            && (i.args.contains("ca-certificates") || i.args.contains("/etc/ssl/certs"))
    });
    if !stage.image.contains("distroless") && !copies_certs {
        p.push(format!(
            "Dockerfile: final stage: base {} is not distroless and no ca-certificates are copied",
            stage.image
        ));
    }
    p
}

/// `(sources, destination)` of a COPY without `--from` (from the build context).
fn context_copy(ins: &Instruction) -> Option<(Vec<String>, String)> {
    if ins.keyword != "COPY" && ins.keyword != "ADD" {
        return None;
    }
    let words: Vec<String> = match exec_form(&ins.args) {
        Some(w) => w,
        None => ins.args.split_whitespace().map(String::from).collect(),
    };
    if words.iter().any(|w| w.starts_with("--from=")) {
        return None;
    }
    let mut words: Vec<String> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
    let dest = words.pop()?;
    Some((words, dest))
}

/// One `.dockerignore` rule: `!` exceptions re-include; the last matching rule wins.
#[derive(Debug)]
struct IgnoreRule {
    exception: bool,
    pattern: Vec<String>,
}

fn dockerignore_rules(text: &str) -> Vec<IgnoreRule> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (exception, p) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let pattern = p
                .trim_start_matches('/')
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(String::from)
                .collect();
            IgnoreRule { exception, pattern }
        })
        .collect()
}

/// Glob match of one path component: `*` any run, `?` one character.
fn glob_component(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    go(
        &pattern.chars().collect::<Vec<_>>(),
        &name.chars().collect::<Vec<_>>(),
    )
}

fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match pattern.first() {
        None => path.is_empty(),
        Some(p) if p == "**" => (0..=path.len()).any(|i| glob_path(&pattern[1..], &path[i..])),
        Some(p) => {
            !path.is_empty() && glob_component(p, path[0]) && glob_path(&pattern[1..], &path[1..])
        }
    }
}

/// Whether `path` (relative, `/`-separated) is in the build context: a rule applies when
/// it matches the path or one of its parent directories (docker's semantics).
fn dockerignore_includes(rules: &[IgnoreRule], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut included = true;
    for rule in rules {
        if (1..=parts.len()).any(|n| glob_path(&rule.pattern, &parts[..n])) {
            included = rule.exception;
        }
    }
    included
}

fn check_dockerignore(text: &str) -> Vec<String> {
    let rules = dockerignore_rules(text);
    let mut p = Vec::new();
    for rule in rules.iter().filter(|r| r.exception) {
        let pattern = rule.pattern.join("/");
        let allowed = matches!(
            pattern.as_str(),
            "Cargo.toml" | "Cargo.lock" | "src" | "config"
        ) || (pattern.starts_with("config/") && !pattern.contains('*'));
        if !allowed {
            p.push(format!(
                ".dockerignore: !{pattern}: only Cargo.toml, Cargo.lock, src/ and config files may be re-included"
            ));
        }
    }
    for path in [
        ".git",
        ".git/HEAD",
        "target",
        "target/release/spcs-image-scanner",
        "README.md",
        "tests/deployment.rs",
    ] {
        if dockerignore_includes(&rules, path) {
            p.push(format!(".dockerignore: lets {path} into the build context"));
        }
    }
    p
}

fn check_copy_sources(df: &Dockerfile, dockerignore: &str) -> Vec<String> {
    let rules = dockerignore_rules(dockerignore);
    let mut p = Vec::new();
    for stage in &df.stages {
        for (sources, _) in stage.instructions.iter().filter_map(context_copy) {
            for src in sources {
                let path = repo().join(&src);
                if !path.exists() {
                    p.push(format!(
                        "Dockerfile: COPY {src}: no such file in the repository"
                    ));
                    continue;
                }
                let files = if path.is_dir() {
                    files_under(&path)
                } else {
                    vec![path]
                };
                for f in files.iter().map(|f| rel(f)) {
                    if !dockerignore_includes(&rules, &f) {
                        p.push(format!(
                            "Dockerfile: COPY {src}: {f} is excluded by .dockerignore"
                        ));
                    }
                }
            }
        }
    }
    p
}

fn dockerfile_problems(text: &str) -> Vec<String> {
    let df = parse_dockerfile(text);
    let mut p = Vec::new();
    p.extend(check_base_images_pinned(&df));
    p.extend(check_final_platform(&df));
    p.extend(check_tool_pins(&df));
    p.extend(check_downloads_verified(&df));
    p.extend(check_final_stage(&df));
    p
}

#[test]
fn dockerfile_pins_versions_and_checksums() {
    assert_no_problems("Dockerfile", &dockerfile_problems(&read("Dockerfile")));
}

#[test]
fn dockerfile_checks_reject_broken_samples() {
    let text = read("Dockerfile");
    for (from, to, needle) in [
        ("rust:1.95.0-bookworm", "rust:latest", "rust:latest"),
        ("rust:1.95.0-bookworm", "rust", "no tag"),
        (
            "python:3.11.11-slim-bookworm",
            "python:slim",
            "names no version",
        ),
        (
            "ARG FETCH_IMAGE=debian:12.11-slim",
            "ARG FETCH_IMAGE",
            "unresolved",
        ),
        (
            "FROM --platform=linux/amd64 ${RUNTIME_IMAGE}",
            "FROM ${RUNTIME_IMAGE}",
            "--platform",
        ),
        (
            "GRYPE_VERSION=0.116.0",
            "GRYPE_VERSION=0.96.2",
            "GRYPE_VERSION",
        ),
        ("GRYPE_SHA256=40aff7", "GRYPE_SHA256=40AFF7", "GRYPE_SHA256"),
        ("| sha256sum -c -", "", "sha256sum -c"),
        ("--require-hashes ", "", "--require-hashes"),
        ("USER 65532:65532", "USER root", "root"),
        ("USER 65532:65532", "USER 0:0", "root"),
        (
            "USER 65532:65532",
            "RUN [\"/usr/local/bin/syft\", \"version\"]",
            "RUN",
        ),
        (
            "ENTRYPOINT [\"spcs-image-scanner\"]",
            "ENTRYPOINT /usr/local/bin/spcs-image-scanner",
            "ENTRYPOINT",
        ),
        ("CMD [\"run\"]", "CMD [\"once\"]", "CMD"),
        (
            "gcr.io/distroless/cc-debian12:nonroot",
            "debian:12.11-slim",
            "ca-certificates",
        ),
    ] {
        assert_flagged(
            &format!("{from} -> {to}"),
            &dockerfile_problems(&mutate(&text, from, to)),
            needle,
        );
    }
    assert!(image_pin_problem("gcr.io/distroless/cc-debian12:latest").is_some());
    assert!(image_pin_problem("localhost:5000/rust").is_some());
    assert_eq!(
        image_pin_problem(&format!("rust@sha256:{}", "a".repeat(64))),
        None
    );
}

#[test]
fn dockerignore_keeps_the_context_to_the_build_inputs() {
    let text = read(".dockerignore");
    assert_no_problems(".dockerignore", &check_dockerignore(&text));
    assert_no_problems(
        "Dockerfile",
        &check_copy_sources(&parse_dockerfile(&read("Dockerfile")), &text),
    );

    assert_flagged(
        "!target/",
        &check_dockerignore(&format!("{text}!target/\n")),
        "target",
    );
    assert_flagged(
        "no *",
        &check_dockerignore(&mutate(&text, "*\n", "target\n")),
        ".git",
    );
    let narrowed = mutate(&text, "!src/\n", "!src/main.rs\n");
    assert_flagged(
        "src narrowed",
        &check_copy_sources(&parse_dockerfile(&read("Dockerfile")), &narrowed),
        "excluded by .dockerignore",
    );
    let missing = mutate(
        &read("Dockerfile"),
        "COPY config/scanner.toml",
        "COPY config/service.toml",
    );
    assert_flagged(
        "missing source",
        &check_copy_sources(&parse_dockerfile(&missing), &text),
        "no such file",
    );
}

#[test]
fn the_image_matches_the_specs_and_the_config() {
    let df = parse_dockerfile(&read("Dockerfile"));
    let last = df.stages.last().expect("a final stage");
    let config: toml::Table = read("config/scanner.toml").parse().expect("TOML");
    let copied: Vec<(Vec<String>, String)> = last
        .instructions
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| {
            let words: Vec<String> = i.args.split_whitespace().map(String::from).collect();
            let dest = words.last().cloned().unwrap_or_default();
            (words, dest)
        })
        .collect();
    // The binaries the ENTRYPOINT and scanner.syft / scanner.grype name, on PATH.
    let tools = [
        BINARY,
        config["scanner"]["syft"].as_str().expect("scanner.syft"),
        config["scanner"]["grype"].as_str().expect("scanner.grype"),
    ];
    for tool in tools {
        assert!(
            copied
                .iter()
                .any(|(_, d)| d == &format!("/usr/local/bin/{tool}")),
            "Dockerfile: final stage copies no /usr/local/bin/{tool}"
        );
    }
    // The config the image carries is the one SPCS_IMAGE_SCANNER_CONFIG names.
    let (_, config_dest) = context_copy(
        last.instructions
            .iter()
            .find(|i| i.keyword == "COPY" && i.args.contains("config/scanner.toml"))
            .expect("Dockerfile: final stage does not COPY config/scanner.toml"),
    )
    .expect("a context COPY");
    let env_line = last
        .instructions
        .iter()
        .find(|i| i.keyword == "ENV" && i.args.starts_with("SPCS_IMAGE_SCANNER_CONFIG"))
        .map(|i| i.args.clone());
    assert_eq!(
        env_line,
        Some(format!("SPCS_IMAGE_SCANNER_CONFIG={config_dest}")),
        "Dockerfile: ENV SPCS_IMAGE_SCANNER_CONFIG"
    );
    for file in all_specs() {
        if let Some(v) = spec_env(&load_spec(file)).get("SPCS_IMAGE_SCANNER_CONFIG") {
            assert_eq!(
                v, &config_dest,
                "{file}: env SPCS_IMAGE_SCANNER_CONFIG is not the image's config"
            );
        }
    }
    // Stage volumes are mounted with the uid/gid the image runs as.
    let user = last
        .instructions
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .map(|i| i.args.clone())
        .expect("USER");
    for file in all_specs() {
        for v in load_spec(file).spec.volumes.iter().flatten() {
            if v.source == VolumeSource::Stage {
                let ids = format!(
                    "{}:{}",
                    v.uid.map_or("-".into(), |u| u.to_string()),
                    v.gid.map_or("-".into(), |g| g.to_string())
                );
                assert_eq!(
                    ids, user,
                    "{file}: spec.volumes[{}].uid:gid vs Dockerfile USER",
                    v.name
                );
            }
        }
    }
    // The image's EXPOSE matches the endpoint.
    let exposed: BTreeSet<String> = last
        .instructions
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").to_string())
        })
        .collect();
    assert!(
        exposed.contains(&listen_port().to_string()),
        "Dockerfile: EXPOSE {exposed:?} lacks the api port {}",
        listen_port()
    );
}
