#!/usr/bin/env bash
# Start (or stop) a local Prefect server and MLflow UI on 127.0.0.1, no Docker.
#   infra/ui.sh start   -> Prefect on :4200 (PREFECT_UI_PORT), MLflow on :5000 (MLFLOW_UI_PORT)
#   infra/ui.sh stop
# The Prefect server uses the same PREFECT_HOME database as embedded runs, and the MLflow UI reads
# the same store (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db), so past runs show up.
# `start` returns once both answer their health checks (Prefect /api/health, MLflow /health),
# or fails with the end of the server's log after UI_TIMEOUT seconds (default 120).
# POSTTRAIN_UI_STATE: where the PID and log files go (default .posttrain/ui).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STATE=${POSTTRAIN_UI_STATE:-.posttrain/ui}
PREFECT_PORT=${PREFECT_UI_PORT:-4200}
MLFLOW_PORT=${MLFLOW_UI_PORT:-5000}
STORE=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
TIMEOUT=${UI_TIMEOUT:-120}
PREFECT_HEALTH="http://127.0.0.1:$PREFECT_PORT/api/health"
MLFLOW_HEALTH="http://127.0.0.1:$MLFLOW_PORT/health"
mkdir -p "$STATE"

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
healthy() { curl -sf --max-time 2 "$1" >/dev/null 2>&1; }

# Wait until $2 answers; fail when the server ($1) exits or after $TIMEOUT seconds.
wait_healthy() {
  local name=$1 url=$2 deadline=$((SECONDS + TIMEOUT))
  until healthy "$url"; do
    if ! running "$name"; then
      echo "$name did not start (see $STATE/$name.log):" >&2
      tail -n 20 "$STATE/$name.log" >&2 || true
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name is not answering $url after ${TIMEOUT}s (see $STATE/$name.log):" >&2
      tail -n 20 "$STATE/$name.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
}

start() {
  if running prefect; then echo "Prefect server already running (pid $(cat "$STATE/prefect.pid"))"
  else
    # The UI finds the API through PREFECT_UI_API_URL; unset, it assumes port 4200.
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
      PREFECT_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api" \
      nohup "$VENV/bin/prefect" server start \
      --host 127.0.0.1 --port "$PREFECT_PORT" >"$STATE/prefect.log" 2>&1 &
    echo $! >"$STATE/prefect.pid"
  fi
  if running mlflow; then echo "MLflow UI already running (pid $(cat "$STATE/mlflow.pid"))"
  else
    nohup "$VENV/bin/mlflow" ui --backend-store-uri "$STORE" --host 127.0.0.1 \
      --port "$MLFLOW_PORT" >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
  fi
  wait_healthy prefect "$PREFECT_HEALTH"
  wait_healthy mlflow "$MLFLOW_HEALTH"
  cat <<TXT
ready:
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
