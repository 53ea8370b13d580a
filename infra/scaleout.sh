#!/usr/bin/env bash
# The scale-out topology on this machine (README "Scale out"): PostgreSQL, Redis, the S3 server,
# Airflow with the CeleryExecutor and two Celery workers, one of them a GPU host in its own network
# namespace. Needs root (network namespaces) and the venv (make setup).
#
#   infra/scaleout.sh start    # prints the UI's address; options: --gpu-slots N, --net N, --state-dir DIR
#   infra/scaleout.sh publish DIR   # validates a local dataset, uploads it, prints its s3:// location
#   infra/scaleout.sh env      # export lines pointing tasks.store at its S3 server
#   infra/scaleout.sh stop     # no process, namespace or veth left behind
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/infra/system_deps.sh"
exec "$root/.venv/bin/python" "$root/infra/scaleout.py" "$@"
