"""The production topology: the scale-out topology of tests/test_scaleout.py with SEGPIPE_RUNNER=docker,
every stage in a container of the images infra/build_images.sh builds, the GPU host's worker
starting relabel's and train's containers from its own network namespace (through the engine's unix
socket). The containers use the host network and reach S3 at the main host's address; no GPU here
(SEGPIPE_GPU_IDS=none)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dag import ROOT, runners
from test_scaleout import GPU_STAGES, Topology, open_topology, scaleout

from tasks import store

# Both scale-out modules on one worker: two topologies at once would halve each one's CPU.
pytestmark = pytest.mark.xdist_group("scaleout")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """SEGPIPE_TRAINER_IMAGE / SEGPIPE_RELABEL_IMAGE as infra/build_images.sh built (or found) them."""
    result = subprocess.run(
        ["bash", str(ROOT / "infra" / "build_images.sh")], capture_output=True, text=True, timeout=2400
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return dict(line.split("=", 1) for line in result.stdout.split())


@pytest.fixture(scope="module")
def docker_topology(images: dict[str, str], tiny_dataset: Path) -> Iterator[Topology]:
    settings = {"SEGPIPE_RUNNER": "docker", "SEGPIPE_DOCKER_NETWORK": "host", "SEGPIPE_GPU_IDS": "none"}
    with open_topology("scaleout-docker-test", tiny_dataset, **settings, **images) as topology:
        yield topology


def containers(since: str, run_id: str) -> dict[str, str]:
    """Container name -> image of the run's stage containers the engine started since `since`."""
    out = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            since,
            "--until",
            str(int(time.time())),
            "--filter",
            "type=container",
            "--filter",
            "event=start",
            "--format",
            "{{.Actor.Attributes.name}} {{.Actor.Attributes.image}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = runners.safe_run_id(run_id)
    return dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(f"segpipe-{key}-"))


@pytest.mark.slow
def test_docker_runner_on_the_gpu_host_runs_relabel_and_train_in_containers(
    docker_topology: Topology, images: dict[str, str]
) -> None:
    since = str(int(time.time()) - 1)
    run_id = "docker-run"
    docker_topology.api.trigger(
        run_id,
        {
            "dataset": docker_topology.dataset,
            "experiments": ["exp2"],
            "profile": "cpu",
            "max_epochs": 1,
            "relabel_strategy": "morphology",
            "quality_gate": 0.0,
            "promote": False,
        },
    )
    run = docker_topology.finish(run_id)
    states = [(ti["task_id"], ti["state"], ti["hostname"]) for ti in run.task_instances]
    assert run.state == "success", states
    for ti in run.task_instances:
        if ti["task_id"] in GPU_STAGES:
            assert (ti["hostname"], ti["queue"], ti["pool"]) == (scaleout.GPU_HOSTNAME, "gpu", "gpu"), ti
    started = containers(since, run_id)
    key = runners.safe_run_id(run_id)
    trainer, relabel = images["SEGPIPE_TRAINER_IMAGE"], images["SEGPIPE_RELABEL_IMAGE"]
    assert started.get(f"segpipe-{key}-relabel-try1") == relabel, started
    assert started.get(f"segpipe-{key}-experiment.train-0-try1") == trainer, started
    for task in ("validate", "eda", "select"):
        assert started.get(f"segpipe-{key}-{task}-try1") == trainer, started
    assert docker_topology.bucket.marker(store.stage_prefix(key, "train", "exp2")) is not None
    assert store.Store.from_env().get_json(store.winner_key(key))["winner"]["experiment"] == "exp2"
