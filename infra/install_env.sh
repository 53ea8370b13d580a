#!/usr/bin/env bash
# Builds the local environment in $1 (default .venv): Airflow side + task side + dev tools.
# Idempotent: pip skips what is already installed at the pinned version. Called by `make setup`.
# The trainer image (images/trainer/Dockerfile) reuses the same requirement and constraint files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# setuptools must stay < 81: mmcv's setup.py needs pkg_resources, removed in 81.
"${PIP[@]}" --upgrade "pip==25.3" "setuptools==80.10.2" wheel
# torch first, so nothing below pulls another (CUDA) torch build.
"${PIP[@]}" -r requirements/torch.txt -c requirements/constraints.txt
"${PIP[@]}" -r requirements/tasks.txt -r requirements/airflow.txt -r requirements/dev.txt \
  -c requirements/constraints.txt
# mmcv: requirements/mmcv.txt pins the version (2.1.0; mmseg 1.2.2 asserts mmcv < 2.2.0). PyPI has
# mmcv only as a source distribution whose compiled ops take ~38 min to build on 2 cores. Locally we
# install the same version's pure-Python wheel, mmcv-lite (what mmcv's setup.py itself produces with
# MMCV_WITH_OPS=0): neither study model calls an mmcv op, and tasks/mmcompat.py makes mmseg's four
# unguarded `mmcv.ops` imports resolve to ops that raise a clear error if ever called. The GPU trainer
# image (images/trainer/Dockerfile) builds the full mmcv with its CUDA ops from the same pin.
MMCV_VERSION=$(sed -n 's/^mmcv==//p' requirements/mmcv.txt)
"${PIP[@]}" "mmcv-lite==${MMCV_VERSION}"
# sam2 builds an optional CUDA extension; without isolation it builds against the torch above
# instead of pulling a second 5.5 GB torch into an isolated build env.
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation -r requirements/sam2.txt -c requirements/constraints.txt
# The project itself, editable, so `python -m tasks` works from any directory.
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -m pip check
