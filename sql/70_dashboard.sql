-- spcs-image-scanner, step 9: the Streamlit dashboard (streamlit/), over the views of
-- sql/20_pipeline.sql and sql/30_enrichment.sql. Copy its files first:
--   snow stage copy streamlit/streamlit_app.py @<db>.<schema>.scanner_app/streamlit/ --overwrite
--   snow stage copy streamlit/environment.yml @<db>.<schema>.scanner_app/streamlit/ --overwrite
--
--   snow sql -f sql/70_dashboard.sql -D db=sec_db -D schema=scan -D owner_role=scanner_owner \
--     -D viewer_role=scanner_viewer -D warehouse=scan_wh
--
-- Idempotent: IF NOT EXISTS; a new app version is just a new copy of the files.

USE ROLE <% owner_role %>;
USE SCHEMA <% db %>.<% schema %>;

CREATE STREAMLIT IF NOT EXISTS scanner_dashboard
  FROM '@<% db %>.<% schema %>.scanner_app/streamlit'
  MAIN_FILE = 'streamlit_app.py'
  QUERY_WAREHOUSE = <% warehouse %>
  TITLE = 'Image vulnerabilities'
  COMMENT = 'spcs-image-scanner: scan results dashboard';
GRANT USAGE ON STREAMLIT scanner_dashboard TO ROLE <% viewer_role %>;
