#!/usr/bin/env bash
# The airflow-init container's command (docker-compose.yml), run before any other Airflow service
# starts: refuse placeholder secrets, migrate the metadata database, create the admin user, then import
# the `gpu` pool and the connections built from the environment by infra/airflow_setup.py.
# Idempotent: every `docker compose up` runs it again (pools and connections are overwritten from .env;
# an existing admin user is kept as it is).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

sh "$here/refuse-placeholders.sh"
: "${AIRFLOW_ADMIN_USER:?}" "${AIRFLOW_ADMIN_PASSWORD:?}"

echo "airflow-init: migrating the metadata database"
airflow db migrate

echo "airflow-init: admin user ${AIRFLOW_ADMIN_USER}"
airflow users create --role Admin --username "$AIRFLOW_ADMIN_USER" --password "$AIRFLOW_ADMIN_PASSWORD" \
  --firstname Admin --lastname "segmentation_pipeline" --email "${AIRFLOW_ADMIN_EMAIL:-admin@example.invalid}"

# The generated files hold credentials: a private directory, removed whatever happens.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python "$here/airflow_setup.py" "$work"
airflow pools import "$work/pools.json"
airflow connections import --overwrite "$work/connections.json"
airflow pools list
echo "airflow-init: done"
