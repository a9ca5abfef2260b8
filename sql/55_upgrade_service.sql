-- spcs-image-scanner: roll out a new version (a new image tag, or changed specs).
-- Push the image and copy the specs to @scanner_app/specs/ first (README, "Roll out a
-- new version"), then:
--
--   snow sql -f sql/55_upgrade_service.sql -D db=sec_db -D schema=scan \
--     -D owner_role=scanner_owner -D image=/sec_db/scan/scanner_images/spcs-image-scanner:0.2.0 \
--     -D image_repositories=app_db/app_schema/app_repo
--
-- SPCS sends SIGTERM and allows 30 seconds: the daemon stops within 25, puts the digests
-- it was scanning back to pending and scans them after the restart. The block volumes
-- (DB, state) are kept, so nothing already scanned is scanned again. Idempotent: the
-- same spec and image again changes nothing.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

SET scanner_orgname = (SELECT '"' || LOWER(CURRENT_ORGANIZATION_NAME()) || '"');
SET scanner_accountname = (SELECT '"' || LOWER(CURRENT_ACCOUNT_NAME()) || '"');

ALTER SERVICE image_scanner
  FROM @scanner_app
  SPECIFICATION_TEMPLATE_FILE = 'specs/service.yaml'
  USING (
    image => '"<% image %>"',
    results_stage => '"@<% db %>.<% schema %>.scan_results_stage"',
    orgname => $scanner_orgname,
    accountname => $scanner_accountname,
    image_repositories => '"<% image_repositories %>"'
  );

-- is_upgrading turns false when the new container is READY (its readinessProbe, /readyz).
DESCRIBE SERVICE image_scanner;
