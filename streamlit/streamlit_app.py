"""Vulnerability dashboard for spcs-image-scanner (Streamlit in Snowflake).

Reads three views, each with one constant query per run (cached for CACHE_TTL_SECONDS):
scan_results_enriched (one row per finding per tag), image_summary (one row per tag of a
scanned image) and vulnerability_changes (findings that changed with a new grype DB).
All filtering happens in pandas. The helper functions are pure so the tests can import
this file without a Snowflake session.

Overview figures (all follow the sidebar filters):
- Images:   distinct IMAGE_DIGEST in image_summary (image, environment and team filters).
- CVEs:     distinct VULNERABILITY_ID in the filtered findings.
- Critical: distinct VULNERABILITY_ID with SEVERITY "Critical" in the filtered findings.
- KEV:      distinct VULNERABILITY_ID with IS_KEV in the filtered findings.
Critical and KEV count CVEs, not finding rows: a finding repeats once per tag and per
package, so row counts would grow with the number of tags pointing at an image.
"""

import json

import altair as alt
import pandas as pd
import streamlit as st

CACHE_TTL_SECONDS = 600
UNASSIGNED = "unassigned"  # ENVIRONMENT / OWNING_TEAM / CRITICALITY NULL: not in the inventory
SEVERITY_ORDER = ["Critical", "High", "Medium", "Low", "Negligible", "Unknown"]
INVENTORY_COLUMNS = ["ENVIRONMENT", "OWNING_TEAM", "CRITICALITY"]

# The only queries the app sends. Constant text: nothing from the user goes into SQL.
VIEW_QUERIES = {
    "scan_results_enriched": "SELECT * FROM scan_results_enriched",
    "image_summary": "SELECT * FROM image_summary",
    "vulnerability_changes": "SELECT * FROM vulnerability_changes",
}

FINDING_COLUMNS = [
    "IMAGE_TAG", "REPOSITORY", "TAG", "IMAGE_DIGEST", "IMAGE_ID", "SCANNED_AT", "DB_BUILT",
    "RESULT_FILE", "DISTRO_NAME", "DISTRO_VERSION", "VULNERABILITY_ID", "SEVERITY",
    "DESCRIPTION", "RISK_SCORE", "EPSS_SCORE", "EPSS_PERCENTILE", "IS_KEV", "CVSS_SCORE",
    "CVSS_VECTOR", "FIX_STATE", "FIXED_VERSION", "IS_FIXABLE", "PACKAGE_NAME",
    "PACKAGE_VERSION", "PACKAGE_TYPE", "PACKAGE_PURL", "ENVIRONMENT", "OWNING_TEAM",
    "CRITICALITY", "PRIORITY_SCORE",
]
IMAGE_COLUMNS = [
    "IMAGE_TAG", "REPOSITORY", "TAG", "IMAGE_DIGEST", "SCANNED_AT", "DB_BUILT", "ENVIRONMENT",
    "OWNING_TEAM", "CRITICALITY", "FINDINGS", "CRITICAL", "HIGH", "MEDIUM", "LOW",
    "NEGLIGIBLE", "UNKNOWN", "KEV", "FIXABLE", "MAX_PRIORITY", "RISK_TOTAL",
]
CHANGE_COLUMNS = [
    "IMAGE_DIGEST", "TAGS", "CHANGE_KIND", "VULNERABILITY_ID", "PACKAGE_NAME",
    "PACKAGE_VERSION", "PACKAGE_TYPE", "SEVERITY", "PREVIOUS_SEVERITY", "FIX_STATE",
    "FIX_VERSIONS", "DB_BUILT", "PREVIOUS_DB_BUILT", "OBSERVED_AT", "RESULT_FILE", "CHANGE_FILE",
]

# Columns shown in the tables (the frames keep every column).
FINDINGS_TABLE = [
    "PRIORITY_SCORE", "VULNERABILITY_ID", "SEVERITY", "IS_KEV", "RISK_SCORE", "EPSS_SCORE",
    "CVSS_SCORE", "PACKAGE_NAME", "PACKAGE_VERSION", "PACKAGE_TYPE", "FIX_STATE",
    "FIXED_VERSION", "IMAGE_TAG", "ENVIRONMENT", "OWNING_TEAM", "CRITICALITY", "SCANNED_AT",
]
IMAGES_TABLE = [
    "IMAGE_TAG", "MAX_PRIORITY", "RISK_TOTAL", "FINDINGS", "CRITICAL", "HIGH", "MEDIUM", "LOW",
    "KEV", "FIXABLE", "ENVIRONMENT", "OWNING_TEAM", "CRITICALITY", "IMAGE_DIGEST", "SCANNED_AT",
    "DB_BUILT",
]
CHANGES_TABLE = [
    "CHANGE_KIND", "VULNERABILITY_ID", "SEVERITY", "PREVIOUS_SEVERITY", "PACKAGE_NAME",
    "PACKAGE_VERSION", "PACKAGE_TYPE", "FIX_STATE", "FIX_VERSIONS", "TAGS", "IMAGE_DIGEST",
    "OBSERVED_AT",
]


# ---------------------------------------------------------------------------
# Pure helpers (no Streamlit, no Snowflake): normalising, filtering, counting.
# ---------------------------------------------------------------------------

def _as_bool(series: pd.Series) -> pd.Series:
    """True only for true values; NULL and anything else is False."""
    return series.map(
        lambda v: (isinstance(v, str) and v.strip().lower() == "true")
        or (not isinstance(v, str) and pd.notna(v) and bool(v))
    ).astype(bool)


def parse_tags(value) -> list:
    """TAGS as a list: Snowflake ARRAY arrives as a list or as a JSON string."""
    if isinstance(value, (list, tuple)):
        return [str(t) for t in value]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            parsed = json.loads(text)
        except ValueError:
            return [text]
        return [str(t) for t in parsed] if isinstance(parsed, list) else [str(parsed)]
    if hasattr(value, "tolist"):  # numpy array
        return [str(t) for t in value.tolist()]
    return []


def normalize(frame: pd.DataFrame, columns: list) -> pd.DataFrame:
    """Upper-case column names, add missing columns, fix NULLs and types."""
    df = frame.copy()
    df.columns = [str(c).upper() for c in df.columns]
    for column in columns:
        if column not in df.columns:
            df[column] = pd.Series([None] * len(df), index=df.index, dtype=object)
    for column in INVENTORY_COLUMNS:
        if column in columns:
            df[column] = df[column].astype(object).where(df[column].notna(), UNASSIGNED)
            df[column] = df[column].map(lambda v: UNASSIGNED if str(v).strip() == "" else str(v))
    for column in ("IS_KEV", "IS_FIXABLE"):
        if column in columns:
            df[column] = _as_bool(df[column])
    for column in ("RISK_SCORE", "EPSS_SCORE", "EPSS_PERCENTILE", "CVSS_SCORE",
                   "PRIORITY_SCORE", "MAX_PRIORITY", "RISK_TOTAL"):
        if column in columns:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    for column in ("FINDINGS", "CRITICAL", "HIGH", "MEDIUM", "LOW", "NEGLIGIBLE", "UNKNOWN",
                   "KEV", "FIXABLE"):
        if column in columns:
            df[column] = pd.to_numeric(df[column], errors="coerce").fillna(0).astype(int)
    for column in ("SCANNED_AT", "DB_BUILT", "PREVIOUS_DB_BUILT", "OBSERVED_AT"):
        if column in columns:
            df[column] = pd.to_datetime(df[column], errors="coerce", utc=True)
    if "FIX_STATE" in columns:  # grype writes "" when it has no fix information
        df["FIX_STATE"] = df["FIX_STATE"].map(
            lambda v: "unknown" if pd.isna(v) or str(v).strip() == "" else str(v))
    if "TAGS" in columns:
        df["TAGS"] = df["TAGS"].map(parse_tags)
    return df[columns].reset_index(drop=True)


def filter_images(df: pd.DataFrame, tags=(), environments=(), teams=()) -> pd.DataFrame:
    """Image-level filters; an empty selection means everything."""
    mask = pd.Series(True, index=df.index)
    if tags:
        mask &= df["IMAGE_TAG"].isin(list(tags))
    if environments:
        mask &= df["ENVIRONMENT"].isin(list(environments))
    if teams:
        mask &= df["OWNING_TEAM"].isin(list(teams))
    return df[mask]


def filter_findings(df: pd.DataFrame, tags=(), environments=(), teams=(), min_priority=0.0,
                    kev_only=False, fixable_only=False) -> pd.DataFrame:
    """Image-level filters plus the finding-level ones (priority >= min, KEV, fixable)."""
    out = filter_images(df, tags, environments, teams)
    if min_priority and min_priority > 0:
        out = out[out["PRIORITY_SCORE"].fillna(float("-inf")) >= float(min_priority)]
    if kev_only:
        out = out[out["IS_KEV"]]
    if fixable_only:
        out = out[out["IS_FIXABLE"]]
    return out


def overview_counts(images: pd.DataFrame, findings: pd.DataFrame) -> dict:
    """The four headline figures; see the module docstring for their definitions."""
    ids = findings["VULNERABILITY_ID"]
    return {
        "images": int(images["IMAGE_DIGEST"].dropna().nunique()),
        "cves": int(ids.dropna().nunique()),
        "critical": int(ids[findings["SEVERITY"] == "Critical"].dropna().nunique()),
        "kev": int(ids[findings["IS_KEV"]].dropna().nunique()),
    }


def rank_images(images: pd.DataFrame) -> pd.DataFrame:
    """MAX_PRIORITY desc, then RISK_TOTAL desc (NULLs last), then IMAGE_TAG."""
    keys = pd.DataFrame({
        "p": images["MAX_PRIORITY"].fillna(float("-inf")),
        "r": images["RISK_TOTAL"].fillna(float("-inf")),
        "t": images["IMAGE_TAG"].fillna("").astype(str),
    }, index=images.index)
    order = keys.sort_values(["p", "r", "t"], ascending=[False, False, True], kind="mergesort")
    return images.loc[order.index].reset_index(drop=True)


def sort_findings(findings: pd.DataFrame) -> pd.DataFrame:
    """PRIORITY_SCORE desc, then RISK_SCORE desc, then image and CVE."""
    keys = pd.DataFrame({
        "p": findings["PRIORITY_SCORE"].fillna(float("-inf")),
        "r": findings["RISK_SCORE"].fillna(float("-inf")),
        "t": findings["IMAGE_TAG"].fillna("").astype(str),
        "v": findings["VULNERABILITY_ID"].fillna("").astype(str),
    }, index=findings.index)
    order = keys.sort_values(["p", "r", "t", "v"], ascending=[False, False, True, True],
                             kind="mergesort")
    return findings.loc[order.index].reset_index(drop=True)


def count_by(findings: pd.DataFrame, column: str) -> pd.DataFrame:
    """Findings per value of column, as columns [column, FINDINGS]."""
    values = findings[column].astype(object).where(findings[column].notna(), UNASSIGNED)
    counts = values.groupby(values).size()
    return pd.DataFrame({column: list(counts.index), "FINDINGS": [int(n) for n in counts]})


def latest_changes(changes: pd.DataFrame) -> pd.DataFrame:
    """Rows of the newest DB_BUILT only (empty when there is none)."""
    built = changes["DB_BUILT"].dropna()
    if built.empty:
        return changes.iloc[0:0]
    return changes[changes["DB_BUILT"] == built.max()]


def change_counts(changes: pd.DataFrame) -> dict:
    kinds = changes["CHANGE_KIND"].fillna("").astype(str).str.lower()
    return {kind: int((kinds == kind).sum()) for kind in ("added", "removed", "changed")}


def sorted_options(*series) -> list:
    values = set()
    for s in series:
        values.update(str(v) for v in s.dropna().unique())
    return sorted(values)


# ---------------------------------------------------------------------------
# Data loading: the only place that talks to Snowflake.
# ---------------------------------------------------------------------------

@st.cache_data(ttl=CACHE_TTL_SECONDS, show_spinner="Loading scan results ...")
def load_view(view: str) -> pd.DataFrame:
    from snowflake.snowpark.context import get_active_session

    session = get_active_session()
    return session.sql(VIEW_QUERIES[view]).to_pandas()


def load_data():
    findings = normalize(load_view("scan_results_enriched"), FINDING_COLUMNS)
    images = normalize(load_view("image_summary"), IMAGE_COLUMNS)
    changes = normalize(load_view("vulnerability_changes"), CHANGE_COLUMNS)
    return findings, images, changes


# ---------------------------------------------------------------------------
# Views: one function each.
# ---------------------------------------------------------------------------

def sidebar_filters(findings: pd.DataFrame, images: pd.DataFrame) -> dict:
    sb = st.sidebar
    sb.header("Filters")
    return {
        "tags": sb.multiselect("Image", sorted_options(images["IMAGE_TAG"], findings["IMAGE_TAG"]),
                               key="f_images"),
        "environments": sb.multiselect(
            "Environment", sorted_options(images["ENVIRONMENT"], findings["ENVIRONMENT"]),
            key="f_environments"),
        "teams": sb.multiselect(
            "Team", sorted_options(images["OWNING_TEAM"], findings["OWNING_TEAM"]),
            key="f_teams"),
        "min_priority": sb.number_input("Minimum priority", min_value=0.0, max_value=100.0,
                                        value=0.0, step=10.0, key="f_min_priority"),
        "kev_only": sb.checkbox("Known exploited (KEV) only", key="f_kev_only"),
        "fixable_only": sb.checkbox("Fixable only", key="f_fixable_only"),
    }


def show_overview(images: pd.DataFrame, findings: pd.DataFrame) -> None:
    counts = overview_counts(images, findings)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Images", counts["images"], help="Distinct image digests")
    c2.metric("CVEs", counts["cves"], help="Distinct vulnerability IDs in the filtered findings")
    c3.metric("Critical CVEs", counts["critical"], help="Distinct IDs with severity Critical")
    c4.metric("KEV CVEs", counts["kev"], help="Distinct IDs in CISA's Known Exploited list")


def show_ranked_images(images: pd.DataFrame) -> None:
    st.subheader("Images ranked by risk")
    st.caption("Sorted by highest finding priority, then total grype risk. One row per tag.")
    if images.empty:
        st.info("No images match the filters.")
        return
    st.dataframe(rank_images(images)[IMAGES_TABLE])


def show_findings(findings: pd.DataFrame) -> None:
    st.subheader("Vulnerabilities")
    st.caption("Priority: KEV 100; grype risk >= 80 keeps the risk; EPSS >= 0.1 gives 90; "
               "Critical 80; High 60; otherwise 40.")
    if findings.empty:
        st.info("No findings match the filters.")
        return
    st.dataframe(sort_findings(findings)[FINDINGS_TABLE])


def bar_chart(counts: pd.DataFrame, column: str, title: str, order=None):
    x_order = order if order is not None else "-y"
    return (
        alt.Chart(counts, title=title)
        .mark_bar()
        .encode(
            x=alt.X(f"{column}:N", sort=x_order, title=None),
            y=alt.Y("FINDINGS:Q", title="Findings"),
            tooltip=[column, "FINDINGS"],
        )
    )


def show_charts(findings: pd.DataFrame) -> None:
    st.subheader("Findings by ...")
    if findings.empty:
        st.info("No findings to chart.")
        return
    charts = [
        ("SEVERITY", "Severity", SEVERITY_ORDER),
        ("ENVIRONMENT", "Environment", None),
        ("OWNING_TEAM", "Team", None),
        ("FIX_STATE", "Fix state", None),
    ]
    left, right = st.columns(2)
    for i, (column, title, order) in enumerate(charts):
        counts = count_by(findings, column)
        (left if i % 2 == 0 else right).altair_chart(bar_chart(counts, column, title, order))


def show_changes(changes: pd.DataFrame) -> None:
    st.subheader("What changed since the last DB update")
    latest = latest_changes(changes)
    if latest.empty:
        st.info("No vulnerability DB changes recorded yet.")
        return
    built = latest["DB_BUILT"].max()
    previous = latest["PREVIOUS_DB_BUILT"].dropna()
    since = f" (previous DB built {previous.max():%Y-%m-%d %H:%M} UTC)" if not previous.empty else ""
    st.caption(f"Vulnerability DB built {built:%Y-%m-%d %H:%M} UTC{since}. "
               "Not affected by the sidebar filters.")
    counts = change_counts(latest)
    c1, c2, c3 = st.columns(3)
    c1.metric("Added", counts["added"])
    c2.metric("Removed", counts["removed"])
    c3.metric("Changed", counts["changed"])
    table = latest[CHANGES_TABLE].copy()
    table["TAGS"] = table["TAGS"].map(", ".join)
    st.dataframe(table.sort_values(["CHANGE_KIND", "VULNERABILITY_ID"]).reset_index(drop=True))


def main() -> None:
    st.set_page_config(page_title="Image vulnerabilities", layout="wide")
    st.title("Container image vulnerabilities")
    findings, images, changes = load_data()
    if images.empty and findings.empty:
        st.info("No scan results yet. Results appear here once the scanner has written "
                "its first grype report to the stage.")
        show_changes(changes)
        return
    f = sidebar_filters(findings, images)
    images_f = filter_images(images, f["tags"], f["environments"], f["teams"])
    findings_f = filter_findings(findings, **f)
    show_overview(images_f, findings_f)
    tab_images, tab_vulns, tab_charts, tab_changes = st.tabs(
        ["Images", "Vulnerabilities", "Charts", "Changed since last DB update"])
    with tab_images:
        show_ranked_images(images_f)
    with tab_vulns:
        show_findings(findings_f)
    with tab_charts:
        show_charts(findings_f)
    with tab_changes:
        show_changes(changes)


if __name__ == "__main__":
    main()
