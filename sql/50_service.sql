-- spcs-image-scanner, step 7: the always-on service, its SQL entry points, and the
-- snapshot of its DB volume. Needs the image pushed to scanner_images, the specs on
-- @scanner_app/specs/ and the DB seed snapshot (sql/40_vulndb_seed.sql).
--
--   snow sql -f sql/50_service.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D operator_role=scanner_operator -D compute_pool=scan_pool \
--     -D image=/sec_db/scan/scanner_images/spcs-image-scanner:0.1.0 \
--     -D image_repositories=app_db/app_schema/app_repo
--
-- image_repositories: the repositories to watch, "db/schema/repo", comma-separated; each
-- needs sql/15_watch_repository.sql. Idempotent: CREATE SERVICE IF NOT EXISTS leaves a
-- running service alone (roll out a new version with sql/55_upgrade_service.sql);
-- functions and procedures are OR REPLACE.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

-- The daemon derives its registry host, <org>-<account>.registry-local.snowflakecomputing.com,
-- from these (USING values must be alphanumeric or JSON: hence the quotes).
SET scanner_orgname = (SELECT '"' || LOWER(CURRENT_ORGANIZATION_NAME()) || '"');
SET scanner_accountname = (SELECT '"' || LOWER(CURRENT_ACCOUNT_NAME()) || '"');

-- One instance: block volumes need MIN_INSTANCES = MAX_INSTANCES, and one daemon owns
-- its state store and DB volume.
CREATE SERVICE IF NOT EXISTS image_scanner
  IN COMPUTE POOL <% compute_pool %>
  FROM @scanner_app
  SPECIFICATION_TEMPLATE_FILE = 'specs/service.yaml'
  USING (
    image => '"<% image %>"',
    results_stage => '"@<% db %>.<% schema %>.scan_results_stage"',
    orgname => $scanner_orgname,
    accountname => $scanner_accountname,
    image_repositories => '"<% image_repositories %>"'
  )
  EXTERNAL_ACCESS_INTEGRATIONS = (GRYPE_DB_EAI)
  AUTO_RESUME = TRUE
  MIN_INSTANCES = 1
  MAX_INSTANCES = 1
  COMMENT = 'spcs-image-scanner: watches the image repositories and scans what changed';

-- SELECT scanner_rescan('all'), scanner_rescan('db/schema/repo/python'),
-- scanner_rescan('db/schema/repo/python:3.6') or scanner_rescan('sha256:...'): queues a
-- rescan (manual lane, before new images and re-matches) and returns at once with
-- {"request_id", "coalesced", "scope"} or {"error"}; it never waits for the scan.
CREATE OR REPLACE FUNCTION scanner_rescan(target VARCHAR)
  RETURNS VARIANT
  SERVICE = image_scanner
  ENDPOINT = api
  MAX_BATCH_ROWS = 100
  COMMENT = 'spcs-image-scanner: queue a rescan of all, a repository, or an image'
  AS '/functions/rescan';
GRANT USAGE ON FUNCTION scanner_rescan(VARCHAR) TO ROLE <% operator_role %>;
-- Service-to-service callers of the private endpoint (GET /status, /images, /metrics).
GRANT SERVICE ROLE image_scanner!api_caller TO ROLE <% operator_role %>;

-- The article's one-shot scan, for a role that may not run services itself: runs the
-- scanner once (`once`, fresh state, every image listed) as a job, asynchronously, and
-- returns the job's name (CALL <name>!SPCS_WAIT_FOR('DONE', 3600) waits for it).
-- Owner's rights: the caller needs USAGE on this procedure only. The argument is
-- checked against the repository-path alphabet before it reaches any SQL text.
CREATE OR REPLACE PROCEDURE run_scan_job(image_repositories VARCHAR)
  RETURNS VARCHAR
  LANGUAGE SQL
  EXECUTE AS OWNER
AS
$$
DECLARE
  bad_argument EXCEPTION (-20001, 'image_repositories must be db/schema/repo names, comma-separated');
  job_name VARCHAR;
  orgname VARCHAR;
  accountname VARCHAR;
BEGIN
  IF (NOT REGEXP_LIKE(image_repositories, '[A-Za-z0-9_$]+/[A-Za-z0-9_$]+/[A-Za-z0-9_$]+(,[A-Za-z0-9_$]+/[A-Za-z0-9_$]+/[A-Za-z0-9_$]+)*')) THEN
    RAISE bad_argument;
  END IF;
  job_name := 'image_scan_job_' || TO_VARCHAR(CURRENT_TIMESTAMP(), 'YYYYMMDD_HH24MISS_FF3');
  orgname := LOWER(CURRENT_ORGANIZATION_NAME());
  accountname := LOWER(CURRENT_ACCOUNT_NAME());
  EXECUTE IMMEDIATE
    'EXECUTE JOB SERVICE IN COMPUTE POOL <% compute_pool %> NAME = ' || job_name ||
    ' ASYNC = TRUE EXTERNAL_ACCESS_INTEGRATIONS = (GRYPE_DB_EAI)' ||
    ' FROM @scanner_app SPECIFICATION_TEMPLATE_FILE = ''specs/job.yaml''' ||
    ' USING (image => ''"<% image %>"'',' ||
    ' results_stage => ''"@<% db %>.<% schema %>.scan_results_stage"'',' ||
    ' orgname => ''"' || orgname || '"'', accountname => ''"' || accountname || '"'',' ||
    ' image_repositories => ''"' || image_repositories || '"'')';
  RETURN job_name;
END;
$$;
GRANT USAGE ON PROCEDURE run_scan_job(VARCHAR) TO ROLE <% operator_role %>;

-- Refresh the DB seed from the running service's own DB volume, so that a new service
-- (or ALTER SERVICE ... RESTORE VOLUME) starts with the DB the daemon keeps fresh,
-- without running the seed job again. grype activates a new DB by renaming its
-- directory, so the DB a snapshot captures is whole; a download in progress at that
-- moment is a temp directory grype ignores.
CREATE OR REPLACE PROCEDURE snapshot_grype_db()
  RETURNS VARCHAR
  LANGUAGE SQL
  EXECUTE AS OWNER
AS
$$
BEGIN
  CREATE OR REPLACE SNAPSHOT grype_db_seed
    FROM SERVICE image_scanner
    VOLUME "grype-db"
    INSTANCE 0
    COMMENT = 'grype vulnerability DB seed for spcs-image-scanner (from the service)';
  RETURN 'snapshot GRYPE_DB_SEED taken from IMAGE_SCANNER volume grype-db';
END;
$$;

SHOW SERVICE CONTAINERS IN SERVICE image_scanner;
