"""Experiments are files: the catalogue reads each configs/*.py's EXPERIMENT literal without running
the file, and a new file reaches the DAG's form, its plan, selection's ranking and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env
from test_selection import Run

from tasks import experiments
from tasks import store as st
from tasks.experiments import ExperimentFileError, read_experiment_file

CARD = dict(
    name="exp3",
    order=7,
    default=False,
    hypothesis="SegFormer-B2 at half Exp2's learning rate",
    model="SegFormer (SegformerHead), MixVisionTransformer-B2; AdamW lr 3e-05",
    augmentation="as Exp2",
    weighting="none",
)
NEW_FILE = f"""# A new experiment: Exp2 at half the learning rate (added by tests/test_experiments.py)
_base_ = ["./exp2_segformer_b2_256x256.py"]

optim_wrapper = dict(optimizer=dict(lr=3e-5))

EXPERIMENT = dict(
{"".join(f"    {key}={value!r},{chr(10)}" for key, value in CARD.items())})
"""


def _write(folder: Path, text: str, name: str = "x_model_256x256.py") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_the_repository_catalogue() -> None:
    catalogue = experiments.catalogue()
    assert tuple(catalogue)[:4] == ("h1", "h2", "exp1", "exp2")  # the study's order: its tie-break
    assert {"h1_focal", "exp2_tta"} <= set(catalogue)
    assert experiments.default_names() == ("h1", "h2", "exp1", "exp2")  # the study's run
    assert catalogue["h2"].description()["weighting"] == "CE class_weight [0.0585, 1.0, 1.0]"
    assert catalogue["exp2"].config_file.name == "exp2_segformer_b2_256x256.py"
    with pytest.raises(KeyError, match="unknown experiment 'h9': expected one of h1, h2, exp1, exp2"):
        experiments.get("h9")


def test_order_is_total_for_any_set_of_files(tmp_path: Path) -> None:
    for name, order in (("b", 2), ("a", 2), ("c", 1)):
        _write(
            tmp_path,
            NEW_FILE.replace("'exp3'", repr(name)).replace("order=7", f"order={order}"),
            f"{name}.py",
        )
    assert experiments.names(tmp_path) == ("c", "a", "b")  # by order, then by name


def test_metadata_is_read_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + NEW_FILE
    assert read_experiment_file(_write(tmp_path, text)).name == "exp3"
    assert not marker.exists()
    code = NEW_FILE.replace("order=7", f"order=__import__('pathlib').Path({str(marker)!r}).write_text('x')")
    with pytest.raises(ExperimentFileError, match="literal values only"):
        read_experiment_file(_write(tmp_path, code))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("EXPERIMENT = dict(", "NOT_IT = dict("), "expected one top-level `EXPERIMENT = dict("),
        (("    weighting='none',\n", ""), "missing 'weighting'"),
        (("order=7", "order='7'"), "order '7' must be an integer"),
        (("default=False", "default=0"), "default 0 must be True or False"),
        (("'exp3'", "'Exp 3'"), "name 'Exp 3' must match"),
        (("    weighting='none',\n", "    weighting='',\n    colour='red',\n"), "unknown field 'colour'"),
        (
            ("    weighting='none',\n", "    weighting='a\\nb',\n"),
            "weighting must be a non-empty one-line string",
        ),
        (("_base_ =", "_base_ = ("), "cannot read the experiment file"),
    ],
)
def test_bad_metadata_names_the_file_and_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = _write(tmp_path, NEW_FILE.replace(*change))
    with pytest.raises(ExperimentFileError, match="x_model_256x256.py") as caught:
        read_experiment_file(path)
    assert message in str(caught.value)


def test_two_files_with_one_name_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, NEW_FILE, "a.py")
    _write(tmp_path, NEW_FILE, "b.py")
    with pytest.raises(ExperimentFileError, match="experiment name 'exp3' is also used by .*a.py"):
        experiments.catalogue(tmp_path)


DAG_PROBE = """
import importlib.util, json, sys
sys.path.insert(0, "dags")  # as Airflow does
spec = importlib.util.spec_from_file_location("dag", "dags/segmentation_pipeline.py")
dag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dag)
param = dag.PARAMS["experiments"]
params = {key: value.value for key, value in dag.PARAMS.items()}
default = list(param.value)
params["experiments"] = param.resolve(["exp3", "h1"])  # the form's own validation
plan = dag.runners.build_plan(params, "manual__2026-12-01T10:00:00+00:00")
print(json.dumps({
    "enum": param.schema["items"]["enum"], "default": default, "description": param.description,
    "plan": [spec["train"] for spec in plan["experiments"]], "select": plan["select"],
    "torch_loaded": "torch" in sys.modules,
}))
"""


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the copy's tasks/ (not the installed one), as a worker or image of that commit has it
    env = subprocess_env(PYTHONPATH=str(repo), SEGPIPE_RUNNER="local")
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def test_a_new_experiment_file_reaches_form_plan_ranking_and_report(s3_env: dict, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for folder in ("tasks", "dags", "configs"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "configs" / "exp3_segformer_b2_256x256.py").write_text(NEW_FILE)

    # the params form (enum, description), the plan: parsed as the scheduler parses it, without torch
    probe = _run(repo, sys.executable, "-c", DAG_PROBE)
    assert probe.returncode == 0, probe.stderr[-3000:]
    dag = json.loads(probe.stdout.strip().splitlines()[-1])
    assert dag["enum"][-1] == "exp3" and "exp3" not in dag["default"]  # default=False: opt-in
    assert f"exp3: {CARD['hypothesis']}" in dag["description"]
    assert [train[2] for train in dag["plan"]] == ["exp3", "h1"]
    assert dag["select"][dag["select"].index("--experiments") + 1] == "exp3,h1"
    assert dag["torch_loaded"] is False

    # train resolves the new file (mmengine, with its _base_) and the stage's CLI offers it
    check = (
        "from tasks.train import load_experiment_config as load; print(load('exp3').optim_wrapper.optimizer)"
    )
    resolved = _run(repo, sys.executable, "-c", check)
    assert resolved.returncode == 0 and "'lr': 3e-05" in resolved.stdout, resolved.stderr[-2000:]
    assert "exp3" in _run(repo, sys.executable, "-m", "tasks", "train", "--help").stdout

    # selection ranks it (a full tie with h1: the fixed order puts h1, order 1, first) and reports it
    store = st.Store.from_env()
    run = Run(store, "run-x", tmp_path / "outputs", defaultdict(lambda: "# config\n"))
    run.experiment("exp3", val_mdice=90.0, val_miou=82.0, test_mdice=88.0)
    run.experiment("h1", val_mdice=90.0, val_miou=82.0, test_mdice=85.0)
    run.experiment("exp2", val_mdice=80.0, val_miou=70.0, test_mdice=80.0)
    selected = _run(
        repo,
        sys.executable,
        "-m",
        "tasks",
        "select",
        "--run-id",
        "run-x",
        "--experiments",
        "exp3,exp2,h1",
        "--no-promote",
    )
    assert selected.returncode == 0, selected.stderr[-3000:]
    ranking = [row["experiment"] for row in run.winner()["ranking"]]
    assert ranking == ["h1", "exp3", "exp2"]
    assert run.winner()["rule"].endswith("h1, h2, exp1, exp2, h1_focal, exp2_tta, exp3")
    row = next(line for line in run.report().splitlines() if line.startswith("| exp3 |"))
    assert f"| {CARD['hypothesis']} | {CARD['model']} | as Exp2 | none |" in row and row.endswith("| 2 |")
    # the repository itself does not know exp3
    assert "exp3" not in experiments.names()
