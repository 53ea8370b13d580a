"""Bad inputs: each stage refuses them with exit 2 and an error naming the file or value, and the store
is left exactly as it was (same keys, same ETags). Per-defect validator messages: tests/test_dataset.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog.testing
import torch
from conftest import subprocess_env
from PIL import Image
from test_dag import parse_dag, plan_xcoms, render, run_params, runners

from tasks import cli
from tasks.dataset import list_pairs
from tasks.store import Store, dataset_prefix, stage_prefix

from .support import bucket_state

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """`python -m tasks ARGV` in this process: exit code and its `error:` lines."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error: ")]


def named(errors: list[str], *words: str) -> bool:
    return any(all(word in line for word in words) for line in errors)


def train_args(dataset: str, *extra: str) -> list[str]:
    return ["train", "--experiment", "exp2", "--run-id", "r1", "--dataset", dataset, *extra]


def test_bad_dataset_is_refused_by_every_stage_and_nothing_is_published_or_lost(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run that already published something: its dataset, manifest and EDA must survive.
    assert run(capsys, "validate", str(tiny_dataset), "--run-id", "r1")[0] == 0
    assert run(capsys, "eda", "--run-id", "r1", "--dataset", str(tiny_dataset))[0] == 0
    store = Store.from_env()
    before = bucket_state(store)
    assert any(key.endswith("eda/_SUCCESS") for key in before)

    bad = Path(shutil.copytree(tiny_dataset, tmp_path / "bad"))
    image, _ = list_pairs(bad, "train")[0]
    image.write_bytes(b"not an image")
    _, val_mask = list_pairs(bad, "val")[0]
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(val_mask)
    test_image, test_mask = list_pairs(bad, "test")[0]
    test_mask.unlink()
    defects = [
        (f"images/train/{image.name}", "corrupt"),
        (f"labels/val/{val_mask.name}", "label values 7"),
        (f"images/test/{test_image.name}", "image without mask"),
    ]
    # The stages run under r2, whose validate failed: nothing is pinned, so each reads the bad dataset
    # itself (under r1 they refuse any dataset but the one r1 validated: test_dataset_inputs.py).
    for argv in (
        ["validate", str(bad), "--run-id", "r1"],
        ["validate", str(bad), "--run-id", "r2"],
        ["eda", "--run-id", "r2", "--dataset", str(bad)],
        ["relabel", "--run-id", "r2", "--dataset", str(bad), "--strategy", "morphology"],
        ["train", "--experiment", "exp2", "--run-id", "r2", "--dataset", str(bad), "--profile", "cpu"],
    ):
        code, errors = run(capsys, *argv)
        assert code == 2, (argv, errors)
        for rel, words in defects:
            assert named(errors, rel, words), (argv[0], rel, errors)
        assert bucket_state(store) == before, f"{argv[0]} changed the store"


def test_bad_mask_lists_are_refused_and_the_published_relabel_stays(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relabel = ["relabel", "--run-id", "r1", "--dataset", str(tiny_dataset), "--strategy", "morphology"]
    assert run(capsys, *relabel)[0] == 0
    store = Store.from_env()
    before = bucket_state(store)
    assert f"{stage_prefix('r1', 'relabel')}/_SUCCESS" in before

    existing = json.loads((tiny_dataset / "defects.json").read_text())[0]
    lists = {
        "missing.json": json.dumps(
            [existing, "labels/train/nope_1.png", "/content/data/labels/train/nope_2.png"]
        ),
        "val.json": json.dumps([existing, "labels/val/x.png"]),
        "broken.json": "[not json",
        "object.json": json.dumps({"labels/train/a.png": True}),
    }
    expected = {
        "missing.json": [("nope_1.png", "does not exist"), ("nope_2.png", "does not exist")],
        "val.json": [("labels/val/x.png", "not a train mask")],
        "broken.json": [("broken.json", "not valid JSON")],
        "object.json": [("object.json", "expected a JSON list")],
    }
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
    cases = {str(tmp_path / name): expected[name] for name in lists}
    cases[str(tmp_path / "absent.json")] = [("absent.json", "file not found")]
    cases["s3://another-bucket/bad_mask_paths.json"] = [("s3://another-bucket/bad_mask_paths.json", "bucket")]
    for source, words in cases.items():
        code, errors = run(capsys, *relabel, "--bad-masks", source)
        assert code == 2, (source, errors)
        for word in words:
            assert named(errors, "--bad-masks" if "://" not in source else source, *word), (source, errors)
        assert existing not in " ".join(errors)  # the good entry is not reported
        assert bucket_state(store) == before


def test_weights_that_are_not_checkpoints_are_refused_naming_the_file(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store.from_env()
    yolo, sam2 = tmp_path / "yolov8x.pt", tmp_path / "sam2.1_hiera_large.pt"
    yolo.write_bytes(b"this is not a checkpoint")
    sam2.write_bytes(b"PK\x03\x04 truncated zip")
    # Its own process: ultralytics replaces PIL.Image.open process-wide when imported.
    relabel = subprocess.run(
        [sys.executable, "-m", "tasks", "relabel", "--run-id", "r1", "--dataset", str(tiny_dataset),
         "--strategy", "yolo_sam2", "--yolo-weights", str(yolo), "--sam2-checkpoint", str(sam2)],
        env={**os.environ}, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    errors = [line for line in relabel.stderr.splitlines() if line.startswith("error: ")]
    assert relabel.returncode == 2, relabel.stderr[-3000:]
    assert named(errors, "--yolo-weights", str(yolo), "not a loadable checkpoint")
    assert named(errors, "--sam2-checkpoint", str(sam2), "not a loadable checkpoint")

    store.upload_file(yolo, "weights/backbone.pth")
    for spec in (str(yolo), store.uri("weights/backbone.pth")):
        code, errors = run(capsys, *train_args(str(tiny_dataset), "--pretrained", spec))
        assert code == 2, errors
        assert named(errors, f"--pretrained {spec}", "not a plain weights checkpoint")
    assert store.list_keys("runs") == []


class Payload:
    """Unpickling this runs code: it opens (creates) a file. torch's weights_only loader refuses it."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple:
        return (open, (str(self.canary), "w"))


def test_user_weights_are_never_unpickled_in_full(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "code-ran"
    evil = tmp_path / "backbone.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}, "meta": Payload(canary)}, evil)
    store = Store.from_env()
    store.upload_file(evil, "weights/backbone.pth")
    # One downloaded from the bucket into the training's work area, and a local file.
    for spec in (store.uri("weights/backbone.pth"), str(evil)):
        code, errors = run(capsys, *train_args(str(tiny_dataset), "--max-epochs", "1", "--pretrained", spec))
        assert not canary.exists(), f"unpickling {spec} ran its code"
        assert code == 2, errors
        assert named(errors, f"--pretrained {spec}", "weights_only=True")


def test_dataset_uris_outside_the_bucket_or_with_dotdot_are_refused(
    s3_env: dict[str, str], tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "validate", str(tiny_dataset), "--run-id", "r1")[0] == 0
    store = Store.from_env()
    before = bucket_state(store)
    published = store.uri(
        dataset_prefix("synth", json.loads(store.get_text("runs/r1/manifest.json"))["dataset"]["version"])
    )
    bucket = store.bucket
    uris = {
        published.replace(f"s3://{bucket}/", "s3://another-bucket/"): "is not the pipeline's bucket",
        f"s3://{bucket}/datasets/../runs/r1": "'..' segments are not allowed",
        f"{published}/../../../runs/r1": "'..' segments are not allowed",
        f"s3://{bucket}/datasets/./synth": "'..' segments are not allowed",
        f"s3://{bucket}/": "no prefix after the bucket name",
    }
    for uri, words in uris.items():
        for argv in (
            ["validate", uri],
            ["eda", "--run-id", "r1", "--dataset", uri],
            ["relabel", "--run-id", "r1", "--dataset", uri, "--strategy", "morphology"],
            train_args(uri, "--profile", "cpu"),
        ):
            code, errors = run(capsys, *argv)
            assert code == 2 and named(errors, uri, words), (argv, errors)
    # The same rule for every other s3:// input: a bad-mask list, pretrained weights.
    relabel = ["relabel", "--run-id", "r1", "--dataset", str(tiny_dataset), "--strategy", "morphology"]
    for uri in ("s3://another-bucket/bad.json", f"s3://{bucket}/datasets/../bad.json"):
        code, errors = run(capsys, *relabel, "--bad-masks", uri)
        assert code == 2 and named(errors, uri), errors
        code, errors = run(capsys, *train_args(str(tiny_dataset), "--pretrained", uri))
        assert code == 2 and named(errors, uri), errors
    assert bucket_state(store) == before


def test_train_overrides_are_checked(
    s3_env: dict[str, str], tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for epochs in ("0", "-3"):
        code, errors = run(capsys, *train_args(str(tiny_dataset), "--profile", "cpu", "--max-epochs", epochs))
        assert code == 2 and named(errors, "--max-epochs", epochs), errors
    for flag, value in (("--profile", "gpu"), ("--experiment", "h3")):
        with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2, the choices on stderr
            cli.main([*train_args(str(tiny_dataset)), flag, value])
        assert exit_info.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err
    assert Store.from_env().list_keys("runs") == []


def _train_with_options(tiny_dataset: Path, *options: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "tasks",
        *train_args(str(tiny_dataset), "--profile", "cpu", "--max-epochs", "1"),
    ]
    return subprocess.run(
        [*cmd, "--cfg-options", "train_cfg.val_interval=1", *options],
        cwd=ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cfg_options_that_would_run_a_command_exit_2_and_run_nothing(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    """The issue's example: on the old main mmengine's registry imported subprocess.Popen and built it
    as the timer hook, which created the file (the stage then failed with exit 1, to be retried)."""
    created = tmp_path / "x"
    result = _train_with_options(
        tiny_dataset,
        "default_hooks.timer.type=subprocess.Popen",
        f"default_hooks.timer.args=[touch,{created}]",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: --cfg-options default_hooks.timer.type=subprocess.Popen: a `type` names the code mmengine "
        "builds (overrides are values, never code); the only one that may change is optim_wrapper.type"
    ]
    assert not created.exists()
    # refused before the dataset is read: nothing under the run's prefix, nor anywhere else
    assert bucket_state(Store.from_env()) == {}


def test_cfg_options_that_would_import_a_module_exit_2_and_import_nothing(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path
) -> None:
    """On the old main `custom_imports.imports=[...]` trained with exit 0, then evaluate imported the
    module (here one that writes a file when imported)."""
    modules = tmp_path / "modules"
    modules.mkdir()
    imported = tmp_path / "imported"
    (modules / "somemodule.py").write_text(f"open({str(imported)!r}, 'w').close()\n")
    path = os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", str(ROOT))])
    result = _train_with_options(tiny_dataset, "custom_imports.imports=[somemodule]", PYTHONPATH=path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: --cfg-options custom_imports.imports=[somemodule]: imports Python modules" in result.stderr
    assert not imported.exists()
    assert bucket_state(Store.from_env()) == {}


# ---------------------------------------------------------------- shell metacharacters

# A directory name a shell would run four commands from (no '/', no '..': the DAG's schema lets it in).
HOSTILE = "x; touch pwn-semicolon $(touch pwn-subshell) `touch pwn-backtick` | tee pwn-pipe && echo {{ 7*7 }}"


def test_shell_metacharacters_reach_the_stage_as_one_inert_argument(
    s3_env: dict[str, str], tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = Path(shutil.copytree(tiny_dataset, tmp_path / HOSTILE / "ds"))
    monkeypatch.delenv("AIRFLOW_CONN_SEGPIPE_S3", raising=False)
    dag = parse_dag(monkeypatch, SEGPIPE_BUCKET=s3_env["SEGPIPE_BUCKET"])
    xcoms = plan_xcoms(dag, run_params(dag, dataset=str(dataset)))
    cwd = tmp_path / "cwd"  # where a shell would have run the injected commands
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    outputs = {}
    for stage in ("validate", "eda"):
        command = render(dag.get_task(stage), xcoms)["command"]
        assert str(dataset) in command  # one argv item, exactly as given
        with structlog.testing.capture_logs() as events:
            runners.LocalStageOperator(task_id=stage, command=command).execute({})
        outputs[stage] = "\n".join(str(event.get("event")) for event in events)
    injected = [p for where in (cwd, tmp_path, ROOT) for p in where.glob("pwn-*")]
    assert injected == [], injected
    # The stage received the literal path in its argv: it validated and published that directory.
    summary = json.loads(outputs["validate"][outputs["validate"].index("\n{") :])
    assert summary["root"] == str(dataset)  # with its '{{ 7*7 }}' unrendered
    assert "published" in outputs["eda"]
