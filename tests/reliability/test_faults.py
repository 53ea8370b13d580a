"""Faults injected for real: the S3 server stopped and restarted while a stage uploads, the pipeline
re-run with the same run id, two trainings at once, ClearML unreachable. A training SIGKILLed mid-run
and resumed: tests/test_train.py::test_killed_training_resumes_at_the_next_epoch."""

from __future__ import annotations

import json
import re
import signal
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
RETRY_LINE = r"failed \(.*\); retry \d+/"  # tasks.store's warning before it retries an operation


@pytest.mark.slow
def test_s3_restart_during_upload_is_retried_and_outputs_are_complete(
    s3_server: Any, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The S3 server stops while a training runs and is down when the stage uploads; it comes back
    on the same port within the store's retry window and the stage finishes by itself."""
    server = type(s3_server)(tmp_path / "moto.log")  # private: stopping it touches no other bucket
    server.start()
    env = {**offline_env(tmp_path / "home"), **server.env("faults")}
    prefix = stage_prefix(RUN_ID, "train", EXPERIMENT)
    command = ["train", "--experiment", EXPERIMENT, "--run-id", RUN_ID, "--dataset", str(tiny_dataset)]
    training = None
    try:
        server.create_bucket("faults")
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            store = Store.from_env()
            # Validation (and so the mirror) every epoch, whatever the CPU profile's own interval.
            options = ["--cfg-options", "train_cfg.val_interval=1"]
            training = StageProcess([*command, "--profile", "cpu", "--max-epochs", "2", *options], env)
            # Epoch 1 is mirrored; epoch 2 trains without touching S3: the server goes down meanwhile.
            training.wait_for(r"mirrored epoch 1 ")
            training.signal(signal.SIGSTOP)  # held while the bucket is saved and the server stopped
            saved = bucket_objects(store)
            server.stop()
            training.signal(signal.SIGCONT)
            training.wait_for(RETRY_LINE)  # epoch 2's upload met the closed port
            training.signal(signal.SIGSTOP)
            server.start()  # same port
            # moto keeps objects in memory: put back what a durable server (MinIO) still holds.
            server.create_bucket("faults")
            for key, data in saved.items():
                store.put_bytes(key, data)
            training.signal(signal.SIGCONT)
            code = training.finish()
            out = training.output
            assert code == 0, out[-4000:]
            retries = [line for line in out.splitlines() if re.search(RETRY_LINE, line)]
            assert retries and all(prefix in line for line in retries), retries
            # Published; every file it lists is there with its sha256 (fetch verifies each one); no
            # other key is left under the prefix (no half-written file, no resume mirror).
            marker = store.marker(prefix)
            assert marker is not None
            listed = [f"{prefix}/{rel}" for rel in marker["files"]]
            assert sorted(store.list_keys(prefix)) == sorted([*listed, f"{prefix}/{MARKER}"])
            assert {"best.pth", "config.py", "log.json", "val_metrics.json"} <= set(marker["files"])
            outputs = store.fetch(prefix, tmp_path / "fetched")
            metrics = json.loads((outputs / "val_metrics.json").read_text())
            assert metrics["epochs_trained"] == 2 and metrics["best_epoch"] in (1, 2)
    finally:
        if training is not None:
            training.stop()
        server.stop()


# ---------------------------------------------------------------- the pipeline run twice

# select decides again on every run (it is not cached): the same keys, the same content but for its
# times and its decision (the first run promotes; the re-run finds that model already in production).
REDECIDED = {
    "manifest.json": ("started_at", "updated_at", "ended_at", "decision"),
    "winner.json": ("decided_at", "promotion"),
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
    for name, volatile in REDECIDED.items():
        before, after = (pipeline.documents[run_pass][f"{run}{name}"] for run_pass in ("first", "second"))
        assert json_without(before, *volatile) == json_without(after, *volatile), name
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
    promotions = [
        json.loads(pipeline.documents[p][f"{run}winner.json"])["promotion"] for p in ("first", "second")
    ]
    assert [promotion["decision"] for promotion in promotions] == ["promoted", "champion kept"]
    assert promotions[1]["reason"] == "the winner already is the production champion"
    production = sorted(key for key in second if key.startswith("models/"))
    assert production and all(first[key] == second[key] for key in production)
    assert "models/production.json" in production


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
        config = pipeline.objects[f"{prefix}/config.py"].decode()
        assert f"type='{backbone}'" in config
        assert "cfg_options = dict({'train_cfg.val_interval': 1})" in config  # the DAG's param got there
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
