"""One finished pipeline run shared by the UI and review tests: `airflow dags test` on the tiny dataset.

A real run of the DAG (local runner, CPU profile, one experiment, one epoch), so Airflow's metadata DB
holds its DagRun (the UI's run page) and the store holds everything it published: EDA charts, the
relabeled masks, the training's log.json, the evaluation's panels and confusion matrix, winner.json and
report.md. Its own S3 server and bucket; tests add keys of their own (a review's list, another run
id) but never change the run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from reliability.support import offline_env

from tasks.store import Store, manifest_key

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "segpipe-finished-run"
EXPERIMENT = "h1"


@dataclass(frozen=True)
class FinishedRun:
    airflow_run_id: str
    run_id: str  # the key-safe one: runs/<run_id>/
    dataset: Path
    airflow_home: Path
    env: dict[str, str]  # S3 + offline settings of the run (merge into a subprocess's environment)


def run_pipeline(s3_server, tiny_dataset: Path, base: Path) -> FinishedRun:
    """The run, on `s3_server` (a private one: a fault test restarting the shared one would wipe it)."""
    dataset = shutil.copytree(tiny_dataset, base / "pets")
    s3_server.create_bucket(BUCKET)
    env = {**offline_env(base / "home"), **s3_server.env(BUCKET)}
    home = base / "airflow"
    conf = {
        "dataset": str(dataset),
        "experiments": [EXPERIMENT],
        "profile": "cpu",
        "max_epochs": 1,
        "cfg_options": {"train_cfg.val_interval": "1"},
        "relabel_strategy": "morphology",
        "quality_gate": 0.0,
        "promote": False,
    }
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "infra" / "airflow_local.sh"), "dags", "test", "segmentation_pipeline"]
        + ["-c", json.dumps(conf)],
        env={**os.environ, **env, "AIRFLOW_HOME": str(home), "SEGPIPE_RUNNER": "local"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"finished run (airflow dags test, tiny dataset, {EXPERIMENT}): {time.monotonic() - started:.0f}s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    bucket = store(env)
    (run_id,) = {key.split("/")[1] for key in bucket.list_keys("runs")}
    airflow_run_id = bucket.get_json(manifest_key(run_id))["params"]["airflow_run_id"]
    return FinishedRun(airflow_run_id, run_id, dataset, home, env)


def store(env: dict[str, str]) -> Store:
    """tasks.store on the run's bucket."""
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    return Store(client, env["SEGPIPE_BUCKET"])
