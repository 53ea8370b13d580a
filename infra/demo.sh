#!/usr/bin/env bash
# make demo: the whole pipeline on this machine, as `airflow dags test` runs it (local runner, CPU
# profile): embedded S3 server, the study-scale generated dataset (200/120/120 images at 256x256),
# validate -> eda -> relabel -> train x4 -> evaluate x4 -> select. Prints the winner and the artifact
# tree; leaves winner.json, report.md, the task log and a copy of the bucket in demo-output/.
#
# Settings: DEMO_EXPERIMENTS (JSON list, default all four), DEMO_MAX_EPOCHS (default: the CPU profile's),
# SEGPIPE_S3_PORT (default: a free port), SEGPIPE_RUNNER (default local; docker: every stage a container
# of the images infra/build_images.sh builds, on the engine infra/docker_engine.sh starts if none
# answers, reaching the S3 server through the host network; the dataset is uploaded to the bucket,
# since a container sees no host path; SEGPIPE_GPU_IDS defaults to none, a host without GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
WORK=$ROOT/.work
OUT=$ROOT/demo-output
DATASET=$WORK/demo-dataset
BUCKET=${SEGPIPE_BUCKET:-segmentation}
PIDFILE=$WORK/demo-s3.pid
started=$(date +%s)

mkdir -p "$WORK"
rm -rf "$OUT" && mkdir -p "$OUT"
PORT=${SEGPIPE_S3_PORT:-$("$PY" -c 'import sys; sys.path.insert(0, "infra"); import s3_server; print(s3_server.free_port())')}

# The embedded S3 API server (moto): it keeps objects in memory, so the bucket is copied to
# demo-output/artifacts/ before the server stops.
"$PY" infra/s3_server.py start --port "$PORT" --bucket "$BUCKET" --pidfile "$PIDFILE" --log "$WORK/demo-s3.log"
trap '"$PY" infra/s3_server.py stop --pidfile "$PIDFILE"' EXIT
eval "$("$PY" - "$PORT" "$BUCKET" <<'EOF'
import shlex
import sys

sys.path.insert(0, "infra")
import s3_server

for key, value in s3_server.client_env(int(sys.argv[1]), sys.argv[2]).items():
    print(f"export {key}={shlex.quote(value)}")
EOF
)"

# Everything the stages cache or write locally stays under .work/ and offline.
export SEGPIPE_WORK_DIR=$WORK/demo-cache CLEARML_OFFLINE_MODE=1 CLEARML_CACHE_DIR=$WORK/demo-cache/clearml
export YOLO_OFFLINE=1 YOLO_CONFIG_DIR=$WORK/demo-cache/yolo MPLCONFIGDIR=$WORK/demo-cache/mpl
export TORCH_HOME=$WORK/demo-cache/torch SEGPIPE_RUNNER=${SEGPIPE_RUNNER:-local}
# `airflow dags test` runs one stage at a time, so a training may use every core (the stages keep
# one core free otherwise: tasks.train.configure_torch_threads); measured 15% faster per iteration.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}

echo "== generating the demo dataset in $DATASET (seed 0: same code, same content, same version)"
rm -rf "$DATASET"
"$PY" -m tasks synth --out "$DATASET"
LOCATION=$DATASET
if [ "$SEGPIPE_RUNNER" = docker ]; then
  echo "== docker runner: engine, images (built once, then from the layer cache)"
  eval "$(bash infra/build_images.sh)"
  export SEGPIPE_TRAINER_IMAGE SEGPIPE_RELABEL_IMAGE
  export SEGPIPE_DOCKER_NETWORK=${SEGPIPE_DOCKER_NETWORK:-host} SEGPIPE_GPU_IDS=${SEGPIPE_GPU_IDS:-none}
  LOCATION=s3://$BUCKET/datasets/demo
  "$PY" -c 'import sys; from tasks.store import Store; Store.from_env().upload_dir(sys.argv[1], sys.argv[2])' \
    "$DATASET" datasets/demo
fi

CONF=$("$PY" - "$LOCATION" "${DEMO_EXPERIMENTS:-}" "${DEMO_MAX_EPOCHS:-}" <<'EOF'
import json
import sys

dataset, experiments, max_epochs = sys.argv[1:]
conf = {
    "dataset": dataset,
    "profile": "cpu",
    "relabel_strategy": "auto",  # YOLOv8+SAM2 when their weights are available, else morphology
    "bad_masks": f"{dataset}/defects.json",
}
if experiments:
    conf["experiments"] = json.loads(experiments)
if max_epochs:
    conf["max_epochs"] = int(max_epochs)
print(json.dumps(conf))
EOF
)
echo "== airflow dags test segmentation_pipeline -c '$CONF'  (task log: demo-output/dags-test.log)"
set +e
bash infra/airflow_local.sh dags test segmentation_pipeline -c "$CONF" 2>&1 | tee "$OUT/dags-test.log" \
    | grep --line-buffered -E "DAG TEST\] end task|running: |Starting docker container|Task failed|DagRun Finished|error:|quality gate"
rc=${PIPESTATUS[0]}
set -e

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

from tasks import store

out = Path(sys.argv[1])
bucket = store.Store.from_env()
keys = bucket.list_keys("")
run_ids = sorted({key.split("/")[1] for key in keys if key.startswith("runs/")})
print(f"\n== artifacts in s3://{bucket.bucket}/ ({len(keys)} objects)")
folders: dict[str, list[str]] = {}
for key in keys:
    folder, _, name = key.rpartition("/")
    folders.setdefault(folder, []).append(name)
for folder, names in sorted(folders.items()):
    # Image folders hold hundreds of files: list small folders, count big ones.
    shown = ", ".join(names) if len(names) <= 8 else f"{len(names)} files"
    print(f"  {folder}/: {shown}")
bucket.download_prefix("", out / "artifacts")
print(f"(copied to {out / 'artifacts'}: the embedded server keeps objects in memory only)")
for run_id in run_ids:
    for key, name in ((store.winner_key(run_id), "winner.json"), (store.report_key(run_id), "report.md")):
        if bucket.exists(key):
            bucket.download_file(key, out / name)
    if (out / "winner.json").exists():
        winner = json.loads((out / "winner.json").read_text())
        best = winner["winner"]
        print(f"\n== run {run_id}: winner {best['experiment']}: val mDice {best['val_mDice']}, "
              f"test mDice {best['test_mDice']}; {winner['promotion']['decision']}")
        if winner["failed"]:
            print(f"   failed experiments: {winner['failed']}")
EOF
echo "== demo-output/: winner.json, report.md, dags-test.log, artifacts/  ($(( $(date +%s) - started ))s)"
exit "$rc"
