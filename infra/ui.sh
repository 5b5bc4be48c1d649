#!/usr/bin/env bash
# Start (or stop) a local Prefect server and MLflow UI on 127.0.0.1, no Docker.
#   infra/ui.sh start   -> Prefect on :4200 (PREFECT_UI_PORT), MLflow on :5000 (MLFLOW_UI_PORT)
#   infra/ui.sh stop
# The Prefect server uses the same PREFECT_HOME database as embedded runs, and the MLflow UI reads
# the same store (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db), so past runs show up.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STATE=.posttrain/ui
PREFECT_PORT=${PREFECT_UI_PORT:-4200}
MLFLOW_PORT=${MLFLOW_UI_PORT:-5000}
STORE=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
mkdir -p "$STATE"

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start() {
  if running prefect; then echo "Prefect server already running (pid $(cat $STATE/prefect.pid))"
  else
    PREFECT_SERVER_ANALYTICS_ENABLED=false nohup "$VENV/bin/prefect" server start \
      --host 127.0.0.1 --port "$PREFECT_PORT" >"$STATE/prefect.log" 2>&1 &
    echo $! >"$STATE/prefect.pid"
  fi
  if running mlflow; then echo "MLflow UI already running (pid $(cat $STATE/mlflow.pid))"
  else
    nohup "$VENV/bin/mlflow" ui --backend-store-uri "$STORE" --host 127.0.0.1 \
      --port "$MLFLOW_PORT" >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
  fi
  for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null 2>&1 &&
      curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 && break
    sleep 1
  done
  cat <<TXT
Prefect UI: http://127.0.0.1:$PREFECT_PORT   (logs: $STATE/prefect.log)
MLflow UI:  http://127.0.0.1:$MLFLOW_PORT   (logs: $STATE/mlflow.log, store: $STORE)
To send runs to this Prefect server instead of the embedded one:
  export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
Stop both with: make ui-stop
TXT
}

stop() {
  for name in prefect mlflow; do
    if running "$name"; then
      pid=$(cat "$STATE/$name.pid")
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill -TERM "$pid" 2>/dev/null || true
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/$name.pid"
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
