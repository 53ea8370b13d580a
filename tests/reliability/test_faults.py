"""Faults injected for real: a training SIGKILLed mid-run, the S3 server stopped and restarted while a
stage uploads, the pipeline re-run with the same run id, two trainings at once, ClearML unreachable."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tasks.store import MARKER, Store, stage_prefix

from .support import (
    CLEARML_DOWN_EXPERIMENT,
    PIPELINE_EXPERIMENTS,
    PipelineRun,
    StageProcess,
    bucket_objects,
    json_without,
    offline_env,
    sha256_bytes,
)

RUN_ID = "faults"
EXPERIMENT = "exp2"
TRAIN = ["train", "--experiment", EXPERIMENT, "--run-id", RUN_ID, "--profile", "cpu", "--max-epochs", "2"]
EPOCH_LINE = r"Epoch\(train\)\s*\[{}\]"


@dataclass
class Interrupted:
    """One training killed after epoch 1, then its retry, whose upload hits a stopped S3 server."""

    mirror_after_kill: dict
    marker_after_kill: dict | None
    killed_output: str
    retry_output: str
    retry_code: int
    keys: list[str]  # under the train prefix, after the retry
    marker: dict | None
    outputs: Path | None  # the published outputs, fetched (sha256-verified)


@pytest.fixture(scope="module")
def interrupted(
    s3_server: Any, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Interrupted]:
    base = tmp_path_factory.mktemp("interrupted")
    server = type(s3_server)(base / "moto.log")  # private: stopping it touches no other test's bucket
    server.start()
    bucket = "faults"
    env = {**offline_env(base / "home"), **server.env(bucket)}
    command = [*TRAIN, "--dataset", str(tiny_dataset)]
    prefix = stage_prefix(RUN_ID, "train", EXPERIMENT)
    processes: list[StageProcess] = []
    try:
        server.create_bucket(bucket)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            store = Store.from_env()

            # 1. SIGKILL right after epoch 1 was validated and mirrored to the store.
            killed = StageProcess(command, env)
            processes.append(killed)
            killed.wait_for(r"mirrored epoch 1 ")
            killed.signal(signal.SIGKILL)
            killed.finish()
            mirror = store.get_json(f"{prefix}/work/mirror.json")
            marker_after_kill = store.marker(prefix)

            # 2. The retry. Once it resumed (epoch 2 trains without touching S3), the server stops.
            retry = StageProcess(command, env)
            processes.append(retry)
            retry.wait_for(r"resumed epoch: 1")
            retry.signal(signal.SIGSTOP)  # hold it while the bucket is saved and the server stopped
            saved = bucket_objects(store)
            server.stop()
            retry.signal(signal.SIGCONT)
            # Epoch 2's mirror upload meets the closed port; the store logs its first retry.
            retry.wait_for(r"failed \(.*\); retry 1/")
            retry.signal(signal.SIGSTOP)
            server.start()  # same port, within the store's retry window
            # moto keeps objects in memory: put back what a durable server (MinIO) would still hold.
            server.create_bucket(bucket)
            for key, data in saved.items():
                store.put_bytes(key, data)
            retry.signal(signal.SIGCONT)
            code = retry.finish()
            marker = store.marker(prefix)
            outputs = store.fetch(prefix, base / "fetched") if marker else None
            yield Interrupted(
                mirror_after_kill=mirror,
                marker_after_kill=marker_after_kill,
                killed_output=killed.output,
                retry_output=retry.output,
                retry_code=code,
                keys=store.list_keys(prefix),
                marker=marker,
                outputs=outputs,
            )
    finally:
        for process in processes:
            process.stop()
        server.stop()


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(interrupted: Interrupted) -> None:
    # The kill left a mirror of epoch 1 and no published outputs.
    assert interrupted.marker_after_kill is None
    assert interrupted.mirror_after_kill["epoch"] == 1
    assert interrupted.mirror_after_kill["checkpoint"] == "epoch_1.pth"
    assert not re.search(EPOCH_LINE.format(2), interrupted.killed_output)
    out = interrupted.retry_output
    assert interrupted.retry_code == 0, out[-4000:]
    # The retry downloaded the mirror, resumed after epoch 1 and trained epoch 2 only.
    assert "downloaded the mirror of epoch 1" in out
    assert "resumed epoch: 1" in out
    assert not re.search(EPOCH_LINE.format(1), out), "the retry trained epoch 1 again"
    assert re.search(EPOCH_LINE.format(2), out)
    metrics = json.loads((interrupted.outputs / "val_metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["experiment"] == EXPERIMENT


@pytest.mark.slow
def test_s3_restart_during_upload_is_retried_and_outputs_are_complete(interrupted: Interrupted) -> None:
    out = interrupted.retry_output
    assert interrupted.retry_code == 0, out[-4000:]
    prefix = stage_prefix(RUN_ID, "train", EXPERIMENT)
    retries = [line for line in out.splitlines() if re.search(r"failed \(.*\); retry \d+/", line)]
    assert retries and all(prefix in line for line in retries), retries
    # Published, every listed file present with its sha256 (fetch verifies), nothing else left over
    # (no half-written file, no resume mirror).
    marker = interrupted.marker
    assert marker is not None
    assert sorted(interrupted.keys) == sorted(
        [f"{prefix}/{rel}" for rel in marker["files"]] + [f"{prefix}/{MARKER}"]
    )
    assert {"best.pth", "config.py", "log.json", "val_metrics.json"} <= set(marker["files"])
    for rel, digest in marker["files"].items():
        assert sha256_bytes((interrupted.outputs / rel).read_bytes()) == digest
    metrics = json.loads((interrupted.outputs / "val_metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and metrics["best_epoch"] in (1, 2)


# ---------------------------------------------------------------- the pipeline run twice

# Re-decided on every run (select is not cached by design): same keys, content equal but for times.
REDECIDED = {
    "manifest.json": ("started_at", "updated_at", "ended_at", "decided_at"),
    "winner.json": ("decided_at",),
}
PUBLISHED = re.compile(r"tasks\.store INFO (published \d+ files|removing \d+ stale keys)")
CACHED_LINE = {
    "validate": r"already in s3://\S+ \(cached\)",
    "eda": r"\(cached\)",
    "relabel": r"\(cached\)",
    **{f"train/{exp}": rf"cached: s3://\S+/train/{exp} already published" for exp in PIPELINE_EXPERIMENTS},
}


@pytest.mark.slow
def test_rerun_with_the_same_run_id_is_idempotent(pipeline: PipelineRun) -> None:
    first, second = pipeline.state["first"], pipeline.state["second"]
    assert sorted(second) == sorted(first), "the re-run added or lost keys"
    run = f"runs/{pipeline.run_id}/"
    changed = sorted(key for key in first if first[key] != second[key])
    redecided = {f"{run}{name}" for name in REDECIDED} | {f"{run}report.md"}
    assert set(changed) <= redecided, f"re-run rewrote {changed}"
    for name, times in REDECIDED.items():
        assert json_without(pipeline.objects[f"{run}{name}"], *times)["run_id"] == pipeline.run_id
    # Every cached stage said so and published nothing; select kept its own champion.
    logs = pipeline.logs["second"]
    for task, pattern in CACHED_LINE.items():
        assert re.search(pattern, logs[task]), f"{task} did not report its cache:\n{logs[task][-3000:]}"
    for exp in PIPELINE_EXPERIMENTS:
        assert re.search(rf"cached: s3://\S+/eval/{exp} already published", logs["evaluate"])

    def published(logs: dict[str, str]) -> list[str]:
        return [line for log in logs.values() for line in log.splitlines() if PUBLISHED.search(line)]

    assert published(pipeline.logs["first"]), "the first run's logs do not show its publishes"
    assert published(logs) == [], "a cached stage published again"
    winner = json.loads(pipeline.objects[f"{run}winner.json"])
    assert winner["promotion"]["reason"] == "the winner already is the production champion"
    production = sorted(key for key in second if key.startswith("models/production/"))
    assert production and all(first[key] == second[key] for key in production)


@pytest.mark.slow
def test_parallel_trainings_of_one_run_do_not_clobber_each_other(pipeline: PipelineRun) -> None:
    (start_a, end_a), (start_b, end_b) = (pipeline.train_times[exp] for exp in PIPELINE_EXPERIMENTS)
    assert max(start_a, start_b) < min(end_a, end_b), "the two trainings did not overlap"
    keys = pipeline.state["first"]
    for exp in PIPELINE_EXPERIMENTS:
        prefix = stage_prefix(pipeline.run_id, "train", exp)
        marker = json.loads(pipeline.objects[f"{prefix}/{MARKER}"])
        assert marker["inputs"]["experiment"] == exp
        listed = {f"{prefix}/{rel}" for rel in marker["files"]}
        assert {key for key in keys if key.startswith(f"{prefix}/")} == listed | {f"{prefix}/{MARKER}"}
        for rel, digest in marker["files"].items():
            assert sha256_bytes(pipeline.objects[f"{prefix}/{rel}"]) == digest, f"{prefix}/{rel}"
        metrics = json.loads(pipeline.objects[f"{prefix}/val_metrics.json"])
        assert metrics["experiment"] == exp
        backbone = "MixVisionTransformer" if exp == "exp2" else "ResNetV1c"
        assert f"type='{backbone}'" in pipeline.objects[f"{prefix}/config.py"].decode()
        evaluated = pipeline.objects[f"{stage_prefix(pipeline.run_id, 'eval', exp)}/test_metrics.json"]
        assert json.loads(evaluated)["experiment"] == exp


@pytest.mark.slow
def test_unreachable_clearml_does_not_stop_training_and_is_reported_once(pipeline: PipelineRun) -> None:
    log = pipeline.logs["first"][f"train/{CLEARML_DOWN_EXPERIMENT}"]
    warnings = [line for line in log.splitlines() if "tasks.tracking WARNING" in line]
    assert len(warnings) == 1 and "ClearML unavailable" in warnings[0], warnings
    assert "the stage goes on without tracking" in warnings[0]
    port = urlsplit(pipeline.stage_env["CLEARML_API_HOST"]).port
    about_server = [line for line in log.splitlines() if f"port={port}" in line]
    assert about_server == warnings, "the unreachable server is reported more than once"
    prefix = stage_prefix(pipeline.run_id, "train", CLEARML_DOWN_EXPERIMENT)
    marker = json.loads(pipeline.objects[f"{prefix}/{MARKER}"])
    assert {"best.pth", "val_metrics.json"} <= set(marker["files"])
    assert not any(rel.startswith("clearml/") for rel in marker["files"])  # tracking was off, said once
    # The other training of the same run tracked offline and published its session.
    other = stage_prefix(
        pipeline.run_id, "train", next(e for e in PIPELINE_EXPERIMENTS if e != CLEARML_DOWN_EXPERIMENT)
    )
    assert any(
        rel.startswith("clearml/") for rel in json.loads(pipeline.objects[f"{other}/{MARKER}"])["files"]
    )
