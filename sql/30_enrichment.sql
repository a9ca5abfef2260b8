-- spcs-image-scanner, step 5: enrichment. Who owns each image, where it runs, and a
-- priority per finding; the dashboard (streamlit/) reads these views.
--
--   snow sql -f sql/30_enrichment.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D viewer_role=scanner_viewer
--
-- Idempotent: the asset inventory is IF NOT EXISTS (its rows are yours: the sample rows
-- are inserted only into an empty table), views OR REPLACE.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

-- image_pattern is a LIKE pattern over "<repository>:<tag>", e.g. 'db/schema/repo/python:%'.
-- When several patterns match a tag, the longest (most specific) wins.
CREATE TABLE IF NOT EXISTS asset_inventory (
  image_pattern VARCHAR NOT NULL,
  environment VARCHAR,
  owning_team VARCHAR,
  criticality VARCHAR
) COMMENT = 'spcs-image-scanner: which team owns which images, and where they run';

INSERT INTO asset_inventory (image_pattern, environment, owning_team, criticality)
SELECT column1, column2, column3, column4
FROM VALUES
  ('%python:3.6%', 'dev', 'data-platform', 'tier-3'),
  ('%postgis%', 'prod', 'geospatial', 'tier-1')
WHERE NOT EXISTS (SELECT 1 FROM asset_inventory);

-- One row per finding of an image's newest result, per tag that points at the image
-- today (an image no tag points at any more drops out; its results stay in
-- scan_results_latest). Priority, highest first: a known exploited vulnerability (CISA
-- KEV) 100; a grype risk of 80 or more keeps its risk; an EPSS of 0.1 or more 90;
-- Critical 80; High 60; anything else 40.
CREATE OR REPLACE VIEW scan_results_enriched AS
SELECT
  t.image_tag,
  t.repository,
  t.tag,
  r.image_digest,
  r.image_id,
  r.scanned_at,
  r.db_built,
  r.result_file,
  r.distro_name,
  r.distro_version,
  r.vulnerability_id,
  r.severity,
  r.description,
  r.risk_score,
  r.epss_score,
  r.epss_percentile,
  r.is_kev,
  r.cvss_score,
  r.cvss_vector,
  r.fix_state,
  r.fixed_version,
  r.is_fixable,
  r.package_name,
  r.package_version,
  r.package_type,
  r.package_purl,
  a.environment,
  a.owning_team,
  a.criticality,
  CASE
    WHEN r.is_kev THEN 100
    WHEN r.risk_score >= 80 THEN r.risk_score
    WHEN r.epss_score >= 0.1 THEN 90
    WHEN r.severity = 'Critical' THEN 80
    WHEN r.severity = 'High' THEN 60
    ELSE 40
  END::FLOAT AS priority_score
FROM scan_results_latest r
JOIN image_tags_current t ON t.image_digest = r.image_digest
LEFT JOIN asset_inventory a ON t.image_tag LIKE a.image_pattern
QUALIFY ROW_NUMBER() OVER (
  PARTITION BY t.image_tag, r.result_file, r.match_index
  ORDER BY LENGTH(a.image_pattern) DESC NULLS LAST
) = 1;

-- One row per tag that points at a scanned image today, with zeros for a clean image.
CREATE OR REPLACE VIEW image_summary AS
WITH owner AS (
  SELECT t.image_tag, a.environment, a.owning_team, a.criticality
  FROM image_tags_current t
  LEFT JOIN asset_inventory a ON t.image_tag LIKE a.image_pattern
  QUALIFY ROW_NUMBER() OVER (PARTITION BY t.image_tag ORDER BY LENGTH(a.image_pattern) DESC NULLS LAST) = 1
),
findings AS (
  SELECT
    image_tag,
    COUNT(*) AS findings,
    COUNT_IF(severity = 'Critical') AS critical,
    COUNT_IF(severity = 'High') AS high,
    COUNT_IF(severity = 'Medium') AS medium,
    COUNT_IF(severity = 'Low') AS low,
    COUNT_IF(severity = 'Negligible') AS negligible,
    COUNT_IF(severity NOT IN ('Critical', 'High', 'Medium', 'Low', 'Negligible') OR severity IS NULL) AS unknown,
    COUNT_IF(is_kev) AS kev,
    COUNT_IF(is_fixable) AS fixable,
    MAX(priority_score) AS max_priority,
    SUM(COALESCE(risk_score, 0)) AS risk_total
  FROM scan_results_enriched
  GROUP BY image_tag
)
SELECT
  t.image_tag,
  t.repository,
  t.tag,
  s.image_digest,
  s.scanned_at,
  s.db_built,
  o.environment,
  o.owning_team,
  o.criticality,
  COALESCE(f.findings, 0) AS findings,
  COALESCE(f.critical, 0) AS critical,
  COALESCE(f.high, 0) AS high,
  COALESCE(f.medium, 0) AS medium,
  COALESCE(f.low, 0) AS low,
  COALESCE(f.negligible, 0) AS negligible,
  COALESCE(f.unknown, 0) AS unknown,
  COALESCE(f.kev, 0) AS kev,
  COALESCE(f.fixable, 0) AS fixable,
  f.max_priority,
  COALESCE(f.risk_total, 0) AS risk_total
FROM image_tags_current t
JOIN scans_latest s ON s.image_digest = t.image_digest
LEFT JOIN owner o ON o.image_tag = t.image_tag
LEFT JOIN findings f ON f.image_tag = t.image_tag;

GRANT SELECT ON TABLE asset_inventory TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW scan_results_enriched TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW image_summary TO ROLE <% viewer_role %>;
