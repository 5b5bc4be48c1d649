# MLflow tracking server with basic authentication, a Postgres backend store and proxied
# ("served") artifacts. Started by infra/docker-compose.yml; see infra/docker/mlflow-entrypoint.sh.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow[auth]>=3.1,<3.18" "psycopg2-binary>=2.9"
COPY infra/docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
RUN chmod 0755 /usr/local/bin/mlflow-entrypoint \
 && useradd --create-home --uid 1000 mlflow && mkdir -p /mlartifacts && chown mlflow /mlartifacts
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow-entrypoint"]
