-- spcs-image-scanner, step 1 of the deployment: roles, grants and the account objects.
--
--   snow sql -f sql/10_setup.sql -D db=sec_db -D schema=scan -D warehouse=scan_wh \
--     -D compute_pool=scan_pool -D owner_role=scanner_owner \
--     -D operator_role=scanner_operator -D viewer_role=scanner_viewer
--
-- Run as ACCOUNTADMIN (or a role that may create roles, warehouses, compute pools and
-- integrations). Idempotent: every object is IF NOT EXISTS, so a second run changes
-- nothing and never disturbs a running service.
--
-- Roles:
--   owner_role     owns the scanner service, the results pipeline and the dashboard;
--                  the service runs with it (the service user has only this role).
--   operator_role  may start rescans (scanner_rescan()) and one-off scan jobs
--                  (run_scan_job()), both defined in sql/50_service.sql.
--   viewer_role    reads the result views and the dashboard.
-- Access to the image repositories to watch is granted per repository by
-- sql/15_watch_repository.sql.

USE ROLE ACCOUNTADMIN;

CREATE ROLE IF NOT EXISTS <% owner_role %> COMMENT = 'spcs-image-scanner: owns the scanner service and its results';
CREATE ROLE IF NOT EXISTS <% operator_role %> COMMENT = 'spcs-image-scanner: starts rescans and scan jobs';
CREATE ROLE IF NOT EXISTS <% viewer_role %> COMMENT = 'spcs-image-scanner: reads scan results';
GRANT ROLE <% viewer_role %> TO ROLE <% operator_role %>;
GRANT ROLE <% operator_role %> TO ROLE <% owner_role %>;
GRANT ROLE <% owner_role %> TO ROLE SYSADMIN;

CREATE DATABASE IF NOT EXISTS <% db %>;
CREATE SCHEMA IF NOT EXISTS <% db %>.<% schema %>;
GRANT USAGE ON DATABASE <% db %> TO ROLE <% viewer_role %>;
GRANT USAGE ON SCHEMA <% db %>.<% schema %> TO ROLE <% viewer_role %>;
GRANT USAGE ON DATABASE <% db %> TO ROLE <% owner_role %>;
GRANT USAGE ON SCHEMA <% db %>.<% schema %> TO ROLE <% owner_role %>;
-- What the owner creates in the schema: the pipeline (tables, file formats, stages, pipes,
-- tasks, views), the service, its function and procedures, snapshots, the dashboard.
GRANT CREATE TABLE, CREATE VIEW, CREATE STAGE, CREATE FILE FORMAT, CREATE PIPE,
      CREATE TASK, CREATE SERVICE, CREATE FUNCTION, CREATE PROCEDURE, CREATE SNAPSHOT,
      CREATE STREAMLIT, CREATE IMAGE REPOSITORY
  ON SCHEMA <% db %>.<% schema %> TO ROLE <% owner_role %>;
-- The scheduled COPY INTO task (sql/22_load_task.sql) runs as the owner.
GRANT EXECUTE TASK ON ACCOUNT TO ROLE <% owner_role %>;

-- A warehouse for loading, the views and the dashboard. The service itself needs none.
CREATE WAREHOUSE IF NOT EXISTS <% warehouse %>
  WAREHOUSE_SIZE = XSMALL
  AUTO_SUSPEND = 60
  AUTO_RESUME = TRUE
  INITIALLY_SUSPENDED = TRUE
  COMMENT = 'spcs-image-scanner: loading and dashboard';
GRANT USAGE ON WAREHOUSE <% warehouse %> TO ROLE <% owner_role %>;
GRANT USAGE ON WAREHOUSE <% warehouse %> TO ROLE <% viewer_role %>;

-- One small node is enough for the daemon (2 concurrent scans by default); a second node
-- gives the one-off scan jobs and the DB seed job room beside the service.
CREATE COMPUTE POOL IF NOT EXISTS <% compute_pool %>
  MIN_NODES = 1
  MAX_NODES = 2
  INSTANCE_FAMILY = CPU_X64_S
  AUTO_RESUME = TRUE
  AUTO_SUSPEND_SECS = 3600
  COMMENT = 'spcs-image-scanner';
GRANT USAGE, MONITOR ON COMPUTE POOL <% compute_pool %> TO ROLE <% owner_role %>;

-- Egress for grype's vulnerability DB updates, and nothing else: the registry
-- (registry-local) and Snowflake itself are reached without an integration.
-- grype's app-update check (toolbox-data.anchore.io) is off in the image.
CREATE NETWORK RULE IF NOT EXISTS <% db %>.<% schema %>.grype_db_egress
  MODE = EGRESS
  TYPE = HOST_PORT
  VALUE_LIST = ('grype.anchore.io:443')
  COMMENT = 'spcs-image-scanner: grype vulnerability DB downloads';
CREATE EXTERNAL ACCESS INTEGRATION IF NOT EXISTS grype_db_eai
  ALLOWED_NETWORK_RULES = (<% db %>.<% schema %>.grype_db_egress)
  ENABLED = TRUE
  COMMENT = 'spcs-image-scanner: grype.anchore.io:443 only';
GRANT USAGE ON INTEGRATION grype_db_eai TO ROLE <% owner_role %>;

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

-- Where the scanner's own image is pushed (docker push <repository_url>/spcs-image-scanner:<version>).
CREATE IMAGE REPOSITORY IF NOT EXISTS scanner_images
  COMMENT = 'spcs-image-scanner: the scanner image';

-- The results stage, mounted into the service as a stage volume: write-once files under
-- scans/, sboms/, inventory/, changes/ and failures/. SNOWFLAKE_SSE is what stage volumes
-- need on Azure and works everywhere.
CREATE STAGE IF NOT EXISTS scan_results_stage
  DIRECTORY = (ENABLE = TRUE)
  ENCRYPTION = (TYPE = 'SNOWFLAKE_SSE')
  COMMENT = 'spcs-image-scanner: result files written by the scanner';

-- The service and job specifications and the dashboard's files (snow stage copy).
CREATE STAGE IF NOT EXISTS scanner_app
  DIRECTORY = (ENABLE = TRUE)
  ENCRYPTION = (TYPE = 'SNOWFLAKE_SSE')
  COMMENT = 'spcs-image-scanner: service specs and dashboard files';

SHOW IMAGE REPOSITORIES LIKE 'SCANNER_IMAGES';
