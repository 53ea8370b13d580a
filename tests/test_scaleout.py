"""The scale-out topology for real (infra/scaleout.py): PostgreSQL, Redis, the S3 server, Airflow with
the CeleryExecutor, a main worker and a GPU-host worker in its own network namespace. The DAG is
triggered over the REST API with a tiny conf; faults are injected for real (the GPU host's processes
SIGKILLed, Redis and the scheduler restarted) and the disturbed runs' outputs are compared with an
undisturbed one's. One topology for the module: starting it costs about a minute of CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.utils.net import get_hostname
from reliability.support import json_without
from test_dag import ROOT, runners

from tasks import store

if str(ROOT / "infra") not in sys.path:  # infra/ holds scripts, not a package
    sys.path.append(str(ROOT / "infra"))
import scaleout  # noqa: E402

# Both scale-out modules on one worker: two topologies at once would halve each one's CPU.
pytestmark = pytest.mark.xdist_group("scaleout")

EXPERIMENTS = ["h1", "h2", "exp1", "exp2"]
FAULT_EXPERIMENTS = ["exp2"]  # the disturbed runs train one experiment (CPU is scarce here)
# Two epochs, validated (and so mirrored) after each: a training killed in epoch 2 resumes from epoch 1.
CONF = {
    "profile": "cpu",
    "max_epochs": 2,
    "cfg_options": {"train_cfg.val_interval": "1"},
    "relabel_strategy": "morphology",
    "quality_gate": 0.0,
    "promote": False,
}
HEARTBEAT_TIMEOUT_S = 40  # Airflow's default is 300 s
GPU_STAGES = {"relabel", "experiment.train"}
# approval: none (CONF's default): approval_request short-circuits and skips what follows it.
SKIPPED_WITHOUT_APPROVAL = {"approve", "approval_outcome", "promote"}
# A disturbed run has the undisturbed run's inputs: it must compute, not reuse the cross-run cache.
FAULT_CONF = {"recompute": ["all"]}
RUN_TIMEOUT_S = 1200
# A ClearML offline session's file name holds a random id: compared by its place, not its name.
SESSION_NAME = re.compile(r"/clearml/offline-[0-9a-f]+\.zip$")


@dataclass
class Run:
    """What a finished DAG run left: its task instances and every object under runs/<id>/."""

    run_id: str
    state: str
    task_instances: list[dict]
    objects: dict[str, bytes]  # relative key (session names normalised) -> content
    versions: dict[str, int]  # relative key -> how many times it was written

    def tis(self, task_id: str) -> list[dict]:
        return sorted(
            (ti for ti in self.task_instances if ti["task_id"] == task_id), key=lambda t: t["map_index"]
        )


@dataclass
class Topology:
    state: Any
    api: Any
    bucket: store.Store
    dataset: str  # s3:// uri of the tiny dataset

    def trigger(self, run_id: str, experiments: list[str], **conf: Any) -> None:
        self.api.trigger(run_id, {**CONF, "dataset": self.dataset, "experiments": experiments, **conf})

    def finish(self, run_id: str) -> Run:
        run = self.api.wait_for_run(run_id, RUN_TIMEOUT_S)
        prefix = f"{store.run_prefix(run_id)}/"
        objects, versions = {}, {}
        pages = self.bucket.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket.bucket, Prefix=prefix
        )
        written: dict[str, int] = {}
        for page in pages:
            for version in page.get("Versions", []):
                written[version["Key"]] = written.get(version["Key"], 0) + 1
        for key in self.bucket.list_keys(prefix):
            rel = SESSION_NAME.sub("/clearml/offline-ID.zip", key[len(prefix) :])
            objects[rel] = self.bucket.get_bytes(key)
            versions[rel] = written[key]
        return Run(run_id, run["state"], self.api.task_instances(run_id), objects, versions)

    def wait_for(self, what: str, check: Any, timeout_s: float = 600) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := check():
                return result
            time.sleep(1)
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}")

    def running_training(self, run_id: str) -> dict | None:
        """The run's training once it runs and has mirrored its first epoch."""
        for ti in self.api.task_instances(run_id):
            if ti["task_id"] == "experiment.train" and ti["state"] == "running":
                mirror = (
                    f"{store.stage_prefix(store.check_run_id(run_id), 'train', FAULT_EXPERIMENTS[0])}/work"
                )
                if self.bucket.exists(f"{mirror}/mirror.json"):
                    return ti
        return None


def ran(run: Run) -> list[dict]:
    """The run's task instances that ran (not those approval: none skipped: they have no try)."""
    return [ti for ti in run.task_instances if ti["task_id"] not in SKIPPED_WITHOUT_APPROVAL]


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def open_topology(name: str, dataset: Path, **settings: str) -> Iterator[Topology]:
    """A topology with these runner settings, the tiny dataset published to its bucket; stopped after."""
    # Under the checkout's .work/ (pytest's tmp dirs are private to root: the postgres user needs in).
    state_dir = ROOT / ".work" / f"{name}-{os.getpid()}"
    mp = pytest.MonkeyPatch()
    state = None
    try:
        for key, value in settings.items():  # scaleout.start hands them to every Airflow process
            mp.setenv(key, value)
        net = (100 if name == "scaleout-test" else 150) + os.getpid() % 50
        state = scaleout.start(state_dir, net=net, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        for key, value in scaleout.s3_env(state).items():
            mp.setenv(key, value)
        mp.setenv("SEGPIPE_WORK_DIR", str(state_dir / "test-client"))
        bucket = store.Store.from_env()
        # Every write keeps a version: a key written twice shows up (nothing published twice).
        versioning = {"Status": "Enabled"}
        bucket.client.put_bucket_versioning(Bucket=bucket.bucket, VersioningConfiguration=versioning)
        uri = scaleout.publish_dataset(state, dataset)
        api = scaleout.Api(state)
        api.wait_for_dag()
        yield Topology(state, api, bucket, uri)
    finally:
        mp.undo()
        if state is not None:
            scaleout.stop(state)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def topology(tiny_dataset: Path) -> Iterator[Topology]:
    with open_topology("scaleout-test", tiny_dataset, SEGPIPE_RUNNER="local") as topology:
        yield topology


@pytest.fixture(scope="module")
def undisturbed(topology: Topology) -> Run:
    started = time.monotonic()
    topology.trigger("undisturbed", EXPERIMENTS)
    run = topology.finish("undisturbed")
    print(f"undisturbed run ({len(EXPERIMENTS)} experiments): {time.monotonic() - started:.0f}s")
    return run


def assert_complete_and_published_once(run: Run, undisturbed: Run, experiments: list[str]) -> None:
    """Nothing lost, nothing published twice: the run has the undisturbed run's keys (for its
    experiments), each written as often, every published file matches its marker's sha256, and the
    deterministic stages' files are byte for byte the undisturbed run's."""
    states = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in run.task_instances}
    assert run.state == "success", states
    others = tuple(
        f"{stage}/{exp}/" for stage in ("train", "eval") for exp in EXPERIMENTS if exp not in experiments
    )
    expected = {rel: n for rel, n in undisturbed.versions.items() if not rel.startswith(others)}
    assert sorted(run.versions) == sorted(expected), "keys lost or added"
    # The manifest is updated once per stage (its cache outcome): its count follows the experiments.
    prefix = f"{store.run_prefix(run.run_id)}/"
    manifest = store.manifest_key(run.run_id).removeprefix(prefix)
    once_per_file = {rel: n for rel, n in run.versions.items() if rel != manifest}
    assert once_per_file == {rel: n for rel, n in expected.items() if rel != manifest}, (
        "a key was written more often than in the undisturbed run"
    )
    stages = json.loads(run.objects[manifest])["stages"]
    assert sorted(stages) == sorted(
        ["eda", "relabel"] + [f"{stage}/{exp}" for stage in ("train", "eval") for exp in experiments]
    )
    assert all(outcome["cache"] == "recomputed" for outcome in stages.values()), stages
    markers = [rel for rel in run.objects if rel.endswith(f"/{store.MARKER}")]
    assert len(markers) >= 2 + 2 * len(experiments)  # eda, relabel, train and eval of each experiment
    for marker_rel in markers:
        folder = marker_rel.rsplit("/", 1)[0]
        for rel, digest in json.loads(run.objects[marker_rel])["files"].items():
            key = SESSION_NAME.sub("/clearml/offline-ID.zip", f"/{folder}/{rel}")[1:]
            assert sha256(run.objects[key]) == digest, key
    # Stages whose outputs depend on the data alone: byte for byte (EDA's report but for its timings).
    same = [
        rel
        for rel in run.objects
        if rel.startswith(("relabel/labels_sam2/", "eda/")) and rel.endswith(".png")
    ]
    assert len(same) >= 3 + 8  # EDA's three plots, the relabeled train masks
    for rel in same:
        assert sha256(run.objects[rel]) == sha256(undisturbed.objects[rel]), rel
    report = "eda/report.json"
    assert json_without(run.objects[report], "seconds") == json_without(
        undisturbed.objects[report], "seconds"
    )


# ---------------------------------------------------------------- routing (no topology)


def test_celery_executor_routes_gpu_stages_to_the_gpu_queue_and_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGPIPE_RUNNER", "local")
    for executor, routed in (("CeleryExecutor", True), ("LocalExecutor", False)):
        monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", executor)
        settings = runners.Settings.from_env()
        train = runners.stage_operator(settings, "train", ["train"], image="unused", gpu=True)
        validate = runners.stage_operator(settings, "validate", ["validate"], image="unused")
        assert (train.queue, train.pool) == (("gpu", "gpu") if routed else ("default", "default_pool"))
        assert (validate.queue, validate.pool) == ("default", "default_pool")


# ---------------------------------------------------------------- the undisturbed run


@pytest.mark.slow
def test_gpu_stages_run_on_the_gpu_host_and_the_others_on_the_main_worker(
    topology: Topology, undisturbed: Run
) -> None:
    assert undisturbed.state == "success", [
        (t["task_id"], t["map_index"], t["state"]) for t in undisturbed.task_instances
    ]
    main_host = get_hostname()  # what Airflow records for a task run on this machine
    assert main_host != scaleout.GPU_HOSTNAME
    for ti in undisturbed.task_instances:
        if ti["task_id"] in SKIPPED_WITHOUT_APPROVAL:
            assert ti["state"] == "skipped", ti
            continue
        assert ti["state"] == "success", ti
        if ti["task_id"] == "experiments_done":
            continue  # an EmptyOperator: the scheduler marks it, no worker runs it
        where = (ti["hostname"], ti["queue"], ti["pool"])
        if ti["task_id"] in GPU_STAGES:
            assert where == (scaleout.GPU_HOSTNAME, "gpu", "gpu"), ti
        else:
            assert where == (main_host, "default", "default_pool"), ti
    assert [ti["rendered_map_index"] for ti in undisturbed.tis("experiment.train")] == EXPERIMENTS
    assert (
        store.Store.from_env().get_json(store.winner_key("undisturbed"))["winner"]["experiment"]
        in EXPERIMENTS
    )


@pytest.mark.slow
def test_the_gpu_pool_runs_at_most_two_of_four_trainings_at_once(
    topology: Topology, undisturbed: Run
) -> None:
    assert topology.api.get("/api/v2/pools/gpu")["slots"] == 2
    trainings = undisturbed.tis("experiment.train")
    assert len(trainings) == 4
    events = sorted(
        [(_when(ti["start_date"]), 1) for ti in trainings] + [(_when(ti["end_date"]), -1) for ti in trainings]
    )
    running, most = 0, 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    assert most == 2, (
        f"at most {most} trainings ran at once: {[(t['start_date'], t['end_date']) for t in trainings]}"
    )


@pytest.mark.slow
def test_the_gpu_hosts_task_log_is_read_from_the_store_through_the_api(
    topology: Topology, undisturbed: Run
) -> None:
    train = undisturbed.tis("experiment.train")[0]
    assert train["hostname"] == scaleout.GPU_HOSTNAME
    log = topology.api.log("undisturbed", "experiment.train", 1, map_index=0)
    remote = "s3://segmentation/airflow-logs/dag_id=segmentation_pipeline/run_id=undisturbed/task_id=experiment.train/map_index=0/attempt=1.log"
    assert remote in log  # the log's source, as the UI shows it
    assert "-m tasks train --experiment h1 --run-id undisturbed" in log  # the stage's own output follows
    assert topology.bucket.exists(remote.removeprefix("s3://segmentation/"))


# ---------------------------------------------------------------- faults


@pytest.mark.slow
def test_gpu_host_killed_during_training_retries_on_the_restarted_worker_and_resumes(
    topology: Topology, undisturbed: Run
) -> None:
    run_id = "gpu-host-killed"
    topology.trigger(run_id, FAULT_EXPERIMENTS, **FAULT_CONF)
    first = topology.wait_for(
        "the training to mirror its first epoch", lambda: topology.running_training(run_id)
    )
    killed = scaleout.kill_gpu_host(topology.state)  # the host loses its power: worker, task, stage
    assert killed
    scaleout.start_gpu_worker(topology.state)
    run = topology.finish(run_id)
    assert_complete_and_published_once(run, undisturbed, FAULT_EXPERIMENTS)
    (train,) = run.tis("experiment.train")
    assert train["try_number"] == 2, train
    tries = topology.api.tries(run_id, "experiment.train", 0)
    assert [(t["try_number"], t["state"], t["hostname"]) for t in tries] == [
        (1, "failed", scaleout.GPU_HOSTNAME),
        (2, "success", scaleout.GPU_HOSTNAME),
    ], tries
    assert first["try_number"] == 1
    # The retry resumed from the mirror of epoch 1 and trained epoch 2 only.
    log = topology.api.log(run_id, "experiment.train", 2, map_index=0)
    assert "downloaded the mirror of epoch 1" in log, log[-3000:]
    metrics = json.loads(run.objects["train/exp2/val_metrics.json"])
    assert metrics["epochs_trained"] == 2


@dataclass
class Restarted:
    run: Run
    redis_restarted_at: float  # epoch seconds
    scheduler_restarted_at: float
    scheduler_pids: tuple[int, int]


@pytest.fixture(scope="module")
def restarted(topology: Topology) -> Restarted:
    """One run, two faults at different phases: Redis restarted while the training runs (the broker
    of the running task and of every task queued after it), the scheduler while the evaluation runs."""
    run_id = "restarted"
    topology.trigger(run_id, FAULT_EXPERIMENTS, **FAULT_CONF)
    topology.wait_for("the training to run", lambda: topology.running_training(run_id))
    scaleout.restart_redis(topology.state)
    redis_at = time.time()

    def evaluating() -> bool:
        return any(
            ti["task_id"] == "experiment.evaluate" and ti["state"] == "running"
            for ti in topology.api.task_instances(run_id)
        )

    topology.wait_for("the evaluation to run", evaluating)
    old = topology.state.pids["scheduler"]
    scaleout.restart_scheduler(topology.state)
    scheduler_at = time.time()
    new = topology.state.pids["scheduler"]
    return Restarted(topology.finish(run_id), redis_at, scheduler_at, (old, new))


@pytest.mark.slow
def test_redis_restarted_mid_run_the_run_completes(restarted: Restarted, undisturbed: Run) -> None:
    run = restarted.run
    assert_complete_and_published_once(run, undisturbed, FAULT_EXPERIMENTS)
    assert all(ti["try_number"] == 1 for ti in ran(run)), run.task_instances
    # Tasks were queued through the restarted broker: the evaluation started after the restart.
    (evaluate,) = run.tis("experiment.evaluate")
    assert _when(evaluate["start_date"]).timestamp() > restarted.redis_restarted_at


@pytest.mark.slow
def test_scheduler_restarted_mid_run_the_run_completes(restarted: Restarted, undisturbed: Run) -> None:
    run = restarted.run
    assert_complete_and_published_once(run, undisturbed, FAULT_EXPERIMENTS)
    assert all(ti["try_number"] == 1 for ti in ran(run)), run.task_instances
    old, new = restarted.scheduler_pids
    assert old != new and not scaleout.psutil.pid_exists(old)
    # The new scheduler saw the running evaluation through and scheduled what followed it.
    (select,) = run.tis("select")
    assert _when(select["start_date"]).timestamp() > restarted.scheduler_restarted_at


@pytest.mark.slow
def test_stop_leaves_no_process_namespace_or_veth(topology: Topology) -> None:
    scaleout.stop(topology.state)
    assert scaleout.leftovers(topology.state) == []
