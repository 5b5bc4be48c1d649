-- Run once by the postgres image on an empty volume. POSTGRES_DB (prefect) exists already; MLflow
-- keeps its runs and its user store in two more databases owned by the same role.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
