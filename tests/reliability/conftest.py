"""The pipeline run the idempotency, concurrency, ClearML and secret tests share: the DAG's own stage
commands, run by its local runner, twice with the same Airflow run id, with known fake secrets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from test_dag import parse_dag, plan_xcoms, render, run_params, runners  # runners: dags/segpipe_runners

from tasks.store import Store, manifest_key, report_key, winner_key

from .support import (
    CLEARML_ACCESS,
    CLEARML_DOWN_EXPERIMENT,
    CLEARML_SECRET,
    CONN_S3_KEY,
    CONN_S3_SECRET,
    PIPELINE_EXPERIMENTS,
    WORKER_S3_KEY,
    WORKER_S3_SECRET,
    PipelineRun,
    bucket_objects,
    bucket_state,
    closed_port,
    offline_env,
)

PIPELINE_BUCKET = "segpipe-reliability"


def _events_text(events: list[dict]) -> str:
    return "\n".join(str(event.get("event")) for event in events)


def _operator_log(task_id: str, command: list[str]) -> str:
    """Run one command with the DAG's local runner; its task log (the operator's log events)."""
    with structlog.testing.capture_logs() as events:
        try:
            runners.LocalStageOperator(task_id=task_id, command=command).execute({})
        except Exception as err:
            raise AssertionError(f"{task_id} failed: {err}\n{_events_text(events)[-6000:]}") from err
    return _events_text(events)


def _train(spec: dict[str, Any]) -> tuple[str, float, float]:
    start = time.monotonic()
    if spec["name"] == CLEARML_DOWN_EXPERIMENT:
        # The environment the local runner gives a stage, with ClearML online: its server is unreachable.
        env = {**os.environ, **runners.stage_environment(), "CLEARML_OFFLINE_MODE": "0"}
        result = subprocess.run(
            [sys.executable, "-m", "tasks", *spec["train"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-6000:]
    else:
        log = _operator_log("train", spec["train"])
    return log, start, time.monotonic()


def _run_pass(run: PipelineRun) -> dict[str, str]:
    plan = {key: value for (task_id, key), value in run.xcoms.items() if task_id == "plan"}
    specs = run.xcoms[("plan_experiments", "return_value")]
    logs = {stage: _operator_log(stage, plan[stage]) for stage in ("validate", "eda", "relabel")}
    # The experiments train at the same time, as the DAG's mapped task instances do. The operator's
    # log capture is process-wide, so one trains through it and the other as its own process.
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        for spec, future in [(spec, pool.submit(_train, spec)) for spec in specs]:
            log, start, end = future.result()
            logs[f"train/{spec['name']}"] = log
            run.train_times.setdefault(spec["name"], (start, end))
    with structlog.testing.capture_logs() as events, ThreadPoolExecutor(max_workers=len(specs)) as pool:
        operators = [runners.LocalStageOperator(task_id="evaluate", command=s["evaluate"]) for s in specs]
        for future in [pool.submit(op.execute, {}) for op in operators]:
            future.result()
    logs["evaluate"] = _events_text(events)
    logs["select"] = _operator_log("select", plan["select"])
    return logs


@pytest.fixture(scope="session")
def pipeline(s3_server: Any, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The DAG's stage commands run by its local runner, twice with the same Airflow run id.

    Fake secrets sit in the worker's AWS_* variables, in the Airflow connection `segpipe_s3` (which the
    runner prefers) and in CLEARML_API_*. h1 trains with ClearML online at a closed port while exp2
    trains at the same time with ClearML offline (its session zip is published). A private S3 server
    keeps the fault tests from wiping this run; everything is recorded before it stops.
    """
    base = tmp_path_factory.mktemp("pipeline")
    server = type(s3_server)(base / "moto.log")
    server.start()
    env = {
        **offline_env(base / "home"),
        **server.env(PIPELINE_BUCKET),
        "AWS_ACCESS_KEY_ID": WORKER_S3_KEY,
        "AWS_SECRET_ACCESS_KEY": WORKER_S3_SECRET,
        "AIRFLOW_CONN_SEGPIPE_S3": (
            f"aws://{CONN_S3_KEY}:{CONN_S3_SECRET}@/?endpoint_url="
            f"http%3A%2F%2F127.0.0.1%3A{server.port}&region_name=us-east-1"
        ),
        "CLEARML_API_HOST": f"http://127.0.0.1:{closed_port()}",
        "CLEARML_API_ACCESS_KEY": CLEARML_ACCESS,
        "CLEARML_API_SECRET_KEY": CLEARML_SECRET,
    }
    try:
        server.create_bucket(PIPELINE_BUCKET)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            dag = parse_dag(mp, SEGPIPE_BUCKET=PIPELINE_BUCKET)
            params = run_params(
                dag,
                dataset=str(tiny_dataset),
                experiments=list(PIPELINE_EXPERIMENTS),
                profile="cpu",
                max_epochs=1,
                # validated at epoch 1 whatever the profile's interval; the DAG's param, end to end
                cfg_options={"train_cfg.val_interval": "1"},
                relabel_strategy="morphology",
                quality_gate=0.0,
            )
            xcoms = plan_xcoms(dag, params)
            rendered = [
                render(dag.get_task(task), xcoms) for task in ("validate", "eda", "relabel", "select")
            ]
            run = PipelineRun(xcoms[("plan", "run_id")], xcoms, rendered, runners.stage_environment())
            store = Store.from_env()
            for name in ("first", "second"):
                run.logs[name] = _run_pass(run)
                run.state[name] = bucket_state(store)
                keys = (manifest_key(run.run_id), winner_key(run.run_id), report_key(run.run_id))
                run.documents[name] = {key: store.get_bytes(key) for key in keys}
            run.objects = bucket_objects(store)
        run.local_files = sorted(path for path in (base / "home").rglob("*") if path.is_file())
    finally:
        server.stop()
    return run
