//! Failed scans and re-matches, written to
//! `output.dir/failures/<UTC timestamp>_<digest hex>.json` so that Snowflake can show
//! them: the state store says the same, but SQL cannot read it.
//!
//! One file per failed attempt, holding one JSON object ([`FailureRecord`]).
//!
//! Invariants:
//! - A record is written after the state commit of the failure it reports. The store is
//!   the source of truth (it drives the retry); a record is monitoring, so one that
//!   cannot be written is logged and the job goes on.
//! - The name is built only from the validated digest and a timestamp
//!   ([`Output::failure_name`]); registry data (tags, repositories) is content, never a
//!   path.
//! - `error` is the text kept on the digest's record: bounded, and the scanners' stderr
//!   has already had the registry password replaced ([`crate::scanner`]). Credentials are
//!   not otherwise part of an error.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::output::{Output, OutputError, Written};
use crate::state::ImageRecord;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// A full scan (syft, then grype).
    Scan,
    /// grype on the cached SBOM after a DB change; the previous result stands.
    Rematch,
}

/// One failed attempt, as written to `failures/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub digest: Digest,
    pub kind: FailureKind,
    pub repositories: Vec<String>,
    /// `repository:tag` pointing at the digest when it failed.
    pub tags: Vec<String>,
    /// The digest's attempt count, this attempt included.
    pub attempt: u32,
    pub error: String,
    pub next_retry: Option<DateTime<Utc>>,
    pub observed_at: DateTime<Utc>,
}

/// Writing a failure record failed.
#[derive(Debug, thiserror::Error)]
pub enum FailureError {
    #[error("failure record of {digest}: cannot encode")]
    Encode {
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
    #[error("failure record of {digest}")]
    Output {
        digest: Digest,
        #[source]
        source: OutputError,
    },
}

impl FailureRecord {
    /// The failure as just committed on `record` (its `last_error`, `attempts` and
    /// `next_retry`), observed at `at`.
    pub fn of(record: &ImageRecord, kind: FailureKind, at: DateTime<Utc>) -> Self {
        FailureRecord {
            digest: record.digest.clone(),
            kind,
            repositories: record.repositories.iter().cloned().collect(),
            tags: record.tags.iter().cloned().collect(),
            attempt: record.attempts,
            error: record.last_error.clone().unwrap_or_default(),
            next_retry: record.next_retry,
            observed_at: at,
        }
    }

    /// Writes the record once under a new name in `failures/`.
    pub fn write(&self, output: &Output) -> Result<Written, FailureError> {
        let bytes = serde_json::to_vec(self).map_err(|source| FailureError::Encode {
            digest: self.digest.clone(),
            source,
        })?;
        output
            .write_new(
                &Output::failure_name(&self.digest, self.observed_at),
                &bytes,
            )
            .map_err(|source| FailureError::Output {
                digest: self.digest.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_object_of_the_documented_shape_under_a_new_name() {
        let at = DateTime::parse_from_rfc3339("2026-12-03T17:45:12.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let mut image = ImageRecord::new(digest.clone(), "m".into(), at);
        image.tags.insert("demo/app:1".into());
        image.repositories.insert("demo/app".into());
        image.attempts = 2;
        image.last_error = Some("grype exited with code 1: boom".into());
        image.next_retry = Some(at + chrono::Duration::minutes(2));

        let value =
            serde_json::to_value(FailureRecord::of(&image, FailureKind::Rematch, at)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "digest": digest.as_str(),
                "kind": "rematch",
                "repositories": ["demo/app"],
                "tags": ["demo/app:1"],
                "attempt": 2,
                "error": "grype exited with code 1: boom",
                "next_retry": "2026-12-03T17:47:12.123Z",
                "observed_at": "2026-12-03T17:45:12.123Z",
            })
        );
        image.next_retry = None;
        let value = serde_json::to_value(FailureRecord::of(&image, FailureKind::Scan, at)).unwrap();
        assert_eq!(value["kind"], "scan");
        assert!(value["next_retry"].is_null());

        // Two failures in the same millisecond: two files, neither overwritten.
        let dir = tempfile::tempdir().unwrap();
        let out = Output::new(dir.path());
        let record = FailureRecord::of(&image, FailureKind::Scan, at);
        let first = record.write(&out).unwrap();
        let second = record.write(&out).unwrap();
        let name = format!("failures/20261203T174512.123Z_{}", "a".repeat(64));
        assert_eq!(first.name, format!("{name}.json"));
        assert_eq!(second.name, format!("{name}-1.json"));
        let back: FailureRecord =
            serde_json::from_slice(&std::fs::read(out.path(&first.name)).unwrap()).unwrap();
        assert_eq!(back, record);
    }
}
