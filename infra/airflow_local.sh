#!/usr/bin/env bash
# Airflow settings for local runs (make demo, the tests, the README's commands): SQLite and logs under
# .work/airflow, this repo's dags/, no example DAGs, 4 workers at most, API server on 127.0.0.1.
#
#   infra/airflow_local.sh dags test segmentation_pipeline -c '{"profile": "cpu"}'   # runs `airflow ...`
#   source infra/airflow_local.sh                                                    # only exports
#
# Variables already set win (the tests point AIRFLOW_HOME at a tmp dir and pick a free port).
# The stages reach S3 through the connection `segpipe_s3` or the AWS_* variables: see the README.

_segpipe_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

export AIRFLOW_HOME=${AIRFLOW_HOME:-$_segpipe_root/.work/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=${AIRFLOW__CORE__DAGS_FOLDER:-$_segpipe_root/dags}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# The run-report UI plugin (dags/plugins/segpipe_report.py); dags/.airflowignore keeps it out of parsing.
export AIRFLOW__CORE__PLUGINS_FOLDER=${AIRFLOW__CORE__PLUGINS_FOLDER:-$_segpipe_root/dags/plugins}
# The default 32 starts 32 task workers of ~140 MB each.
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=${AIRFLOW__API__PORT:-8080}
export AIRFLOW__API__BASE_URL=http://127.0.0.1:${AIRFLOW__API__PORT}
# Else task workers look for the execution API on localhost:8080 whatever the port.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:${AIRFLOW__API__PORT}/execution/
export SEGPIPE_RUNNER=${SEGPIPE_RUNNER:-local}
# What a run without conf (and the dataset Asset) uses: the dataset `make demo` generates (the docker
# runner takes s3:// locations only: where `SEGPIPE_RUNNER=docker make demo` uploads it).
if [[ $SEGPIPE_RUNNER == docker ]]; then
    _segpipe_demo_dataset=s3://${SEGPIPE_BUCKET:-segmentation}/datasets/demo
else
    _segpipe_demo_dataset=$_segpipe_root/.work/demo-dataset
fi
export SEGPIPE_DEFAULT_DATASET=${SEGPIPE_DEFAULT_DATASET:-$_segpipe_demo_dataset}
export SEGPIPE_DEFAULT_PROFILE=${SEGPIPE_DEFAULT_PROFILE:-cpu}
# No weekly cron on a workstation (unpausing would start last week's run at once): manual runs and
# dataset-asset events only. Set SEGPIPE_SCHEDULE to a cron expression to have it.
export SEGPIPE_SCHEDULE=${SEGPIPE_SCHEDULE:-off}
export PATH=$_segpipe_root/.venv/bin:$PATH

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # executed, not sourced: run airflow with these settings
    set -euo pipefail
    mkdir -p "$AIRFLOW_HOME"
    # A first run creates the SQLite metadata DB (~5 s); `db ...` commands manage it themselves.
    if [[ "${1:-}" != db && -z "${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-}" && ! -f "$AIRFLOW_HOME/airflow.db" ]]; then
        airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 \
            || { cat "$AIRFLOW_HOME/db-migrate.log" >&2; exit 1; }
    fi
    exec airflow "$@"
fi
