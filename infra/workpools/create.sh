#!/usr/bin/env bash
# Create (or update) the work pool the deployments in prefect.yaml run on, for one kind of worker:
#
#   infra/workpools/create.sh process      # flow runs are processes on the worker's machine
#                                          #   (the prefect-worker of infra/docker-compose.yml)
#   infra/workpools/create.sh docker       # each flow run is a container of the training image,
#                                          #   with the host's GPUs (docker-gpu-job-template.json)
#   infra/workpools/create.sh kubernetes   # each flow run is a Kubernetes Job with GPUs and the
#                                          #   shared artifacts volume (kubernetes-gpu-job-template.json)
#
# Needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING) pointing at the server. POOL overrides the
# pool's name (default: posttrain, the name prefect.yaml's deployments use). Then start a worker:
#   prefect worker start --pool posttrain                       # process / docker / kubernetes
# (docker: `pip install prefect-docker`; kubernetes: `pip install prefect-kubernetes`, or run the
# worker in-cluster with the prefect-worker Helm chart and this pool's name.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kind=${1:?usage: create.sh process|docker|kubernetes}
pool=${POOL:-posttrain}
PREFECT=${PREFECT:-prefect}

case "$kind" in
  process)
    "$PREFECT" work-pool create "$pool" --type process --overwrite ;;
  docker)
    "$PREFECT" work-pool create "$pool" --type docker --overwrite \
      --base-job-template "$here/docker-gpu-job-template.json" ;;
  kubernetes)
    "$PREFECT" work-pool create "$pool" --type kubernetes --overwrite \
      --base-job-template "$here/kubernetes-gpu-job-template.json" ;;
  *)
    echo "unknown worker kind '$kind': choose process, docker or kubernetes" >&2
    exit 2 ;;
esac
echo "work pool '$pool' ($kind) ready; start a worker with: prefect worker start --pool $pool"
