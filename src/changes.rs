//! "New CVE in an old image": what changed between two grype results of one digest,
//! written to `output.dir/changes/<UTC timestamp>.json`.
//!
//! A finding is identified by vulnerability id and package (name, version, type). Between
//! the previous result and the new one, a finding is `added`, `removed`, or `changed`
//! (its severity, fix state or fix versions differ).
//!
//! Invariants:
//! - A change record is stored in the state store in the same commit as the re-match
//!   that produced it, and later written to a changes file in a batch ([`flush`]): a
//!   crash between the re-match and the file loses nothing.
//! - A changes file is written under a unique name before its records are deleted from
//!   the store, and the name is recorded first, so a crash in between never writes the
//!   same records twice.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::output::{Output, OutputError};
use crate::scanner::report::ReportError;
use crate::state::{StateError, Store};

/// One finding as compared.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    pub vulnerability: String,
    pub package: String,
    pub version: String,
    #[serde(rename = "type")]
    pub package_type: String,
    pub severity: String,
    pub fix_state: String,
    pub fix_versions: Vec<String>,
}

/// A finding whose severity or fix changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedFinding {
    pub before: Finding,
    pub after: Finding,
}

/// What changed for one digest between two results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub digest: String,
    pub tags: Vec<String>,
    pub previous_result: Option<String>,
    pub result: String,
    pub previous_db_build: Option<String>,
    pub db_build: Option<String>,
    pub observed_at: DateTime<Utc>,
    pub added: Vec<Finding>,
    pub removed: Vec<Finding>,
    pub changed: Vec<ChangedFinding>,
}

impl ChangeRecord {
    /// True when nothing was added, removed or changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[derive(Deserialize)]
struct RawDoc {
    matches: Vec<RawMatch>,
}

#[derive(Deserialize)]
struct RawMatch {
    vulnerability: RawVuln,
    artifact: RawArtifact,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawVuln {
    id: String,
    severity: Option<String>,
    fix: Option<RawFix>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawFix {
    versions: Vec<String>,
    state: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawArtifact {
    name: String,
    version: String,
    #[serde(rename = "type")]
    package_type: String,
}

type Key = (String, String, String, String);

/// The findings of a grype document, by identity.
pub fn findings(path: &Path) -> Result<BTreeMap<Key, Finding>, ReportError> {
    const WHAT: &str = "grype document";
    let file =
        std::fs::File::open(path).map_err(|source| ReportError::Read { what: WHAT, source })?;
    let doc: RawDoc = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| {
        ReportError::Invalid {
            what: WHAT,
            reason: e.to_string(),
        }
    })?;
    let mut out = BTreeMap::new();
    for m in doc.matches {
        let fix = m.vulnerability.fix.unwrap_or_default();
        let finding = Finding {
            vulnerability: m.vulnerability.id,
            package: m.artifact.name,
            version: m.artifact.version,
            package_type: m.artifact.package_type,
            severity: m.vulnerability.severity.unwrap_or_else(|| "Unknown".into()),
            fix_state: fix.state,
            fix_versions: fix.versions,
        };
        let key = (
            finding.vulnerability.clone(),
            finding.package.clone(),
            finding.version.clone(),
            finding.package_type.clone(),
        );
        out.insert(key, finding);
    }
    Ok(out)
}

/// Added, removed and changed findings from `before` to `after`.
pub fn diff(
    before: &BTreeMap<Key, Finding>,
    after: &BTreeMap<Key, Finding>,
) -> (Vec<Finding>, Vec<Finding>, Vec<ChangedFinding>) {
    let added = after
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(_, f)| f.clone())
        .collect();
    let removed = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .map(|(_, f)| f.clone())
        .collect();
    let changed = after
        .iter()
        .filter_map(|(k, a)| {
            let b = before.get(k)?;
            (b.severity != a.severity
                || b.fix_state != a.fix_state
                || b.fix_versions != a.fix_versions)
                .then(|| ChangedFinding {
                    before: b.clone(),
                    after: a.clone(),
                })
        })
        .collect();
    (added, removed, changed)
}

/// Writing pending change records failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("state store")]
    State(#[from] StateError),
    #[error("output")]
    Output(#[from] OutputError),
}

/// Writes every pending change record to one new `changes/<timestamp>.json` and removes
/// them from the store. Returns the file name, if there was anything to write.
pub async fn flush(store: &Store, output: &Output) -> Result<Option<String>, FlushError> {
    // A flush interrupted by a crash: its file either exists complete (the records were
    // written; drop them) or not (write them again).
    if let Some(intent) = store.changes_flush_intent()? {
        if output.is_complete(&intent.name, intent.size, &intent.sha256) {
            store.finish_changes_flush(&intent.keys).await?;
        } else {
            output.remove(&intent.name)?;
            store.abandon_changes_flush().await?;
        }
    }
    let pending = store.pending_changes()?;
    if pending.is_empty() {
        return Ok(None);
    }
    let (keys, records): (Vec<String>, Vec<ChangeRecord>) = pending.into_iter().unzip();
    let bytes = serde_json::to_vec_pretty(&records).unwrap_or_default();
    let name = output.free_name(&format!(
        "changes/{}.json",
        crate::output::timestamp(Utc::now())
    ))?;
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    store
        .begin_changes_flush(&name, bytes.len() as u64, &sha256, &keys)
        .await?;
    let written = output.write_new(&name, &bytes)?;
    if written.name != name {
        // The name was taken meanwhile; record what was really written.
        store
            .begin_changes_flush(&written.name, written.size, &written.sha256, &keys)
            .await?;
    }
    store.finish_changes_flush(&keys).await?;
    Ok(Some(written.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: &str, severity: &str, fix: &str) -> (Key, Finding) {
        let finding = Finding {
            vulnerability: id.into(),
            package: "zlib1g".into(),
            version: "1".into(),
            package_type: "deb".into(),
            severity: severity.into(),
            fix_state: fix.into(),
            fix_versions: vec![],
        };
        (
            (id.into(), "zlib1g".into(), "1".into(), "deb".into()),
            finding,
        )
    }

    #[test]
    fn diff_finds_added_removed_and_changed() {
        let before: BTreeMap<_, _> = [f("CVE-1", "High", "not-fixed"), f("CVE-2", "Low", "fixed")]
            .into_iter()
            .collect();
        let after: BTreeMap<_, _> = [
            f("CVE-1", "Critical", "fixed"),
            f("CVE-3", "Medium", "unknown"),
        ]
        .into_iter()
        .collect();
        let (added, removed, changed) = diff(&before, &after);
        assert_eq!(
            added
                .iter()
                .map(|x| x.vulnerability.as_str())
                .collect::<Vec<_>>(),
            vec!["CVE-3"]
        );
        assert_eq!(
            removed
                .iter()
                .map(|x| x.vulnerability.as_str())
                .collect::<Vec<_>>(),
            vec!["CVE-2"]
        );
        assert_eq!(changed.len(), 1);
        assert_eq!(
            (
                changed[0].before.severity.as_str(),
                changed[0].after.severity.as_str()
            ),
            ("High", "Critical")
        );
        let (a, r, c) = diff(&after, &after);
        assert!(a.is_empty() && r.is_empty() && c.is_empty());
    }

    #[test]
    fn findings_of_the_real_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/grype/real-image-scan-keycloak-grype-0.66.0.json");
        let found = findings(&path).unwrap();
        assert!(!found.is_empty() && found.len() <= 6);
        assert!(
            found
                .values()
                .all(|f| !f.vulnerability.is_empty() && !f.package.is_empty())
        );
    }
}
