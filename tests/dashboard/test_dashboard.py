"""Offline test of streamlit/streamlit_app.py.

The app runs under streamlit.testing.v1.AppTest against a TEST STAND-IN for
snowflake.snowpark.context (snowpark_standin.py) whose frames are built from the real grype
samples in tests/fixtures/grype/ (grype_frames.py). Expected values are computed here from
the JSON documents or the frames, not with the app's helper functions.

Run: python -m pytest -q tests/dashboard   (after pip install -r tests/dashboard/requirements.txt)
"""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

import grype_frames as gf
from snowpark_standin import StandInQueryRefused, StandInSession, install_snowpark_standin

APP = Path(__file__).resolve().parents[2] / "streamlit" / "streamlit_app.py"
KNOWN_QUERIES = {
    "SELECT * FROM scan_results_enriched",
    "SELECT * FROM image_summary",
    "SELECT * FROM vulnerability_changes",
}


def load_app_module():
    """The app as a module (its main() only runs under Streamlit, as __main__)."""
    spec = importlib.util.spec_from_file_location("streamlit_app_under_test", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


app = load_app_module()


@pytest.fixture(autouse=True)
def fresh_cache():
    # st.cache_data is process-wide: without this one test's frames would serve the next.
    st.cache_data.clear()
    yield
    st.cache_data.clear()


@pytest.fixture
def frames():
    return gf.sample_frames()


def run_app(monkeypatch, frames):
    session = install_snowpark_standin(monkeypatch, frames)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    return at, session


@pytest.fixture
def running(monkeypatch, frames):
    return run_app(monkeypatch, frames)


# ---- helpers to read the rendered app --------------------------------------------------

def metrics(at):
    return {m.label: m.value for m in at.metric}


def table_with(at, column, absent=None):
    """The st.dataframe whose columns include `column` (and not `absent`), or None."""
    found = [d.value for d in at.dataframe
             if column in d.value.columns and (absent is None or absent not in d.value.columns)]
    assert len(found) <= 1, f"more than one table with {column}"
    return found[0] if found else None


def findings_table(at):
    return table_with(at, "PRIORITY_SCORE")


def images_table(at):
    return table_with(at, "MAX_PRIORITY")


def changes_table(at):
    return table_with(at, "CHANGE_KIND")


def charts(at):
    """{chart title: data frame} of the vega-lite charts."""
    out = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        data = [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data)
                for d in chart.proto.datasets]
        out[spec.get("title")] = data[0] if data else None
    return out


def assert_clean(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# ---- the app runs and reads only the three views ---------------------------------------

def test_app_runs_and_queries_only_the_known_views(running):
    at, session = running
    assert_clean(at)
    assert sorted(session.queries) == sorted(KNOWN_QUERIES)  # each view once, nothing else
    assert at.title[0].value
    at.run()  # a rerun is served from st.cache_data
    assert_clean(at)
    assert sorted(session.queries) == sorted(KNOWN_QUERIES)


def test_standin_refuses_unknown_queries(frames):
    session = StandInSession(frames)
    with pytest.raises(StandInQueryRefused):
        session.sql("SELECT * FROM scan_results_raw")
    with pytest.raises(StandInQueryRefused):
        session.sql("SELECT * FROM image_summary WHERE 1=1")
    assert len(session.sql("SELECT * FROM image_summary").to_pandas()) == len(
        frames["image_summary"])


# ---- overview ---------------------------------------------------------------------------

def expected_overview_from_json():
    """Straight from the grype documents: distinct digests and distinct vulnerability IDs."""
    digests, ids, critical, kev = set(), set(), set(), set()
    for sample in gf.SAMPLES:
        digests.add(sample.image_digest)
        for match in sample.doc["matches"]:
            vuln = match["vulnerability"]
            ids.add(vuln["id"])
            if vuln.get("severity") == "Critical":
                critical.add(vuln["id"])
            if vuln.get("knownExploited"):
                kev.add(vuln["id"])
    return {"Images": len(digests), "CVEs": len(ids), "Critical CVEs": len(critical),
            "KEV CVEs": len(kev)}


def test_overview_metrics(running):
    at, _ = running
    assert_clean(at)
    expected = expected_overview_from_json()
    shown = metrics(at)
    for label, value in expected.items():
        assert shown[label] == str(value), label
    # The samples make "distinct CVEs" and "finding rows" differ, so the definition is tested:
    findings = gf.scan_results_enriched()
    assert (findings["SEVERITY"] == "Critical").sum() != expected["Critical CVEs"]
    assert findings["IS_KEV"].sum() != expected["KEV CVEs"]
    assert len(gf.image_summary()) != expected["Images"]  # two tags share one digest


# ---- ranked images ----------------------------------------------------------------------

def test_images_ranked_by_priority_then_risk(running, frames):
    at, _ = running
    table = images_table(at)
    summary = frames["image_summary"]
    assert table is not None and len(table) == len(summary)

    def key(row):
        p = row["MAX_PRIORITY"]
        r = row["RISK_TOTAL"]
        return (-(p if pd.notna(p) else float("-inf")),
                -(r if pd.notna(r) else float("-inf")), row["IMAGE_TAG"])

    expected = [row["IMAGE_TAG"] for _, row in sorted(summary.iterrows(), key=lambda x: key(x[1]))]
    assert list(table["IMAGE_TAG"]) == expected
    # The zero-finding image is listed (last: no priority), and NULL inventory is "unassigned".
    empty_tag = gf.SAMPLES[2].image_tags()[0]
    assert list(table["IMAGE_TAG"])[-1] == empty_tag
    unassigned = summary.loc[summary["ENVIRONMENT"].isna(), "IMAGE_TAG"]
    assert len(unassigned) > 0
    shown = table.set_index("IMAGE_TAG")
    for tag in unassigned:
        assert shown.loc[tag, "ENVIRONMENT"] == "unassigned"
        assert shown.loc[tag, "OWNING_TEAM"] == "unassigned"


# ---- findings table and its filters -----------------------------------------------------

def test_findings_table_unfiltered(running, frames):
    at, _ = running
    table = findings_table(at)
    raw = frames["scan_results_enriched"]
    assert len(table) == len(raw)
    assert table["PRIORITY_SCORE"].is_monotonic_decreasing
    assert (table["ENVIRONMENT"] == "unassigned").sum() == raw["ENVIRONMENT"].isna().sum()


KEYCLOAK_TAG = gf.SAMPLES[1].image_tags()[0]

# (widget settings, predicate on the raw findings frame giving the expected rows)
FILTER_CASES = {
    "kev_only": ({"f_kev_only": True}, lambda f: f["IS_KEV"]),
    "fixable_only": ({"f_fixable_only": True}, lambda f: f["IS_FIXABLE"]),
    "min_priority_50": ({"f_min_priority": 50.0}, lambda f: f["PRIORITY_SCORE"] >= 50),
    # The top score itself: the bound is inclusive.
    "min_priority_max": ({"f_min_priority": "MAX"},
                         lambda f: f["PRIORITY_SCORE"] >= f["PRIORITY_SCORE"].max()),
    "environment_staging": ({"f_environments": ["staging"]},
                            lambda f: f["ENVIRONMENT"] == "staging"),
    "environment_unassigned": ({"f_environments": ["unassigned"]},
                               lambda f: f["ENVIRONMENT"].isna()),
    "team_unassigned": ({"f_teams": ["unassigned"]}, lambda f: f["OWNING_TEAM"].isna()),
    "team_payments": ({"f_teams": ["payments"]}, lambda f: f["OWNING_TEAM"] == "payments"),
    "image_keycloak": ({"f_images": [KEYCLOAK_TAG]}, lambda f: f["IMAGE_TAG"] == KEYCLOAK_TAG),
    "image_keycloak_and_kev": ({"f_images": [KEYCLOAK_TAG], "f_kev_only": True},
                               lambda f: (f["IMAGE_TAG"] == KEYCLOAK_TAG) & f["IS_KEV"]),
}


def set_widget(at, key, value):
    for kind in ("checkbox", "multiselect", "number_input"):
        widgets = [w for w in getattr(at, kind) if w.key == key]
        if widgets:
            widgets[0].set_value(value)
            return
    raise AssertionError(f"no widget with key {key!r}")


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_findings_filters(case, running, frames):
    at, _ = running
    raw = frames["scan_results_enriched"]
    settings, predicate = FILTER_CASES[case]
    for key, value in settings.items():
        set_widget(at, key, float(raw["PRIORITY_SCORE"].max()) if value == "MAX" else value)
    at.run()
    assert_clean(at)

    expected = raw[predicate(raw)]
    assert len(expected) < len(raw), "test data must make this filter matter"
    table = findings_table(at)
    if expected.empty:
        assert table is None
        assert any("No findings match" in i.value for i in at.info)
    else:
        assert len(table) == len(expected)
        assert sorted(table["VULNERABILITY_ID"]) == sorted(expected["VULNERABILITY_ID"])
        assert sorted(table["IMAGE_TAG"]) == sorted(expected["IMAGE_TAG"])
    # The overview follows the filters: distinct IDs of exactly these rows.
    assert metrics(at)["CVEs"] == str(expected["VULNERABILITY_ID"].nunique())
    assert metrics(at)["KEV CVEs"] == str(
        expected.loc[expected["IS_KEV"], "VULNERABILITY_ID"].nunique())


def test_image_filters_narrow_the_images(running, frames):
    at, _ = running
    set_widget(at, "f_environments", ["staging"])
    at.run()
    summary = frames["image_summary"]
    staging = summary[summary["ENVIRONMENT"] == "staging"]
    assert list(images_table(at)["IMAGE_TAG"]) == list(staging["IMAGE_TAG"])
    assert metrics(at)["Images"] == str(staging["IMAGE_DIGEST"].nunique())


# ---- charts -----------------------------------------------------------------------------

def test_charts_render_the_findings_counts(running, frames):
    at, _ = running
    assert_clean(at)
    shown = charts(at)
    raw = frames["scan_results_enriched"]
    expected = {
        "Severity": raw["SEVERITY"],
        "Environment": raw["ENVIRONMENT"].fillna("unassigned"),
        "Team": raw["OWNING_TEAM"].fillna("unassigned"),
        "Fix state": raw["FIX_STATE"].replace("", "unknown").fillna("unknown"),
    }
    assert set(shown) == set(expected)
    for title, values in expected.items():
        data = shown[title]
        column = [c for c in data.columns if c != "FINDINGS"][0]
        assert dict(zip(data[column], data["FINDINGS"])) == values.value_counts().to_dict(), title


# ---- what changed since the last DB update ----------------------------------------------

def test_changes_show_only_the_newest_db_build(running):
    at, _ = running
    assert_clean(at)
    older, newest = gf.change_rows()
    shown = metrics(at)
    for kind in ("added", "removed", "changed"):
        expected = sum(r["CHANGE_KIND"] == kind for r in newest)
        assert shown[kind.capitalize()] == str(expected), kind
        # The older build has rows of this kind too, so counting every build would fail.
        assert sum(r["CHANGE_KIND"] == kind for r in older) > 0
    table = changes_table(at)
    assert len(table) == len(newest)
    got = set(zip(table["CHANGE_KIND"], table["VULNERABILITY_ID"], table["PACKAGE_NAME"]))
    assert got == {(r["CHANGE_KIND"], r["VULNERABILITY_ID"], r["PACKAGE_NAME"]) for r in newest}
    # TAGS arrives as a list or as a JSON string; both are shown as the plain tag list.
    for tags in table["TAGS"]:
        assert "[" not in tags and '"' not in tags
        assert all(t.startswith("db/schema/repo/") for t in tags.split(", "))


# ---- a new account ----------------------------------------------------------------------

def test_empty_account_shows_info(monkeypatch):
    at, session = run_app(monkeypatch, gf.empty_frames())
    assert_clean(at)
    assert any("No scan results yet" in i.value for i in at.info)
    assert not at.dataframe and not at.get("vega_lite_chart")
    assert sorted(session.queries) == sorted(KNOWN_QUERIES)


def test_images_without_findings_and_no_changes(monkeypatch, frames):
    """Images scanned, none with findings, no DB change yet: no traceback anywhere."""
    empty = gf.empty_frames()
    only_empty_image = gf.image_summary([gf.SAMPLES[2]])
    at, _ = run_app(monkeypatch, {**empty, "image_summary": only_empty_image})
    assert_clean(at)
    assert metrics(at)["Images"] == "1" and metrics(at)["CVEs"] == "0"
    assert len(images_table(at)) == 1
    assert findings_table(at) is None
    infos = " ".join(i.value for i in at.info)
    assert "No findings match" in infos and "No vulnerability DB changes" in infos


# ---- the priority rule (the test frames' mirror of the view) ----------------------------

@pytest.mark.parametrize("is_kev, risk, epss, severity, expected", [
    (True, None, None, "Low", 100.0),          # KEV wins over everything
    (True, 96.25, 0.5, "Critical", 100.0),
    (False, 80.0, None, "Low", 80.0),          # risk exactly 80 keeps the risk
    (False, 96.25, 0.5, "Low", 96.25),         # risk >= 80 beats EPSS
    (False, 79.99, None, "Low", 40.0),         # just below 80 falls through
    (False, 79.99, 0.1, "Low", 90.0),          # EPSS exactly 0.1 gives 90
    (False, None, 0.0999, "Low", 40.0),        # just below 0.1 falls through
    (False, None, None, "Critical", 80.0),
    (False, 1.68, 0.03, "Critical", 80.0),
    (False, None, None, "High", 60.0),
    (False, None, None, "Medium", 40.0),
    (False, None, None, "Low", 40.0),
    (False, None, None, "Negligible", 40.0),
    (False, None, None, "Unknown", 40.0),
])
def test_priority_rule(is_kev, risk, epss, severity, expected):
    assert gf.priority_score(is_kev, risk, epss, severity) == expected


def test_sample_priorities_follow_the_rule():
    """The golden KEV finding scores 100 and the other sample findings 40."""
    raw = gf.scan_results_enriched()
    kev = raw["IS_KEV"]
    assert set(raw.loc[kev, "PRIORITY_SCORE"]) == {100.0}
    assert set(raw.loc[~kev, "PRIORITY_SCORE"]) == {40.0}


# ---- the app's pure helpers -------------------------------------------------------------

def test_parse_tags_accepts_list_json_and_null():
    assert app.parse_tags(["a/b:1", "a/b:2"]) == ["a/b:1", "a/b:2"]
    assert app.parse_tags('["a/b:1","a/b:2"]') == ["a/b:1", "a/b:2"]
    assert app.parse_tags(None) == [] and app.parse_tags("") == []
    assert app.parse_tags(float("nan")) == []


def test_normalize_handles_nulls(frames):
    raw = frames["scan_results_enriched"]
    lower = raw.rename(columns=str.lower)  # column case does not matter
    df = app.normalize(lower, app.FINDING_COLUMNS)
    assert (df["ENVIRONMENT"] == "unassigned").sum() == raw["ENVIRONMENT"].isna().sum()
    assert df["IS_KEV"].dtype == bool and df["IS_KEV"].sum() == raw["IS_KEV"].sum()
    assert df["FIX_STATE"].ne("").all()
    missing = app.normalize(raw.drop(columns=["RISK_SCORE"]), app.FINDING_COLUMNS)
    assert missing["RISK_SCORE"].isna().all()


def test_latest_changes_helper(frames):
    changes = app.normalize(frames["vulnerability_changes"], app.CHANGE_COLUMNS)
    _, newest = gf.change_rows()
    assert len(app.latest_changes(changes)) == len(newest)
    assert app.latest_changes(changes.iloc[0:0]).empty
