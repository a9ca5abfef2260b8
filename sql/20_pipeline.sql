-- spcs-image-scanner, step 3: the results pipeline. Raw tables that the loaders fill
-- (sql/21_load_snowpipe.sql on AWS, or sql/22_load_task.sql anywhere), and the views that
-- read them.
--
--   snow sql -f sql/20_pipeline.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D viewer_role=scanner_viewer
--
-- What the scanner writes to @scan_results_stage (every name written once, never reused):
--   scans/<digest hex>/<UTC timestamp>_<DB build>.json  grype's JSON document, unchanged
--   inventory/<UTC timestamp>.json   array of tag changes {repository, tag, digest,
--                                    index_digest, platform, change, previous_digest, observed_at}
--   changes/<UTC timestamp>.json     array of re-match differences {digest, tags, result,
--                                    db_build, previous_db_build, observed_at, added[],
--                                    removed[], changed[{before, after}]}
--   failures/<UTC timestamp>_<digest hex>.json  one failed scan or re-match
--   sboms/<digest hex>.syft.json     the SBOM (not loaded here)
-- The digest in a scan file's name is the platform manifest digest the scanner keyed the
-- image by (grype's source.target.manifestDigest); the timestamp says when it was scanned
-- and the DB build which vulnerability DB it was matched with. Times taken from file
-- names and DB builds are UTC, as TIMESTAMP_NTZ; record times (observed_at) keep their
-- offset, as TIMESTAMP_TZ.
--
-- Idempotent: tables are IF NOT EXISTS (never dropped: they hold the history), views and
-- file formats OR REPLACE.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

-- A grype document is one JSON object per file; the record files are JSON arrays whose
-- elements become one row each.
CREATE OR REPLACE FILE FORMAT scanner_json_document TYPE = JSON;
CREATE OR REPLACE FILE FORMAT scanner_json_records TYPE = JSON STRIP_OUTER_ARRAY = TRUE;

CREATE TABLE IF NOT EXISTS scans_raw (
  scan VARIANT COMMENT 'grype -o json document',
  filename VARCHAR COMMENT 'path in @scan_results_stage',
  loaded_at TIMESTAMP_LTZ DEFAULT CURRENT_TIMESTAMP()
) COMMENT = 'spcs-image-scanner: one row per result file';

CREATE TABLE IF NOT EXISTS inventory_raw (
  inventory_record VARIANT,
  filename VARCHAR,
  loaded_at TIMESTAMP_LTZ DEFAULT CURRENT_TIMESTAMP()
) COMMENT = 'spcs-image-scanner: one row per tag change';

CREATE TABLE IF NOT EXISTS changes_raw (
  change_record VARIANT,
  filename VARCHAR,
  loaded_at TIMESTAMP_LTZ DEFAULT CURRENT_TIMESTAMP()
) COMMENT = 'spcs-image-scanner: one row per re-matched digest whose findings changed';

CREATE TABLE IF NOT EXISTS failures_raw (
  failure_record VARIANT,
  filename VARCHAR,
  loaded_at TIMESTAMP_LTZ DEFAULT CURRENT_TIMESTAMP()
) COMMENT = 'spcs-image-scanner: one row per failed scan or re-match';

-- One row per result file. A file loaded twice (switching loaders) counts once.
CREATE OR REPLACE VIEW scans AS
SELECT
  COALESCE(
    'sha256:' || REGEXP_SUBSTR(r.filename, 'scans/([0-9a-f]{64})/', 1, 1, 'e', 1),
    r.scan:source.target.manifestDigest::VARCHAR
  ) AS image_digest,
  r.scan:source.target.imageID::VARCHAR AS image_id,
  r.scan:source.target.userInput::VARCHAR AS scanned_reference,
  TRY_TO_TIMESTAMP_NTZ(
    REGEXP_SUBSTR(r.filename, '/([0-9]{8}T[0-9]{6}[.][0-9]{3})Z_', 1, 1, 'e', 1),
    'YYYYMMDD"T"HH24MISS.FF3'
  ) AS scanned_at,
  TRY_TO_TIMESTAMP_NTZ(
    REGEXP_SUBSTR(r.filename, 'Z_([0-9]{8}T[0-9]{6})Z', 1, 1, 'e', 1),
    'YYYYMMDD"T"HH24MISS'
  ) AS db_built,
  r.scan:descriptor.name::VARCHAR AS scanner_name,
  r.scan:descriptor.version::VARCHAR AS scanner_version,
  r.scan:distro.name::VARCHAR AS distro_name,
  r.scan:distro.version::VARCHAR AS distro_version,
  ARRAY_SIZE(r.scan:matches) AS match_count,
  r.filename AS result_file,
  r.loaded_at
FROM scans_raw r
WHERE r.filename ILIKE '%scans/%'
QUALIFY ROW_NUMBER() OVER (PARTITION BY r.filename ORDER BY r.loaded_at) = 1;

-- One row per finding per result file: grype's own fields, no guessing. KEV is
-- knownExploited (a list of CISA KEV entries; grype writes no "kev" key), EPSS and CVSS
-- take grype's first entry, fix versions are joined.
CREATE OR REPLACE VIEW scan_results AS
SELECT
  s.image_digest,
  s.image_id,
  s.scanned_reference,
  s.scanned_at,
  s.db_built,
  s.distro_name,
  s.distro_version,
  mt.value:vulnerability.id::VARCHAR AS vulnerability_id,
  mt.value:vulnerability.severity::VARCHAR AS severity,
  mt.value:vulnerability.description::VARCHAR AS description,
  mt.value:vulnerability.risk::FLOAT AS risk_score,
  mt.value:vulnerability.epss[0].epss::FLOAT AS epss_score,
  mt.value:vulnerability.epss[0].percentile::FLOAT AS epss_percentile,
  COALESCE(ARRAY_SIZE(mt.value:vulnerability.knownExploited), 0) > 0 AS is_kev,
  mt.value:vulnerability.cvss[0].metrics.baseScore::FLOAT AS cvss_score,
  mt.value:vulnerability.cvss[0].vector::VARCHAR AS cvss_vector,
  mt.value:vulnerability.fix.state::VARCHAR AS fix_state,
  ARRAY_TO_STRING(mt.value:vulnerability.fix.versions, ', ') AS fixed_version,
  COALESCE(mt.value:vulnerability.fix.state::VARCHAR = 'fixed', FALSE) AS is_fixable,
  mt.value:artifact.name::VARCHAR AS package_name,
  mt.value:artifact.version::VARCHAR AS package_version,
  mt.value:artifact.type::VARCHAR AS package_type,
  mt.value:artifact.purl::VARCHAR AS package_purl,
  mt.index AS match_index,
  s.result_file
FROM scans s
JOIN scans_raw r ON r.filename = s.result_file AND r.loaded_at = s.loaded_at,
  LATERAL FLATTEN(input => r.scan:matches) mt;

-- The newest result per image digest: a re-match writes a new file per DB build, and
-- only the newest says what is true today.
CREATE OR REPLACE VIEW scans_latest AS
SELECT *
FROM scans
QUALIFY ROW_NUMBER() OVER (PARTITION BY image_digest ORDER BY scanned_at DESC, result_file DESC) = 1;

CREATE OR REPLACE VIEW scan_results_latest AS
SELECT r.*
FROM scan_results r
JOIN scans_latest l ON l.result_file = r.result_file;

-- Tag changes as the scanner saw them.
CREATE OR REPLACE VIEW inventory_records AS
SELECT
  i.inventory_record:repository::VARCHAR AS repository,
  i.inventory_record:tag::VARCHAR AS tag,
  i.inventory_record:repository::VARCHAR || ':' || i.inventory_record:tag::VARCHAR AS image_tag,
  i.inventory_record:digest::VARCHAR AS image_digest,
  i.inventory_record:index_digest::VARCHAR AS index_digest,
  i.inventory_record:platform::VARCHAR AS platform,
  i.inventory_record:change::VARCHAR AS change_type,
  i.inventory_record:previous_digest::VARCHAR AS previous_digest,
  TRY_TO_TIMESTAMP_TZ(i.inventory_record:observed_at::VARCHAR) AS observed_at,
  i.filename AS inventory_file
FROM inventory_raw i
QUALIFY ROW_NUMBER() OVER (
  PARTITION BY i.filename, i.inventory_record:repository, i.inventory_record:tag
  ORDER BY i.loaded_at
) = 1;

-- Which image each tag points at today: the newest change per tag, unless that change
-- removed it. Findings are shown under every tag listed here for their digest.
CREATE OR REPLACE VIEW image_tags_current AS
SELECT repository, tag, image_tag, image_digest, index_digest, platform, observed_at AS tagged_at
FROM (
  SELECT *
  FROM inventory_records
  QUALIFY ROW_NUMBER() OVER (
    PARTITION BY repository, tag ORDER BY observed_at DESC, inventory_file DESC
  ) = 1
)
WHERE change_type <> 'removed';

-- What a re-match against a new DB changed, one row per finding.
CREATE OR REPLACE VIEW vulnerability_changes AS
WITH records AS (
  SELECT c.change_record, c.filename
  FROM changes_raw c
  QUALIFY ROW_NUMBER() OVER (
    PARTITION BY c.filename, c.change_record:digest ORDER BY c.loaded_at
  ) = 1
)
SELECT
  c.change_record:digest::VARCHAR AS image_digest,
  c.change_record:tags AS tags,
  'added' AS change_kind,
  ad.value:vulnerability::VARCHAR AS vulnerability_id,
  ad.value:package::VARCHAR AS package_name,
  ad.value:version::VARCHAR AS package_version,
  ad.value:type::VARCHAR AS package_type,
  ad.value:severity::VARCHAR AS severity,
  NULL::VARCHAR AS previous_severity,
  ad.value:fix_state::VARCHAR AS fix_state,
  ARRAY_TO_STRING(ad.value:fix_versions, ', ') AS fix_versions,
  TRY_TO_TIMESTAMP_NTZ(c.change_record:db_build::VARCHAR) AS db_built,
  TRY_TO_TIMESTAMP_NTZ(c.change_record:previous_db_build::VARCHAR) AS previous_db_built,
  TRY_TO_TIMESTAMP_TZ(c.change_record:observed_at::VARCHAR) AS observed_at,
  c.change_record:result::VARCHAR AS result_file,
  c.filename AS change_file
FROM records c, LATERAL FLATTEN(input => c.change_record:added) ad
UNION ALL
SELECT
  c.change_record:digest::VARCHAR,
  c.change_record:tags,
  'removed',
  rm.value:vulnerability::VARCHAR,
  rm.value:package::VARCHAR,
  rm.value:version::VARCHAR,
  rm.value:type::VARCHAR,
  rm.value:severity::VARCHAR,
  NULL::VARCHAR,
  rm.value:fix_state::VARCHAR,
  ARRAY_TO_STRING(rm.value:fix_versions, ', '),
  TRY_TO_TIMESTAMP_NTZ(c.change_record:db_build::VARCHAR),
  TRY_TO_TIMESTAMP_NTZ(c.change_record:previous_db_build::VARCHAR),
  TRY_TO_TIMESTAMP_TZ(c.change_record:observed_at::VARCHAR),
  c.change_record:result::VARCHAR,
  c.filename
FROM records c, LATERAL FLATTEN(input => c.change_record:removed) rm
UNION ALL
SELECT
  c.change_record:digest::VARCHAR,
  c.change_record:tags,
  'changed',
  ch.value:after.vulnerability::VARCHAR,
  ch.value:after.package::VARCHAR,
  ch.value:after.version::VARCHAR,
  ch.value:after.type::VARCHAR,
  ch.value:after.severity::VARCHAR,
  ch.value:before.severity::VARCHAR,
  ch.value:after.fix_state::VARCHAR,
  ARRAY_TO_STRING(ch.value:after.fix_versions, ', '),
  TRY_TO_TIMESTAMP_NTZ(c.change_record:db_build::VARCHAR),
  TRY_TO_TIMESTAMP_NTZ(c.change_record:previous_db_build::VARCHAR),
  TRY_TO_TIMESTAMP_TZ(c.change_record:observed_at::VARCHAR),
  c.change_record:result::VARCHAR,
  c.filename
FROM records c, LATERAL FLATTEN(input => c.change_record:changed) ch;

-- Failed scans and re-matches, one row per attempt.
CREATE OR REPLACE VIEW scan_failure_records AS
SELECT
  f.failure_record:digest::VARCHAR AS image_digest,
  f.failure_record:kind::VARCHAR AS kind,
  f.failure_record:tags AS tags,
  f.failure_record:attempt::NUMBER AS attempt,
  f.failure_record:error::VARCHAR AS error,
  TRY_TO_TIMESTAMP_TZ(f.failure_record:next_retry::VARCHAR) AS next_retry,
  TRY_TO_TIMESTAMP_TZ(f.failure_record:observed_at::VARCHAR) AS failed_at,
  f.filename AS failure_file
FROM failures_raw f
QUALIFY ROW_NUMBER() OVER (PARTITION BY f.filename ORDER BY f.loaded_at) = 1;

GRANT SELECT ON VIEW scans TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW scan_results TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW scans_latest TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW scan_results_latest TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW inventory_records TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW image_tags_current TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW vulnerability_changes TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW scan_failure_records TO ROLE <% viewer_role %>;
