-- spcs-image-scanner, step 4 (any cloud): load the result files with a scheduled
-- COPY INTO. The portable alternative to sql/21_load_snowpipe.sql (internal-stage
-- auto-ingest is an AWS-only preview). Use one loader, not both (see 21).
--
--   snow sql -f sql/22_load_task.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D warehouse=scan_wh
--
-- COPY INTO remembers what it loaded for 64 days, so each run loads only new files; the
-- scanner never rewrites a file, so nothing is missed. A file that does not parse is
-- skipped (ON_ERROR = SKIP_FILE) and shows in the load history:
--   SELECT * FROM TABLE(INFORMATION_SCHEMA.COPY_HISTORY(TABLE_NAME => 'SCANS_RAW',
--     START_TIME => DATEADD(day, -1, CURRENT_TIMESTAMP())));
-- Idempotent: OR REPLACE; a task keeps no load history of its own (the tables do).

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

CREATE OR REPLACE TASK load_scans
  WAREHOUSE = <% warehouse %>
  SCHEDULE = '5 MINUTE'
  COMMENT = 'spcs-image-scanner: scans/ into scans_raw'
  AS
  COPY INTO scans_raw (scan, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/scans/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_document')
  ON_ERROR = SKIP_FILE;

CREATE OR REPLACE TASK load_inventory
  WAREHOUSE = <% warehouse %>
  SCHEDULE = '5 MINUTE'
  COMMENT = 'spcs-image-scanner: inventory/ into inventory_raw'
  AS
  COPY INTO inventory_raw (inventory_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/inventory/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_records')
  ON_ERROR = SKIP_FILE;

CREATE OR REPLACE TASK load_changes
  WAREHOUSE = <% warehouse %>
  SCHEDULE = '5 MINUTE'
  COMMENT = 'spcs-image-scanner: changes/ into changes_raw'
  AS
  COPY INTO changes_raw (change_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/changes/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_records')
  ON_ERROR = SKIP_FILE;

CREATE OR REPLACE TASK load_failures
  WAREHOUSE = <% warehouse %>
  SCHEDULE = '5 MINUTE'
  COMMENT = 'spcs-image-scanner: failures/ into failures_raw'
  AS
  COPY INTO failures_raw (failure_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/failures/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_document')
  ON_ERROR = SKIP_FILE;

-- Four independent tasks (no task graph), so each can be replaced on its own. Tasks are
-- created suspended.
ALTER TASK load_scans RESUME;
ALTER TASK load_inventory RESUME;
ALTER TASK load_changes RESUME;
ALTER TASK load_failures RESUME;

-- Load what is already there now, without waiting for the schedule.
EXECUTE TASK load_scans;
EXECUTE TASK load_inventory;
EXECUTE TASK load_changes;
EXECUTE TASK load_failures;
