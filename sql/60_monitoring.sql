-- spcs-image-scanner, step 8: monitoring views over the loaded records.
--
--   snow sql -f sql/60_monitoring.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D viewer_role=scanner_viewer
--
-- Idempotent: OR REPLACE. Live state (queue, current failures, DB age) is also on the
-- service's own API: SELECT scanner_rescan(...) or GET /status over the private endpoint.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

-- Images whose newest scan attempt failed: the newest failure is later than the newest
-- result (or there is no result at all). Retried by the scanner at next_retry.
-- scanned_at is UTC (TIMESTAMP_NTZ, from the file name): the failure time is compared in UTC.
CREATE OR REPLACE VIEW monitor_failed_scans AS
SELECT
  f.image_digest,
  f.kind,
  f.tags,
  f.attempt,
  f.error,
  f.failed_at,
  f.next_retry,
  l.scanned_at AS last_result_at
FROM (
  SELECT *
  FROM scan_failure_records
  QUALIFY ROW_NUMBER() OVER (PARTITION BY image_digest ORDER BY failed_at DESC, failure_file DESC) = 1
) f
LEFT JOIN scans_latest l ON l.image_digest = f.image_digest
WHERE l.scanned_at IS NULL
   OR CONVERT_TIMEZONE('UTC', f.failed_at)::TIMESTAMP_NTZ > l.scanned_at;

-- Images in use (tagged today) whose newest result was matched with an older DB than
-- the newest DB build any result was matched with: the re-match after the last DB
-- update has not reached them (yet, or it failed: see monitor_failed_scans).
CREATE OR REPLACE VIEW monitor_not_rescanned_since_db_update AS
WITH newest AS (
  SELECT MAX(db_built) AS db_built FROM scans
)
SELECT
  t.image_tag,
  l.image_digest,
  l.db_built AS result_db_built,
  n.db_built AS newest_db_built,
  l.scanned_at,
  l.result_file
FROM image_tags_current t
JOIN scans_latest l ON l.image_digest = t.image_digest
CROSS JOIN newest n
WHERE l.db_built IS NULL OR l.db_built < n.db_built;

-- Tags that moved to another image in the last day (a re-push of the same tag).
CREATE OR REPLACE VIEW monitor_tags_moved_last_day AS
SELECT
  image_tag,
  previous_digest,
  image_digest,
  observed_at
FROM inventory_records
WHERE change_type = 'moved'
  AND observed_at >= DATEADD(day, -1, CURRENT_TIMESTAMP());

GRANT SELECT ON VIEW monitor_failed_scans TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW monitor_not_rescanned_since_db_update TO ROLE <% viewer_role %>;
GRANT SELECT ON VIEW monitor_tags_moved_last_day TO ROLE <% viewer_role %>;
