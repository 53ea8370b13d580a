"""Stages in real containers: the images infra/build_images.sh builds (on the engine
infra/docker_engine.sh starts where none answers), run by the DAG's docker runner. The containers
reach the embedded S3 server on 127.0.0.1 through the host network (SEGPIPE_DOCKER_NETWORK=host);
this machine has no GPU, so they run as on a docker host without GPUs (SEGPIPE_GPU_IDS=none).

The first run builds the images (minutes); the engine's data root lives outside the clone
(~/.cache/segpipe/docker), so later runs, even from a fresh clone, reuse every unchanged layer."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from conftest import subprocess_env
from test_dag import ROOT, runners  # runners: dags/segpipe_runners

from tasks import store
from tasks.train import MIRROR_INDEX

EXPERIMENTS = ["h1", "exp2"]  # as tests/test_dag_e2e.py: one of each model family
# Every container of a docker-mode run: the stages reach S3 on 127.0.0.1, no GPU is asked for.
DOCKER_SETTINGS = {"SEGPIPE_RUNNER": "docker", "SEGPIPE_DOCKER_NETWORK": "host", "SEGPIPE_GPU_IDS": "none"}
IMAGE_USER = "10001:10001"  # images/trainer/Dockerfile's USER
FAKE_SECRET = f"container-secret-{uuid.uuid4().hex}"


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """SEGPIPE_TRAINER_IMAGE / SEGPIPE_RELABEL_IMAGE as infra/build_images.sh built (or found) them."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "infra" / "build_images.sh")], capture_output=True, text=True, timeout=2400
    )
    assert result.returncode == 0, result.stderr[-6000:]
    print(f"infra/build_images.sh: {time.monotonic() - started:.0f}s\n{result.stderr}")
    tags = dict(line.split("=", 1) for line in result.stdout.split())
    assert set(tags) == {"SEGPIPE_TRAINER_IMAGE", "SEGPIPE_RELABEL_IMAGE"}, result.stdout
    return tags


def started_containers(since: str) -> list[dict[str, str]]:
    """name and image of every container the engine started since `since` (its clock)."""
    out = docker(
        "events", "--since", since, "--until", docker_now(), "--filter", "type=container",
        "--filter", "event=start", "--format", "{{json .Actor.Attributes}}",
    )  # fmt: skip
    return [json.loads(line) for line in out.splitlines()]


def docker_now() -> str:
    return str(time.time())


@pytest.mark.slow
def test_dags_test_runs_every_stage_in_a_container(
    images: dict[str, str], s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    bucket = store.Store.from_env()
    bucket.upload_dir(tiny_dataset, "datasets/tiny")
    dataset = f"s3://{bucket.bucket}/datasets/tiny"  # a container sees no host path
    conf = {
        "dataset": dataset,
        "experiments": EXPERIMENTS,
        "profile": "cpu",
        "max_epochs": 1,
        "relabel_strategy": "morphology",  # weights-free
        "bad_masks": f"{dataset}/defects.json",
        "quality_gate": 0.0,
    }
    env = subprocess_env(AIRFLOW_HOME=str(tmp_path / "airflow"), **DOCKER_SETTINGS, **images)
    command = ["bash", str(ROOT / "infra" / "airflow_local.sh"), "dags", "test", "segmentation_pipeline"]
    since = docker_now()
    result = subprocess.run(
        [*command, "-c", json.dumps(conf)], capture_output=True, text=True, env=env, timeout=1500
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    (run_id,) = sorted({key.split("/")[1] for key in bucket.list_keys("runs")})
    winner = bucket.get_json(store.winner_key(run_id))
    assert winner["winner"]["experiment"] in EXPERIMENTS and winner["failed"] == {}
    # Every stage ran as a container of the built images, named per run, task, map index and try.
    started = {c["name"]: c["image"] for c in started_containers(since) if run_id in c["name"]}
    trainer, relabel = images["SEGPIPE_TRAINER_IMAGE"], images["SEGPIPE_RELABEL_IMAGE"]
    expected = {f"segpipe-{run_id}-{task}-try1": trainer for task in ("validate", "eda", "select")}
    expected[f"segpipe-{run_id}-relabel-try1"] = relabel
    for index in range(len(EXPERIMENTS)):
        for task in ("train", "evaluate"):
            expected[f"segpipe-{run_id}-experiment.{task}-{index}-try1"] = trainer
    assert started == expected
    # ... as the images' non-root user; the stages wrote their work files (the run succeeded) as it.
    for image in set(expected.values()):
        assert docker("image", "inspect", "-f", "{{.Config.User}}", image).strip() == IMAGE_USER
    # Each stage published what it does in local mode, ClearML's offline sessions included.
    for experiment in EXPERIMENTS:
        assert bucket.marker(store.stage_prefix(run_id, "train", experiment)) is not None
        assert bucket.marker(store.stage_prefix(run_id, "eval", experiment)) is not None
    for experiment in EXPERIMENTS:  # the training's offline ClearML session, published with its outputs
        prefix = store.stage_prefix(run_id, "train", experiment)
        assert [key for key in bucket.list_keys(f"{prefix}/clearml/") if key.endswith(".zip")], prefix
    manifest = bucket.get_json(store.manifest_key(run_id))
    assert manifest["params"]["experiments"] == EXPERIMENTS
    # Nothing is left behind: every container succeeded and was removed, none still runs.
    assert docker("ps", "-a", "--filter", f"name=segpipe-{run_id}", "--format", "{{.Names}}") == ""


# ---------------------------------------------------------------- faults, with the real engine


@pytest.fixture()
def docker_stage(
    images: dict[str, str], s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """Makes the DAG's docker operator for a command and a try, as the DAG file would; removes every
    container it named afterwards."""
    for name, value in {**DOCKER_SETTINGS, **images}.items():
        monkeypatch.setenv(name, value)
    names: list[str] = []
    run = uuid.uuid4().hex[:8]

    def make(command: list[str], try_number: int = 1) -> Any:
        settings = runners.Settings.from_env()
        image = settings.relabel_image if command[0] == "relabel" else settings.trainer_image
        op = runners.stage_operator(settings, command[0], command, image=image, gpu=command[0] == "train")
        # What the DAG's CONTAINER_NAME template renders to for this task instance and try.
        op.container_name = f"segpipe-test-{run}-{command[0]}-try{try_number}"
        names.append(op.container_name)
        return op

    yield make
    for name in names:
        docker("rm", "--force", name, check=False)


def run_logged(op: Any) -> tuple[str, BaseException | None]:
    """Execute the operator; its task log (the operator's log events) and what it raised."""
    with structlog.testing.capture_logs() as events:
        try:
            op.execute({})
            error = None
        except Exception as err:  # noqa: BLE001 - returned to the test, which asserts on it
            error = err
    return "\n".join(str(event.get("event")) for event in events), error


def inspect(name: str) -> dict[str, Any]:
    return json.loads(docker("inspect", name))[0]


@pytest.mark.slow
def test_exit_2_in_a_container_fails_without_retry_and_no_secret_reaches_the_log(
    docker_stage: Any, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The S3 credentials come from the connection (moto accepts any): a secret the stage really used.
    endpoint = s3_env["AWS_ENDPOINT_URL"].replace(":", "%3A").replace("/", "%2F")
    monkeypatch.setenv(
        "AIRFLOW_CONN_SEGPIPE_S3",
        f"aws://FAKEKEY:{FAKE_SECRET}@/?endpoint_url={endpoint}&region_name=us-east-1",
    )
    bucket = s3_env["SEGPIPE_BUCKET"]
    op = docker_stage(["eda", "--run-id", "r1", "--dataset", f"s3://{bucket}/datasets/missing"])
    log, error = run_logged(op)
    assert isinstance(error, AirflowFailException), (error, log[-3000:])
    assert "eda exited 2 (bad input): not retried" in str(error)
    assert "datasets/missing" in log  # the stage's own error message reached the task log
    assert FAKE_SECRET not in log
    assert op._private_environment["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET  # the container had it
    # The container is gone (removed whatever the outcome, its output is in the task log above).
    assert docker("ps", "-a", "--filter", f"name={op.container_name}", "--format", "{{.Names}}") == ""


@pytest.mark.slow
def test_killed_training_container_is_retried_and_resumes_at_the_next_epoch(
    docker_stage: Any, s3_env: dict[str, str], tiny_dataset: Path
) -> None:
    bucket = store.Store.from_env()
    bucket.upload_dir(tiny_dataset, "datasets/tiny")
    train = [
        "train",
        "--experiment",
        "exp2",
        "--run-id",
        "r1",
        "--dataset",
        f"s3://{bucket.bucket}/datasets/tiny",
    ]
    train += ["--profile", "cpu", "--max-epochs", "3", "--cfg-options", "train_cfg.val_interval=1"]
    prefix = store.stage_prefix("r1", "train", "exp2")
    first = docker_stage(train, try_number=1)
    outcome: dict[str, BaseException | None] = {}
    thread = threading.Thread(target=lambda: outcome.update(error=run_logged(first)[1]))
    thread.start()
    deadline = time.monotonic() + 600
    while not bucket.exists(f"{prefix}/work/{MIRROR_INDEX}"):  # the first epoch's checkpoint is mirrored
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no checkpoint mirrored within 600 s"
        time.sleep(0.2)
    # While it runs: the image's non-root user, no device asked for on a host without GPUs, and its
    # environment, credentials included, visible to whoever may use the engine (README).
    container = inspect(first.container_name)
    assert container["Config"]["User"] == IMAGE_USER
    assert container["HostConfig"]["DeviceRequests"] is None
    assert f"AWS_SECRET_ACCESS_KEY={s3_env['AWS_SECRET_ACCESS_KEY']}" in container["Config"]["Env"]
    docker("kill", first.container_name)  # the container dies mid-training: no cleanup of any kind
    thread.join(timeout=120)
    error = outcome["error"]
    # Retryable (not AirflowFailException): Airflow's next try runs the same command.
    assert type(error) is AirflowException and "train exited 137" in str(error), error
    mirrored = bucket.get_json(f"{prefix}/work/{MIRROR_INDEX}")["epoch"]
    assert bucket.marker(prefix) is None and 1 <= mirrored < 3

    second = docker_stage(train, try_number=2)
    log, error = run_logged(second)
    assert error is None, log[-4000:]
    assert f"resumed epoch: {mirrored}," in log and "resumed epoch: 0," not in log
    assert bucket.marker(prefix) is not None
    # Both tries' containers are gone (each had its own name: a retry never meets the last one).
    for op in (first, second):
        assert docker("ps", "-a", "--filter", f"name={op.container_name}", "--format", "{{.Names}}") == ""


def test_a_docker_host_without_gpus_asks_for_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """SEGPIPE_GPU_IDS=none: no device request; with GPU ids, each training keeps its own."""
    monkeypatch.setenv("SEGPIPE_RUNNER", "docker")
    specs = [{"name": "h1", "device_requests": None}, {"name": "exp2", "device_requests": None}]
    for ids, expected in (("none", [None, None]), ("0,1", [["0"], ["1"]])):
        monkeypatch.setenv("SEGPIPE_GPU_IDS", ids)
        settings = runners.Settings.from_env()
        assert settings.docker_gpus == (ids != "none")
        planned = runners.assign_gpus(specs, runners.gpu_ids_from_env())
        got = [s["device_requests"] and s["device_requests"][0]["DeviceIDs"] for s in planned]
        assert got == expected
        relabel = runners.stage_operator(settings, "relabel", ["relabel"], image="x", gpu=True)
        assert (relabel.device_requests is None) == (ids == "none")


def test_engine_start_is_idempotent() -> None:
    """A second `start` finds the engine answering and changes nothing; `status` names it."""
    for _ in range(2):
        result = subprocess.run(
            ["bash", str(ROOT / "infra" / "docker_engine.sh"), "start"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    assert "answers" in result.stderr
    status = subprocess.run(
        ["bash", str(ROOT / "infra" / "docker_engine.sh"), "status"], capture_output=True, text=True
    )
    assert status.returncode == 0 and "engine at" in status.stdout
    # Images and layer cache outside the clone: a fresh clone finds them.
    data_root = Path(status.stdout.rsplit("data root ", 1)[1].strip())
    assert not data_root.resolve().is_relative_to(ROOT.resolve()), data_root
    # ... nor in the suite's per-test HOME (a temporary folder): a second suite run finds the images.
    assert not data_root.resolve().is_relative_to(Path(os.environ["HOME"]).resolve()), data_root


def test_engine_starts_stops_and_keeps_its_state_where_told(tmp_path: Path) -> None:
    """A private engine (own socket, state, data root; no bridge, so it leaves the host's network
    alone): started once, found answering the second time, stopped by pid, and its state where the
    script says (pid file under the state dir, images in the data root)."""
    env = {
        **subprocess_env(),
        "DOCKER_HOST": f"unix://{tmp_path}/docker.sock",
        "SEGPIPE_DOCKER_STATE": str(tmp_path / "state"),
        "SEGPIPE_DOCKER_DATA_ROOT": str(tmp_path / "data"),
        "SEGPIPE_DOCKERD_ARGS": "--bridge=none --iptables=false",
    }

    def engine(action: str) -> subprocess.CompletedProcess:
        command = ["bash", str(ROOT / "infra" / "docker_engine.sh"), action]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    try:
        first = engine("start")
        assert first.returncode == 0 and "starting dockerd" in first.stderr, first.stderr
        pid = int((tmp_path / "state" / "dockerd.pid").read_text())
        again = engine("start")
        assert again.returncode == 0 and "answers" in again.stderr, again.stderr
        status = engine("status")
        assert status.returncode == 0 and f"data root {tmp_path / 'data'}" in status.stdout, status.stdout
    finally:
        stopped = engine("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
    assert not Path(f"/proc/{pid}").exists()
    assert engine("status").returncode == 1
    assert "no engine started by this clone" in engine("stop").stderr  # a second stop: nothing to do
