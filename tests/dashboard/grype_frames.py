"""Test data for the dashboard: the frames Snowflake's views would return, built from the
real grype samples in tests/fixtures/grype/ (see tests/fixtures/README.md).

`flatten()` mirrors what the scan_results_enriched view does with a grype JSON document:
one row per matches[] entry, joined to every tag that points at the image and to the asset
inventory. Tags, inventory assignments, scan times and (for the golden files, which carry
none) DB build times are INVENTED here; everything about the findings comes from the files.
Upper-case column names and NULLs (None / NaN / NaT) are as Snowpark's to_pandas() gives them.
"""

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "grype"


def _app_columns():
    """The column lists of the app, which tests/sql.rs checks against the views' SQL."""
    spec = importlib.util.spec_from_file_location(
        "streamlit_app_columns", Path(__file__).resolve().parents[2] / "streamlit" / "streamlit_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines only; main() runs under __main__
    return module.FINDING_COLUMNS, module.IMAGE_COLUMNS, module.CHANGE_COLUMNS


FINDING_COLUMNS, IMAGE_COLUMNS, CHANGE_COLUMNS = _app_columns()

# Invented DB build times for documents without descriptor.db, and for the change frame.
NEWEST_DB_BUILT = "2026-12-01T00:00:00Z"
OLDER_DB_BUILT = "2023-09-01T01:26:55Z"  # the keycloak sample's descriptor.db.built
OLDEST_DB_BUILT = "2023-08-31T01:00:00Z"


@dataclass
class Sample:
    file: str
    repository: str
    # tag -> (ENVIRONMENT, OWNING_TEAM, CRITICALITY), or None: not in the asset inventory
    tags: dict
    scanned_at: str  # used when descriptor.timestamp is empty
    digest: str = None  # used when source.target has no manifestDigest
    doc: dict = field(default=None, repr=False)

    def __post_init__(self):
        self.doc = json.loads((FIXTURES / self.file).read_text())

    @property
    def image_digest(self):
        target = self.doc["source"]["target"]
        if isinstance(target, dict) and target.get("manifestDigest"):
            return target["manifestDigest"]
        return self.digest

    def image_tags(self):
        return [f"{self.repository}:{tag}" for tag in self.tags]


SAMPLES = [
    # Golden current-schema document: 2 matches, one Critical + KEV, one Low + fixed.
    # Two tags point at it; one is in the inventory, the other is not (NULL inventory).
    Sample("golden-image-scan-current-schema.json", "db/schema/repo/app",
           {"1.0": ("prod", "payments", "high"), "latest": None},
           scanned_at="2026-12-01T06:00:00Z"),
    # Real keycloak scan (grype 0.66.0): 6 Low wont-fix matches, no risk/EPSS/KEV.
    Sample("real-image-scan-keycloak-grype-0.66.0.json", "db/schema/repo/keycloak",
           {"21.0.2": ("staging", "identity", "medium")},
           scanned_at="2023-09-01T12:13:42Z"),
    # Zero-match document. Its source is "unknown", so the digest is invented.
    Sample("golden-empty-result.json", "db/schema/repo/base",
           {"empty": ("dev", "platform", "low")},
           scanned_at="2026-12-01T06:30:00Z",
           digest="sha256:" + hashlib.sha256(b"golden-empty-result.json").hexdigest()),
]


def ts(text):
    """An ISO timestamp as Snowflake's TIMESTAMP_NTZ arrives in pandas (naive, UTC)."""
    return None if not text else pd.Timestamp(text).tz_convert("UTC").tz_localize(None)


def priority_score(is_kev, risk, epss, severity):
    """The view's rule: KEV 100; risk >= 80 keeps the risk; EPSS >= 0.1 gives 90;
    Critical 80; High 60; else 40."""
    if is_kev:
        return 100.0
    if risk is not None and risk >= 80:
        return float(risk)
    if epss is not None and epss >= 0.1:
        return 90.0
    if severity == "Critical":
        return 80.0
    if severity == "High":
        return 60.0
    return 40.0


def match_fields(match):
    """The per-match columns, straight from one matches[] entry."""
    vuln, artifact = match["vulnerability"], match["artifact"]
    epss = (vuln.get("epss") or [{}])[0]
    cvss = (vuln.get("cvss") or [{}])[0]
    fix = vuln.get("fix") or {}
    is_kev = bool(vuln.get("knownExploited"))
    row = {
        "VULNERABILITY_ID": vuln["id"],
        "SEVERITY": vuln.get("severity"),
        "DESCRIPTION": vuln.get("description"),
        "RISK_SCORE": vuln.get("risk"),
        "EPSS_SCORE": epss.get("epss"),
        "EPSS_PERCENTILE": epss.get("percentile"),
        "IS_KEV": is_kev,
        "CVSS_SCORE": (cvss.get("metrics") or {}).get("baseScore"),
        "CVSS_VECTOR": cvss.get("vector"),
        "FIX_STATE": fix.get("state"),
        "FIXED_VERSION": ", ".join(fix.get("versions") or []),
        "IS_FIXABLE": fix.get("state") == "fixed",
        "PACKAGE_NAME": artifact.get("name"),
        "PACKAGE_VERSION": artifact.get("version"),
        "PACKAGE_TYPE": artifact.get("type"),
        "PACKAGE_PURL": artifact.get("purl"),
    }
    row["PRIORITY_SCORE"] = priority_score(is_kev, row["RISK_SCORE"], row["EPSS_SCORE"],
                                           row["SEVERITY"])
    return row


def image_fields(sample, tag):
    doc = sample.doc
    target = doc["source"]["target"]
    db = doc["descriptor"].get("db") or {}
    built = db.get("built") or (db.get("status") or {}).get("built") or NEWEST_DB_BUILT
    inventory = sample.tags[tag] or (None, None, None)
    return {
        "IMAGE_TAG": f"{sample.repository}:{tag}",
        "REPOSITORY": sample.repository,
        "TAG": tag,
        "IMAGE_DIGEST": sample.image_digest,
        "IMAGE_ID": target.get("imageID") if isinstance(target, dict) else None,
        "SCANNED_AT": ts(doc["descriptor"].get("timestamp") or sample.scanned_at),
        "DB_BUILT": ts(built),
        "RESULT_FILE": f"results/{sample.image_digest.split(':')[1]}/{sample.file}",
        "DISTRO_NAME": (doc.get("distro") or {}).get("name"),
        "DISTRO_VERSION": (doc.get("distro") or {}).get("version"),
        "ENVIRONMENT": inventory[0],
        "OWNING_TEAM": inventory[1],
        "CRITICALITY": inventory[2],
    }


def flatten(sample):
    """scan_results_enriched rows of one sample: one per match per tag."""
    return [{**image_fields(sample, tag), **match_fields(m)}
            for tag in sample.tags for m in sample.doc["matches"]]


def scan_results_enriched(samples=SAMPLES):
    rows = [row for s in samples for row in flatten(s)]
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def image_summary(samples=SAMPLES):
    """image_summary rows: the same match rows aggregated per tag (zero-match images too)."""
    rows = []
    for sample in samples:
        matches = [match_fields(m) for m in sample.doc["matches"]]
        risks = [m["RISK_SCORE"] for m in matches if m["RISK_SCORE"] is not None]
        for tag in sample.tags:
            image = image_fields(sample, tag)
            row = {k: image[k] for k in IMAGE_COLUMNS if k in image}
            row["FINDINGS"] = len(matches)
            for severity in ("Critical", "High", "Medium", "Low", "Negligible", "Unknown"):
                row[severity.upper()] = sum(m["SEVERITY"] == severity for m in matches)
            row["KEV"] = sum(m["IS_KEV"] for m in matches)
            row["FIXABLE"] = sum(m["IS_FIXABLE"] for m in matches)
            row["MAX_PRIORITY"] = max((m["PRIORITY_SCORE"] for m in matches), default=None)
            # sql/30_enrichment.sql: SUM(COALESCE(risk_score, 0)), COALESCE(..., 0) for
            # an image without findings: always a number.
            row["RISK_TOTAL"] = float(sum(risks))
            rows.append(row)
    return pd.DataFrame(rows, columns=IMAGE_COLUMNS)


def _change(sample, match_index, kind, built, previous_built, previous_severity=None,
            tags_as_json=False):
    m = match_fields(sample.doc["matches"][match_index])
    fix = sample.doc["matches"][match_index]["vulnerability"].get("fix") or {}
    tags = sample.image_tags()
    return {
        "IMAGE_DIGEST": sample.image_digest,
        "TAGS": json.dumps(tags) if tags_as_json else tags,
        "CHANGE_KIND": kind,
        "VULNERABILITY_ID": m["VULNERABILITY_ID"],
        "PACKAGE_NAME": m["PACKAGE_NAME"],
        "PACKAGE_VERSION": m["PACKAGE_VERSION"],
        "PACKAGE_TYPE": m["PACKAGE_TYPE"],
        "SEVERITY": m["SEVERITY"],
        "PREVIOUS_SEVERITY": previous_severity,
        "FIX_STATE": fix.get("state"),
        "FIX_VERSIONS": ", ".join(fix.get("versions") or []),
        "DB_BUILT": ts(built),
        "PREVIOUS_DB_BUILT": ts(previous_built),
        "OBSERVED_AT": ts(built) + pd.Timedelta(hours=2),
        "RESULT_FILE": f"scans/{sample.image_digest[7:]}/{built[:10]}.json",
        "CHANGE_FILE": f"changes/{built[:10]}.json",
    }


def change_rows(samples=SAMPLES):
    """(older, newest): vulnerability_changes rows of two DB builds. TAGS alternates between
    a list and a JSON string, as Snowpark may hand an ARRAY either way."""
    golden, keycloak = samples[0], samples[1]
    older = [
        _change(keycloak, 0, "added", OLDER_DB_BUILT, OLDEST_DB_BUILT),
        _change(keycloak, 1, "added", OLDER_DB_BUILT, OLDEST_DB_BUILT, tags_as_json=True),
        _change(keycloak, 5, "removed", OLDER_DB_BUILT, OLDEST_DB_BUILT),
        _change(keycloak, 2, "changed", OLDER_DB_BUILT, OLDEST_DB_BUILT, "Medium"),
    ]
    newest = [
        _change(golden, 1, "added", NEWEST_DB_BUILT, OLDER_DB_BUILT),
        _change(golden, 0, "changed", NEWEST_DB_BUILT, OLDER_DB_BUILT, "Medium",
                tags_as_json=True),
        _change(keycloak, 3, "removed", NEWEST_DB_BUILT, OLDER_DB_BUILT),
        _change(keycloak, 4, "removed", NEWEST_DB_BUILT, OLDER_DB_BUILT, tags_as_json=True),
    ]
    return older, newest


def vulnerability_changes(samples=SAMPLES):
    older, newest = change_rows(samples)
    # Older rows first and last, so "newest" is not simply "the last rows".
    return pd.DataFrame(older[:2] + newest + older[2:], columns=CHANGE_COLUMNS)


def sample_frames():
    return {
        "scan_results_enriched": scan_results_enriched(),
        "image_summary": image_summary(),
        "vulnerability_changes": vulnerability_changes(),
    }


def empty_frames():
    return {
        "scan_results_enriched": pd.DataFrame(columns=FINDING_COLUMNS),
        "image_summary": pd.DataFrame(columns=IMAGE_COLUMNS),
        "vulnerability_changes": pd.DataFrame(columns=CHANGE_COLUMNS),
    }
