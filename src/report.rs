//! A readable summary of what the store knows: one line per digest with its tags, status
//! and findings. Used by `spcs-image-scanner report` (the daemon must be stopped: the
//! store admits one process at a time).

use std::fmt::Write as _;

use crate::state::{ImageRecord, ImageStatus, ScanMode};

/// Severities in the order shown.
const SEVERITIES: [&str; 4] = ["Critical", "High", "Medium", "Low"];

/// Renders `images` as a table, most severe first.
pub fn render_table(images: &[ImageRecord]) -> String {
    let mut rows: Vec<&ImageRecord> = images.iter().collect();
    rows.sort_by_key(|i| {
        let sev = |name: &str| {
            i.last_scan
                .as_ref()
                .and_then(|s| s.severities.get(name).copied())
                .unwrap_or(0)
        };
        (
            std::cmp::Reverse((sev("Critical"), sev("High"))),
            i.status,
            i.digest.clone(),
        )
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<19} {:<11} {:>8} {:>8} {:>4} {:>6} {:>4} {:>5}  TAGS / NOTE",
        "IMAGE", "STATUS", "PACKAGES", "CRITICAL", "HIGH", "MEDIUM", "LOW", "OTHER"
    );
    for image in rows {
        let tags = if image.tags.is_empty() {
            "(no tag)".to_string()
        } else {
            image.tags.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        let short = format!("sha256:{}", image.digest.short());
        match (&image.last_scan, image.status) {
            (Some(scan), ImageStatus::Scanned) => {
                let count = |name: &str| scan.severities.get(name).copied().unwrap_or(0);
                let other: usize = scan
                    .severities
                    .iter()
                    .filter(|(k, _)| !SEVERITIES.contains(&k.as_str()))
                    .map(|(_, v)| v)
                    .sum();
                let cells = if scan.mode == ScanMode::SbomOnly {
                    format!("{:>8} {:>4} {:>6} {:>4} {:>5}", "-", "-", "-", "-", "-")
                } else {
                    format!(
                        "{:>8} {:>4} {:>6} {:>4} {:>5}",
                        count("Critical"),
                        count("High"),
                        count("Medium"),
                        count("Low"),
                        other
                    )
                };
                let mut note = if scan.mode == ScanMode::SbomOnly {
                    " [SBOM only, not matched]".to_string()
                } else {
                    String::new()
                };
                if !scan.flags.is_empty() {
                    note.push_str(&format!(" [{}]", scan.flags.join(", ")));
                }
                let _ = writeln!(
                    out,
                    "{short:<19} {:<11} {:>8} {cells}  {tags}{note}",
                    image.status.as_str(),
                    scan.packages
                );
            }
            _ => {
                let note = match image.status {
                    ImageStatus::Unsupported => format!(
                        " [{}]",
                        image.unsupported_reason.as_deref().unwrap_or("unsupported")
                    ),
                    ImageStatus::Failed => {
                        format!(" [{}]", image.last_error.as_deref().unwrap_or("failed"))
                    }
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{short:<19} {:<11} {:>8} {:>8} {:>4} {:>6} {:>4} {:>5}  {tags}{note}",
                    image.status.as_str(),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-"
                );
            }
        }
    }
    let mut counts = std::collections::BTreeMap::new();
    for image in images {
        *counts.entry(image.status.as_str()).or_insert(0usize) += 1;
    }
    let totals: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(out, "\n{} digests: {}", images.len(), totals.join(", "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::state::ScanRecord;
    use chrono::Utc;

    #[test]
    fn table_shows_findings_and_reasons() {
        let now = Utc::now();
        let mut scanned = ImageRecord::new(
            Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            "m".into(),
            now,
        );
        scanned.status = ImageStatus::Scanned;
        scanned.tags.insert("demo/x:1.0".into());
        scanned.last_scan = Some(ScanRecord {
            finished_at: now,
            mode: ScanMode::Full,
            syft_version: "1.18.1".into(),
            grype_version: Some("0.116.0".into()),
            db_build: None,
            db_schema: None,
            result_file: None,
            sbom_file: "s".into(),
            packages: 7,
            matches: 3,
            flags: vec!["stale_db".to_string()],
            severities: [("Critical".to_string(), 2), ("Negligible".to_string(), 1)]
                .into_iter()
                .collect(),
        });
        let mut sig = ImageRecord::new(
            Digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap(),
            "m".into(),
            now,
        );
        sig.status = ImageStatus::Unsupported;
        sig.unsupported_reason = Some("a cosign signature".into());
        let table = render_table(&[sig, scanned]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("sha256:aaaaaaaaaaaa"), "{table}");
        assert!(
            lines[1].contains("demo/x:1.0") && lines[1].contains("[stale_db]"),
            "{table}"
        );
        assert!(
            lines[1].split_whitespace().collect::<Vec<_>>()[2..8] == ["7", "2", "0", "0", "0", "1"],
            "{table}"
        );
        assert!(lines[2].contains("a cosign signature"), "{table}");
        assert!(
            table.contains("2 digests: 1 scanned, 1 unsupported"),
            "{table}"
        );
    }
}
