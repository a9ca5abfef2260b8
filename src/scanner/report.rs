//! Checking what syft and grype wrote, loosely: only what the daemon needs is read, and
//! unknown fields are ignored (grype adds fields often; `descriptor.db` has had three
//! shapes). A file counts only if it parses as the expected document: exit code 0 with an
//! empty or truncated file (grype after SIGINT) is a failure, never "no findings".

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// Largest SBOM or grype document accepted. Parsing streams from the file, so memory
/// stays small; the bound stops a runaway scanner from filling the disk of the stage.
pub const MAX_DOCUMENT_BYTES: u64 = 1024 * 1024 * 1024;

/// What the daemon keeps from a syft-json SBOM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbomSummary {
    pub packages: usize,
    pub schema_version: Option<String>,
}

/// What the daemon keeps from a grype JSON document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrypeSummary {
    pub matches: usize,
    pub severities: BTreeMap<String, usize>,
    pub db_build: Option<String>,
    pub db_schema: Option<String>,
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {what}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} of {size} bytes is over the {MAX_DOCUMENT_BYTES}-byte limit")]
    TooLarge { what: &'static str, size: u64 },
    #[error("{what} is not valid: {reason}")]
    Invalid { what: &'static str, reason: String },
}

#[derive(Deserialize)]
struct RawSbom {
    artifacts: Option<Vec<IgnoredAny>>,
    source: Option<serde_json::Map<String, serde_json::Value>>,
    schema: Option<RawSchema>,
}

#[derive(Deserialize)]
struct RawSchema {
    version: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct RawGrype {
    matches: Option<Vec<RawMatch>>,
    descriptor: Option<RawDescriptor>,
}

#[derive(Deserialize)]
struct RawMatch {
    vulnerability: Option<RawVulnerability>,
}

#[derive(Deserialize)]
struct RawVulnerability {
    severity: Option<String>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    name: Option<String>,
    db: Option<serde_json::Value>,
}

fn open(path: &Path, what: &'static str) -> Result<BufReader<std::fs::File>, ReportError> {
    let file = std::fs::File::open(path).map_err(|source| ReportError::Read { what, source })?;
    let size = file
        .metadata()
        .map_err(|source| ReportError::Read { what, source })?
        .len();
    if size == 0 {
        return Err(ReportError::Empty { what });
    }
    if size > MAX_DOCUMENT_BYTES {
        return Err(ReportError::TooLarge { what, size });
    }
    Ok(BufReader::new(file))
}

/// Checks a syft-json SBOM: `artifacts` list, `source` object and a syft `schema`.
pub fn read_sbom(path: &Path) -> Result<SbomSummary, ReportError> {
    const WHAT: &str = "syft SBOM";
    let raw: RawSbom =
        serde_json::from_reader(open(path, WHAT)?).map_err(|e| ReportError::Invalid {
            what: WHAT,
            reason: e.to_string(),
        })?;
    let invalid = |reason: &str| ReportError::Invalid {
        what: WHAT,
        reason: reason.to_string(),
    };
    let artifacts = raw
        .artifacts
        .ok_or_else(|| invalid("no `artifacts` list"))?;
    raw.source.ok_or_else(|| invalid("no `source` object"))?;
    let schema = raw.schema.ok_or_else(|| invalid("no `schema` object"))?;
    if !schema.url.as_deref().unwrap_or_default().contains("syft") {
        return Err(invalid("`schema.url` is not a syft-json schema"));
    }
    Ok(SbomSummary {
        packages: artifacts.len(),
        schema_version: schema.version,
    })
}

/// Checks a grype JSON document: a `matches` list (never null) and a `descriptor`.
pub fn read_grype(path: &Path) -> Result<GrypeSummary, ReportError> {
    const WHAT: &str = "grype document";
    let raw: RawGrype =
        serde_json::from_reader(open(path, WHAT)?).map_err(|e| ReportError::Invalid {
            what: WHAT,
            reason: e.to_string(),
        })?;
    let matches = raw.matches.ok_or_else(|| ReportError::Invalid {
        what: WHAT,
        reason: "no `matches` list".into(),
    })?;
    let descriptor = raw.descriptor.ok_or_else(|| ReportError::Invalid {
        what: WHAT,
        reason: "no `descriptor`".into(),
    })?;
    if descriptor.name.as_deref().unwrap_or_default().is_empty() {
        return Err(ReportError::Invalid {
            what: WHAT,
            reason: "`descriptor.name` is missing".into(),
        });
    }
    let mut severities = BTreeMap::new();
    for m in &matches {
        let severity = m
            .vulnerability
            .as_ref()
            .and_then(|v| v.severity.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "Unknown".to_string());
        *severities.entry(severity).or_insert(0) += 1;
    }
    let (db_build, db_schema) = db_identity(descriptor.db.as_ref());
    Ok(GrypeSummary {
        matches: matches.len(),
        severities,
        db_build,
        db_schema,
    })
}

/// `built` and `schemaVersion` from any of grype's `descriptor.db` shapes:
/// v5 `{built, schemaVersion: 5}`, v6.0 `{built, schemaVersion: "v6.0.2"}`, and
/// v0.90+ `{status: {built, schemaVersion}, providers}`.
pub fn db_identity(db: Option<&serde_json::Value>) -> (Option<String>, Option<String>) {
    let Some(db) = db else {
        return (None, None);
    };
    let node = db.get("status").filter(|s| s.is_object()).unwrap_or(db);
    let built = node
        .get("built")
        .and_then(|b| b.as_str())
        .map(str::to_string);
    let schema = node.get("schemaVersion").and_then(|s| match s {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    (built, schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn reads_the_real_v5_sample() {
        let s = read_grype(&fixture("grype/real-image-scan-keycloak-grype-0.66.0.json")).unwrap();
        assert_eq!(s.matches, 6);
        assert_eq!(s.db_schema.as_deref(), Some("5"));
        assert_eq!(s.db_build.as_deref(), Some("2023-09-01T01:26:55Z"));
        assert_eq!(s.severities.values().sum::<usize>(), 6);
    }

    #[test]
    fn reads_the_current_golden_and_empty_samples() {
        let s = read_grype(&fixture("grype/golden-image-scan-current-schema.json")).unwrap();
        assert!(s.matches > 0);
        let e = read_grype(&fixture("grype/golden-empty-result.json")).unwrap();
        assert_eq!(e.matches, 0);
    }

    #[test]
    fn v090_db_shape_is_understood() {
        let db = serde_json::json!({"status": {"schemaVersion": "v6.1.3", "built": "2026-12-01T00:00:00Z", "valid": true}, "providers": {}});
        assert_eq!(
            db_identity(Some(&db)),
            (Some("2026-12-01T00:00:00Z".into()), Some("v6.1.3".into()))
        );
    }

    #[test]
    fn empty_and_truncated_documents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(read_grype(&p), Err(ReportError::Empty { .. })));
        std::fs::write(&p, br#"{"matches": [{"vulnerability": {"#).unwrap();
        assert!(matches!(read_grype(&p), Err(ReportError::Invalid { .. })));
        std::fs::write(&p, br#"{"matches": null, "descriptor": {"name": "grype"}}"#).unwrap();
        assert!(read_grype(&p).is_err(), "null matches is not a result");
        std::fs::write(&p, br#"{"artifacts": []}"#).unwrap();
        assert!(read_sbom(&p).is_err());
    }

    #[test]
    fn reads_the_real_syft_sample() {
        let s = read_sbom(&fixture("syft/syft-1.18.1-registry-single-arch.json")).unwrap();
        assert_eq!(s.packages, 1);
        assert_eq!(s.schema_version.as_deref(), Some("16.0.18"));
    }
}
