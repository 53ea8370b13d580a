"""End to end: `airflow dags test segmentation_pipeline -c CONF` runs every stage for real (local
runner, CPU profile) on a tiny generated dataset against the embedded S3 server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_dag import ROOT

from tasks import store

# one of each model family (DeepLabV3+, SegFormer) keeps it short, plus the two experiment files of
# the study's open ideas (Focal loss, test-time augmentation)
EXPERIMENTS = ["h1", "exp2", "h1_focal", "exp2_tta"]


def run_ids(bucket: store.Store) -> list[str]:
    return sorted({key.split("/")[1] for key in bucket.list_keys("runs")})


@pytest.mark.slow
def test_dags_test_runs_the_pipeline_and_publishes_a_winner(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    dataset = shutil.copytree(tiny_dataset, tmp_path / "pets")
    conf = {
        "dataset": str(dataset),
        "experiments": EXPERIMENTS,
        "profile": "cpu",
        "max_epochs": 1,
        "relabel_strategy": "morphology",  # weights-free: no YOLO/SAM2 download here
        "bad_masks": str(dataset / "defects.json"),
        "quality_gate": 0.0,  # one epoch on 64x64 images: any winner passes, so promotion runs too
    }
    env = subprocess_env(AIRFLOW_HOME=str(tmp_path / "airflow"), SEGPIPE_RUNNER="local")
    command = ["bash", str(ROOT / "infra" / "airflow_local.sh"), "dags", "test", "segmentation_pipeline"]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "-c", json.dumps(conf)], capture_output=True, text=True, env=env, timeout=900
    )
    print(
        f"airflow dags test (tiny dataset, {len(EXPERIMENTS)} experiments): {time.monotonic() - started:.0f}s"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    bucket = store.Store.from_env()
    (run_id,) = run_ids(bucket)
    assert run_id.startswith("manual__")
    winner = bucket.get_json(store.winner_key(run_id))
    assert winner["winner"]["experiment"] in EXPERIMENTS
    assert winner["failed"] == {}
    assert bucket.exists(store.report_key(run_id))
    for experiment in EXPERIMENTS:
        assert bucket.marker(store.stage_prefix(run_id, "train", experiment)) is not None
        assert bucket.marker(store.stage_prefix(run_id, "eval", experiment)) is not None
    manifest = bucket.get_json(store.manifest_key(run_id))
    assert manifest["params"]["experiments"] == EXPERIMENTS
    assert bucket.get_json(store.PRODUCTION_KEY)["run_id"] == run_id
    # The same argv the DAG built reached each stage (logged by the local runner before it starts).
    assert f"tasks eda --run-id {run_id} --dataset {dataset}" in output
