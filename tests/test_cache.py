"""The cross-run cache (tasks/stage.py): what reuses, what recomputes, what is never reused.

Runs of the real stages (`python -m tasks ...` processes, as the DAG runs them) on one bucket of the
real S3 server, each with a new run id, on the tiny dataset with a one-epoch CPU training of h1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability.support import offline_env

from tasks.stage import code_files, code_version, marker_digest
from tasks.store import Store, cache_entry_key, manifest_key, stage_prefix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))
import segpipe_runners as runners  # noqa: E402

STAGES = ("eda", "relabel", "train/h1", "eval/h1")
TRAIN = ("--profile", "cpu", "--max-epochs", "1")
# What only computing may import: a cache hit must not pay seconds of imports for them
HEAVY_MODULES = {"torch", "mmseg", "mmcv", "mmengine.runner", "mmengine.hooks", "ultralytics", "sam2"}


def split_import_trace(stderr: str) -> tuple[set[str], str]:
    """A `python -X importtime` process's stderr: the modules it imported (one `import time: ... |
    name` line each) and the rest of its stderr."""
    modules, rest = set(), []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rpartition("|")[2].strip())
        else:
            rest.append(line)
    return modules, "\n".join(rest)


class Bucket:
    """One bucket, the environment of the stage processes, and the runs made so far."""

    def __init__(self, env: dict[str, str], work: Path):
        self.env, self.work = env, work
        self.store: Store | None = None
        self.imports: dict[str, dict[str, set[str]]] = {}  # run id -> step -> modules it imported

    def stage(
        self, *argv: str, code: Path = ROOT, check: bool = True, trace_imports: str | None = None
    ) -> subprocess.CompletedProcess:
        """One stage process; trace_imports=RUN_ID records the modules it imports (-X importtime)."""
        env = {**self.env, "PYTHONPATH": str(code)}
        flags = ("-X", "importtime") if trace_imports else ()
        result = subprocess.run(
            [sys.executable, *flags, "-m", "tasks", *argv],
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if trace_imports:
            modules, result.stderr = split_import_trace(result.stderr)
            self.imports.setdefault(trace_imports, {})[argv[0]] = modules
        if check:
            assert result.returncode == 0, f"{argv}:\n{result.stderr[-4000:]}"
        return result

    def pipeline(
        self,
        run_id: str,
        dataset: Path,
        *cfg_options: str,
        code: Path = ROOT,
        select: bool = False,
        trace_imports: bool = False,
    ) -> dict:
        """validate .. evaluate (and select) of one run; the manifest's record of each stage.
        trace_imports: record what each stage process imports (self.imports[run_id])."""
        common = ("--run-id", run_id, "--dataset", str(dataset))
        how = {"code": code, "trace_imports": run_id if trace_imports else None}
        self.stage("validate", str(dataset), "--run-id", run_id, **how)
        self.stage("eda", *common, **how)
        self.stage("relabel", *common, "--strategy", "morphology", **how)
        options = ("--cfg-options", *cfg_options) if cfg_options else ()
        self.stage("train", "--experiment", "h1", *common, *TRAIN, *options, **how)
        self.stage("evaluate", "--experiment", "h1", *common, "--panels", "1", **how)
        if select:
            self.stage("select", "--run-id", run_id, "--experiments", "h1", "--gate", "0", **how)
        return self.store.get_json(manifest_key(run_id))["stages"]


def _outcomes(stages: dict) -> dict[str, str]:
    return {name: stages[name]["cache"] for name in STAGES}


def _objects(store: Store, prefix: str) -> dict[str, str]:
    return {
        key: store.client.head_object(Bucket=store.bucket, Key=key)["ETag"] for key in store.list_keys(prefix)
    }


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Bucket:
    home = tmp_path_factory.mktemp("cache-home")
    name = f"cache-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    env = {
        **os.environ,
        **s3_server.env(name),
        **offline_env(home),
    }
    made = Bucket(env, home)
    saved = dict(os.environ)
    os.environ.update(s3_server.env(name))  # Store.from_env reads the environment once
    made.store = Store.from_env()
    os.environ.clear()
    os.environ.update(saved)
    return made


@pytest.fixture(scope="module")
def runs(bucket: Bucket, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first run and a second one with a new run id and unchanged inputs."""
    store = bucket.store
    first = bucket.pipeline("first", tiny_dataset, select=True, trace_imports=True)
    models_before = _objects(store, "models")
    second = bucket.pipeline("second", tiny_dataset, select=True, trace_imports=True)
    return {"first": first, "second": second, "models": (models_before, _objects(store, "models"))}


@pytest.mark.slow
def test_a_second_run_with_unchanged_inputs_reuses_every_stage_and_uploads_no_model(
    bucket: Bucket, runs: dict
) -> None:
    store = bucket.store
    assert set(_outcomes(runs["first"]).values()) == {"miss"}
    assert _outcomes(runs["second"]) == dict.fromkeys(STAGES, "hit")
    assert all(runs["second"][name]["run_id"] == "first" for name in STAGES)
    before, after = runs["models"]
    assert before and before == after, "the second run uploaded or rewrote a model"
    winner = store.get_json("runs/second/winner.json")
    assert winner["promotion"]["decision"] == "champion kept"
    # the layout a person browses: the second run's prefixes hold the same files, sha256-checked
    for stage, exp in (("eda", None), ("relabel", None), ("train", "h1"), ("eval", "h1")):
        ours, theirs = (store.marker(stage_prefix(run, stage, exp)) for run in ("second", "first"))
        assert ours["cache"]["run_id"] == "first"
        same = {rel for rel in theirs["files"] if not rel.endswith("_metrics.json")}
        assert {rel: ours["files"][rel] for rel in same} == {rel: theirs["files"][rel] for rel in same}
        for rel, digest in ours["files"].items():
            data = store.get_bytes(f"{stage_prefix('second', stage, exp)}/{rel}")
            assert hashlib.sha256(data).hexdigest() == digest
    # evaluate's metrics name the second run's own checkpoint (select checked it and ranked h1)
    metrics = store.get_json(f"{stage_prefix('second', 'eval', 'h1')}/test_metrics.json")
    assert metrics["run_id"] == "second"
    assert metrics["checkpoint"] == f"{stage_prefix('second', 'train', 'h1')}/best.pth"


@pytest.mark.slow
def test_a_cache_hit_imports_neither_torch_nor_mmseg(bucket: Bucket, runs: dict) -> None:
    first, second = bucket.imports["first"], bucket.imports["second"]
    # what the trace sees: the first run's train and evaluate computed, so they imported the stack
    assert {"torch", "mmseg", "mmengine.runner"} <= first["train"] & first["evaluate"]
    # every stage of the second run hit the cache, and decided and copied without them
    assert _outcomes(runs["second"]) == dict.fromkeys(STAGES, "hit")
    for step in ("eda", "relabel", "train", "evaluate", "select"):
        assert not HEAVY_MODULES & second[step], f"a cache-hit {step} imported {HEAVY_MODULES & second[step]}"


@pytest.mark.slow
def test_one_config_value_recomputes_train_and_evaluate_only(
    bucket: Bucket, runs: dict, tiny_dataset: Path
) -> None:
    stages = bucket.pipeline("lr", tiny_dataset, "optim_wrapper.optimizer.lr=0.02")
    assert _outcomes(stages) == {"eda": "hit", "relabel": "hit", "train/h1": "miss", "eval/h1": "miss"}


@pytest.mark.slow
def test_the_code_of_one_stage_recomputes_that_stage_only(
    bucket: Bucket, runs: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    code = tmp_path / "code"
    for folder in ("tasks", "configs"):
        shutil.copytree(ROOT / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(code / "tasks" / "relabel.py", "a") as source:
        source.write("\n# a change to relabel's code\n")
    stages = bucket.pipeline("code", tiny_dataset, code=code)
    # relabel ran again; its masks came out the same, so the training (keyed on them) was reused
    assert _outcomes(stages) == {"eda": "hit", "relabel": "miss", "train/h1": "hit", "eval/h1": "hit"}


@pytest.mark.slow
def test_one_train_mask_recomputes_every_stage_that_reads_the_data(
    bucket: Bucket, runs: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "synth"
    shutil.copytree(tiny_dataset, dataset)
    mask_path = sorted((dataset / "labels" / "train").glob("*.png"))[0]
    mask = np.array(Image.open(mask_path))
    mask[:8, :8] = 1
    Image.fromarray(mask).save(mask_path)
    stages = bucket.pipeline("mask", dataset)
    assert _outcomes(stages) == dict.fromkeys(STAGES, "miss")


@pytest.mark.slow
def test_a_cached_output_deleted_or_corrupted_is_recomputed_never_reused(
    bucket: Bucket, runs: dict, tiny_dataset: Path
) -> None:
    store = bucket.store
    eda_first = stage_prefix("first", "eda")
    store.delete_keys([f"{eda_first}/report.json"])
    # rewritten bytes under the old sha256 metadata: only the server's own checksum of the copy can tell
    confusion = f"{stage_prefix('first', 'eval', 'h1')}/confusion.png"
    recorded = store.client.head_object(Bucket=store.bucket, Key=confusion)["Metadata"]
    store.client.put_object(Bucket=store.bucket, Key=confusion, Body=b"not a png", Metadata=recorded)
    stages = bucket.pipeline("damaged", tiny_dataset)
    assert _outcomes(stages) == {"eda": "miss", "relabel": "hit", "train/h1": "hit", "eval/h1": "miss"}
    for stage, exp in (("eda", None), ("eval", "h1")):
        marker = store.marker(stage_prefix("damaged", stage, exp))
        assert "cache" not in marker  # computed here, not copied
        entry = store.get_json(
            cache_entry_key(stage, stages[stage if exp is None else f"{stage}/{exp}"]["key"])
        )
        assert entry["run_id"] == "damaged"  # the entry now names a valid output
    png = store.get_bytes(f"{stage_prefix('damaged', 'eval', 'h1')}/confusion.png")
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_two_runs_racing_to_fill_one_entry_leave_one_valid_entry(bucket: Bucket, tiny_dataset: Path) -> None:
    store = bucket.store
    racers = ("race-a", "race-b")
    for run_id in racers:
        bucket.stage("validate", str(tiny_dataset), "--run-id", run_id)
    argv = ("--dataset", str(tiny_dataset), "--tiny-area", "50")  # a key no run filled yet
    env = {**bucket.env, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tasks", "eda", "--run-id", run_id, *argv],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id in racers
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    keys = {store.get_json(manifest_key(run_id))["stages"]["eda"]["key"] for run_id in racers}
    assert len(keys) == 1
    (key,) = keys
    entry = store.get_json(cache_entry_key("eda", key))
    assert entry["run_id"] in racers
    source = store.marker(entry["prefix"])  # the entry's output is whole: its marker is the recorded one
    assert source is not None and marker_digest(source) == entry["marker_sha256"]
    # the entry is valid: a third run reuses it
    bucket.stage("validate", str(tiny_dataset), "--run-id", "race-c")
    bucket.stage("eda", "--run-id", "race-c", *argv)
    third = store.get_json(manifest_key("race-c"))["stages"]["eda"]
    assert (third["cache"], third["run_id"]) == ("hit", entry["run_id"])


@pytest.mark.slow
def test_recompute_computes_again_and_says_so(bucket: Bucket, runs: dict, tiny_dataset: Path) -> None:
    bucket.stage("validate", str(tiny_dataset), "--run-id", "again")
    result = bucket.stage("eda", "--run-id", "again", "--dataset", str(tiny_dataset), "--recompute")
    assert "recompute requested" in result.stderr
    assert bucket.store.get_json(manifest_key("again"))["stages"]["eda"]["cache"] == "recomputed"


def test_code_version_covers_the_stage_and_the_modules_it_imports() -> None:
    names = {path.stem for path in code_files("tasks.evaluate")}
    assert {"evaluate", "train", "store", "stage", "mmseg_setup"} <= names
    assert "relabel" not in names and "selection" not in names
    assert {path.stem for path in code_files("tasks.eda")} >= {"eda", "masks", "dataset"}
    assert code_version("tasks.eda") != code_version("tasks.relabel")


def test_the_recompute_param_adds_the_flag_to_the_chosen_stages() -> None:
    params = {
        "dataset": "s3://segmentation/datasets/pets/latest",
        "experiments": ["h1"],
        "profile": "cpu",
        "max_epochs": None,
        "cfg_options": {"train_cfg.val_interval": "1"},
        "relabel_strategy": "auto",
        "bad_masks": None,
        "quality_gate": 0.75,
        "promote": True,
        "approval": "none",
    }

    def flagged(recompute: list[str]) -> set[str]:
        plan = runners.build_plan({**params, "recompute": recompute}, "manual__x")
        commands = {"eda": plan["eda"], "relabel": plan["relabel"], **plan["experiments"][0]}
        return {name for name, argv in commands.items() if isinstance(argv, list) and "--recompute" in argv}

    assert flagged([]) == set()
    assert flagged(["train"]) == {"train"}
    assert flagged(["all"]) == {"eda", "relabel", "train", "evaluate"}
    train = runners.build_plan({**params, "recompute": ["train"]}, "manual__x")["experiments"][0]["train"]
    assert train.index("--recompute") < train.index("--cfg-options")  # --cfg-options takes the rest
