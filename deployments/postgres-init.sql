-- Runs once, when the postgres service starts on an empty data volume (docker-entrypoint-initdb.d).
-- The server's own database (POSTGRES_DB=prefect) already exists then; this adds MLflow's
-- tracking database beside it, owned by the same user (POSTGRES_USER). Prefect creates the
-- pg_trgm extension it needs in its own database on its first migration; the postgres:16 image
-- ships the extension.
CREATE DATABASE mlflow;
