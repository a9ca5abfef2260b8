-- spcs-image-scanner, step 4 (AWS accounts): load the result files with Snowpipe, as they
-- appear. Auto-ingest on an internal stage is a preview feature on AWS only; on Azure or
-- GCP (or if files are not picked up) use sql/22_load_task.sql instead. Use one loader,
-- not both: Snowpipe and bulk COPY keep separate load histories, so running both loads
-- every file twice (the views count each file once, but the tables grow twice as fast).
--
--   snow sql -f sql/21_load_snowpipe.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner
--
-- Files already on the stage before the pipes existed: ALTER PIPE <pipe> REFRESH loads
-- those staged in the last 7 days. Idempotent: IF NOT EXISTS keeps each pipe's load
-- history (recreating a pipe forgets it and would load every file again).

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

CREATE PIPE IF NOT EXISTS scans_pipe
  AUTO_INGEST = TRUE
  COMMENT = 'spcs-image-scanner: scans/ into scans_raw'
  AS
  COPY INTO scans_raw (scan, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/scans/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_document');

CREATE PIPE IF NOT EXISTS inventory_pipe
  AUTO_INGEST = TRUE
  COMMENT = 'spcs-image-scanner: inventory/ into inventory_raw'
  AS
  COPY INTO inventory_raw (inventory_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/inventory/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_records');

CREATE PIPE IF NOT EXISTS changes_pipe
  AUTO_INGEST = TRUE
  COMMENT = 'spcs-image-scanner: changes/ into changes_raw'
  AS
  COPY INTO changes_raw (change_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/changes/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_records');

CREATE PIPE IF NOT EXISTS failures_pipe
  AUTO_INGEST = TRUE
  COMMENT = 'spcs-image-scanner: failures/ into failures_raw'
  AS
  COPY INTO failures_raw (failure_record, filename)
  FROM (SELECT $1, METADATA$FILENAME FROM @scan_results_stage/failures/)
  FILE_FORMAT = (FORMAT_NAME = 'scanner_json_document');

-- executionState should be RUNNING for each.
SELECT SYSTEM$PIPE_STATUS('scans_pipe') AS scans_pipe,
       SYSTEM$PIPE_STATUS('inventory_pipe') AS inventory_pipe,
       SYSTEM$PIPE_STATUS('changes_pipe') AS changes_pipe,
       SYSTEM$PIPE_STATUS('failures_pipe') AS failures_pipe;
