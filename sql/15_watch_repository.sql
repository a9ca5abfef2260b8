-- spcs-image-scanner, step 2: let the scanner read one image repository. Run once per
-- repository to watch; each also goes into the service's image_repositories value
-- ("app_db/app_schema/app_repo", sql/50_service.sql):
--
--   snow sql -f sql/15_watch_repository.sql -D owner_role=scanner_owner \
--     -D watched_db=app_db -D watched_schema=app_schema -D watched_repo=app_repo
--
-- SERVICE READ lets a service list and pull the repository's images and nothing more:
-- the scanner never pushes. USAGE on the repository's database and schema lets the owner
-- resolve it. Run as the repository's owner or ACCOUNTADMIN. Idempotent.

USE ROLE ACCOUNTADMIN;

GRANT USAGE ON DATABASE <% watched_db %> TO ROLE <% owner_role %>;
GRANT USAGE ON SCHEMA <% watched_db %>.<% watched_schema %> TO ROLE <% owner_role %>;
GRANT SERVICE READ ON IMAGE REPOSITORY <% watched_db %>.<% watched_schema %>.<% watched_repo %>
  TO ROLE <% owner_role %>;
