#!/usr/bin/env bash
# make demo (placeholder until the DAG lands): generate and validate the default dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m tasks synth --out .work/demo-dataset
.venv/bin/python -m tasks validate .work/demo-dataset
