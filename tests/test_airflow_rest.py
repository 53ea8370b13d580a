"""Airflow as deployed (api-server, scheduler, dag-processor on 127.0.0.1): the DAG is triggered
through the REST API with a conf, runs to success, refuses a bad conf, and an asset event starts a run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import s3_server_module, subprocess_env
from test_dag import ROOT

from tasks import store

DAG_ID = "segmentation_pipeline"
TERMINAL = {"success", "failed"}


class Airflow:
    """The three Airflow services started from infra/airflow_local.sh, and a REST client for them."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.env = home, env
        self.port = int(env["AIRFLOW__API__PORT"])
        self.procs: list[subprocess.Popen] = []
        self.token = ""

    def start(self) -> None:
        script = str(ROOT / "infra" / "airflow_local.sh")
        subprocess.run(["bash", script, "db", "migrate"], env=self.env, check=True, capture_output=True)
        # Not `standalone`: its log server binds 0.0.0.0:8793; these stay on 127.0.0.1.
        for args in (
            ["api-server", "--port", str(self.port)],
            ["scheduler", "--skip-serve-logs"],
            ["dag-processor"],
        ):
            log = open(self.home / f"{args[0]}.log", "wb")  # noqa: SIM115 - the child writes it
            self.procs.append(
                subprocess.Popen(
                    ["bash", script, *args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_for(self, what: str, check: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self.procs):
                pytest.fail(f"an Airflow service exited while waiting for {what}:\n{self.logs()}")
            try:
                if result := check():
                    return result
            except OSError:  # not listening yet
                pass
            time.sleep(2)
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}:\n{self.logs()}")

    def login(self) -> None:
        self.wait_for("the API server", lambda: self.request("GET", "/api/v2/monitor/health")[0] == 200, 180)
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        status, body = self.request(
            "POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}
        )
        assert status in (200, 201), body
        self.token = body["access_token"]

    def wait_for_run(self, run_id: str, timeout_s: float) -> dict:
        def finished() -> dict | None:
            status, run = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            return run if status == 200 and run["state"] in TERMINAL else None

        return self.wait_for(f"run {run_id}", finished, timeout_s)

    def task_states(self, run_id: str) -> dict[str, list[tuple[str, str | None]]]:
        status, body = self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        assert status == 200, body
        states: dict[str, list[tuple[str, str | None]]] = {}
        for ti in body["task_instances"]:
            states.setdefault(ti["task_id"], []).append((ti["state"], ti.get("rendered_map_index")))
        return states

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.home.glob("*.log"))
        )


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    return shutil.copytree(tiny_dataset, tmp_path / "pets")


@pytest.fixture()
def airflow(s3_env: dict[str, str], dataset: Path, tmp_path: Path) -> Iterator[Airflow]:
    home = tmp_path / "airflow"
    home.mkdir()
    env = subprocess_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__API__PORT=str(s3_server_module.free_port()),
        AIRFLOW__CORE__PARALLELISM="2",
        SEGPIPE_RUNNER="local",
        SEGPIPE_DEFAULT_DATASET=str(dataset),
        # Unpausing would otherwise start the last weekly tick's run (catchup off runs the latest).
        SEGPIPE_SCHEDULE="off",
    )
    service = Airflow(home, env)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.mark.slow
def test_rest_api_triggers_a_run_and_an_asset_event_starts_one(
    airflow: Airflow, s3_env: dict[str, str], dataset: Path
) -> None:
    airflow.login()
    airflow.wait_for(
        "the DAG to be parsed", lambda: airflow.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 180
    )

    # A bad conf is refused by the params' schema: no run is created.
    status, body = airflow.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {"experiments": ["h9"]}}
    )
    assert status == 400, body
    assert airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"] == 0

    assert airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})[0] == 200
    conf = {
        "dataset": str(dataset),
        "experiments": ["exp2"],
        "profile": "cpu",
        "max_epochs": 1,
        "relabel_strategy": "morphology",
        "quality_gate": 0.0,
        "promote": False,
    }
    started = time.monotonic()
    status, run = airflow.request(
        "POST",
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        {"dag_run_id": "rest-trigger-1", "logical_date": None, "conf": conf},
    )
    assert status == 200, run
    run = airflow.wait_for_run("rest-trigger-1", timeout_s=600)
    print(f"REST-triggered run (tiny dataset, 1 experiment): {time.monotonic() - started:.0f}s")
    states = airflow.task_states("rest-trigger-1")
    assert run["state"] == "success", f"{states}\n{airflow.logs()}"
    assert airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")[1]["total_entries"] == 1
    assert states["experiment.train"] == [("success", "exp2")]  # mapped instances labelled by experiment
    bucket = store.Store.from_env()
    assert bucket.get_json(store.winner_key("rest-trigger-1"))["winner"]["experiment"] == "exp2"
    assert not bucket.exists(store.PRODUCTION_KEY)  # promote: false

    # A producer announces a new dataset version through the asset: a run starts; its dataset (here one
    # with '..') is validated like a param, so the run fails at `plan` before any stage runs.
    status, assets = airflow.request("GET", "/api/v2/assets?name_pattern=segpipe_dataset")
    assert status == 200 and assets["total_entries"] == 1, assets
    event = {
        "asset_id": assets["assets"][0]["id"],
        "extra": {"dataset": f"s3://{bucket.bucket}/datasets/../x"},
    }
    assert airflow.request("POST", "/api/v2/assets/events", event)[0] == 200

    def asset_run() -> str | None:
        runs = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=asset_triggered")[1][
            "dag_runs"
        ]
        return runs[0]["dag_run_id"] if runs else None

    asset_run_id = airflow.wait_for("the asset-triggered run", asset_run, 120)
    assert airflow.wait_for_run(asset_run_id, timeout_s=180)["state"] == "failed"
    states = airflow.task_states(asset_run_id)
    assert states["plan"] == [("failed", None)]
    assert states["validate"] == [("upstream_failed", None)]
