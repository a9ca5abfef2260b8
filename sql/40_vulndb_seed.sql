-- Seeding grype's vulnerability DB for the scanner service (snow sql -f sql/40_vulndb_seed.sql).
--
-- 1. A job fills a block volume with the DB (spec/db-seed-job.yaml, `db update`).
-- 2. The volume is snapshotted before the job is deleted (about 10 minutes after it ends).
-- 3. The service mounts a volume created from that snapshot
--    (blockConfig.initialContents.fromSnapshot: GRYPE_DB_SEED), so a new instance
--    starts with a warm DB and no download. The running daemon then keeps the DB on its
--    own volume fresh (vulndb.update_cron); re-run this only to refresh the seed for new
--    services, or to restore a volume with ALTER SERVICE ... RESTORE VOLUME.
--
--   snow sql -f sql/40_vulndb_seed.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D compute_pool=scan_pool -D image=/sec_db/scan/scanner_images/spcs-image-scanner:0.1.0
--
-- Needs the image in scanner_images and spec/db-seed-job.yaml on @scanner_app/specs/.
-- The job reaches grype.anchore.io:443 through GRYPE_DB_EAI (sql/10_setup.sql).
-- Idempotent: the procedure replaces its job and the seed snapshot.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

CREATE OR REPLACE PROCEDURE refresh_grype_db_seed()
  RETURNS VARCHAR
  LANGUAGE SQL
  EXECUTE AS OWNER
AS
$$
BEGIN
  DROP SERVICE IF EXISTS grype_db_seed_job;
  EXECUTE JOB SERVICE
    IN COMPUTE POOL <% compute_pool %>
    NAME = grype_db_seed_job
    EXTERNAL_ACCESS_INTEGRATIONS = (GRYPE_DB_EAI)
    FROM @scanner_app
    SPECIFICATION_TEMPLATE_FILE = 'specs/db-seed-job.yaml'
    USING (image => '"<% image %>"');
  -- The job ran synchronously and succeeded (a failure raises): snapshot its volume.
  CREATE OR REPLACE SNAPSHOT grype_db_seed
    FROM SERVICE grype_db_seed_job
    VOLUME "grype-db"
    INSTANCE 0
    COMMENT = 'grype vulnerability DB seed for spcs-image-scanner';
  RETURN 'snapshot GRYPE_DB_SEED created from job GRYPE_DB_SEED_JOB';
END;
$$;

CALL refresh_grype_db_seed();

-- The snapshot must be CREATED before a service can use it.
SHOW SNAPSHOTS LIKE 'GRYPE_DB_SEED';
