"""tasks.train: train-label choice, dataset view, pretrained weights, the resume mirror, and
`python -m tasks train` end to end against the S3 server (publish, cache, kill and resume)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from tasks import train
from tasks.errors import InputError
from tasks.overrides import check_values, parse_items
from tasks.store import Store, stage_prefix
from tasks.train import (
    MIRROR_INDEX,
    load_experiment_config,
    prepare_dataset_view,
    resolve_train_labels,
    restore_mirror,
    train_experiment,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FILES = {"best.pth", "config.py", "log.json", "val_metrics.json"}
# Tests that count validations or wait for a mirrored epoch set the interval themselves: the CPU
# profile's own val_interval is tuning and keeps changing.
EVERY_EPOCH = ("--cfg-options", "train_cfg.val_interval=1")


def _train_cmd(run_id: str, dataset: Path, experiment: str, max_epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tasks",
        "train",
        "--experiment",
        experiment,
        "--run-id",
        run_id,
        "--dataset",
        str(dataset),
        "--profile",
        "cpu",
        "--max-epochs",
        str(max_epochs),
        *extra,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _val_records(log_json: str) -> list[dict]:
    """mmengine's scalar log: one JSON object per line; validation records carry mDice and no lr."""
    records = [json.loads(line) for line in log_json.splitlines() if line.strip()]
    return [r for r in records if "mDice" in r]


# ---------------------------------------------------------------- data


def test_train_labels_prefer_relabel_then_labels_sam2_then_labels(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    store = Store.from_env()
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    chosen = resolve_train_labels(store, "r1", root, tmp_path / "cache")
    assert (chosen.source, chosen.path) == ("dataset:labels/train", root / "labels/train")
    assert chosen.version is None  # the dataset version covers the dataset's own labels

    shutil.copytree(root / "labels" / "train", root / "labels_sam2" / "train")
    chosen = resolve_train_labels(store, "r1", root, tmp_path / "cache")
    assert (chosen.source, chosen.path) == ("dataset:labels_sam2/train", root / "labels_sam2/train")

    relabel = tmp_path / "relabel_out"
    shutil.copytree(root / "labels" / "train", relabel / "labels_sam2" / "train")
    (relabel / "report.json").write_text("{}")
    store.publish(relabel, stage_prefix("r1", "relabel"), inputs={})
    chosen = resolve_train_labels(store, "r1", root, tmp_path / "cache")
    assert chosen.source == f"s3://{store.bucket}/runs/r1/relabel/labels_sam2/train"
    assert chosen.path == tmp_path / "cache" / "labels_sam2" / "train"
    assert sorted(p.name for p in chosen.path.iterdir()) == sorted(p.name for p in relabel.rglob("*.png"))
    assert chosen.version and len(chosen.version) == 16
    # a real re-run of relabel with the same masks (a new ClearML session beside them): same version
    (relabel / "clearml").mkdir()
    (relabel / "clearml" / "offline-new.zip").write_bytes(b"another session")
    (relabel / "report.json").write_text('{"repaired_at": "later"}')
    store.publish(relabel, stage_prefix("r1", "relabel"), inputs={})
    assert resolve_train_labels(store, "r1", root, tmp_path / "cache3").version == chosen.version
    first_mask = sorted((relabel / "labels_sam2" / "train").iterdir())[0]
    first_mask.write_bytes(next((root / "labels" / "val").iterdir()).read_bytes())  # other masks
    store.publish(relabel, stage_prefix("r1", "relabel"), inputs={})
    assert resolve_train_labels(store, "r1", root, tmp_path / "cache4").version != chosen.version
    # another run id has no relabel output: back to the dataset's own labels
    assert resolve_train_labels(store, "r2", root, tmp_path / "cache2").source == "dataset:labels_sam2/train"


def test_dataset_view_links_images_and_the_chosen_train_labels(tiny_dataset: Path, tmp_path: Path) -> None:
    other_labels = tmp_path / "relabeled"
    shutil.copytree(tiny_dataset / "labels" / "train", other_labels)
    view = prepare_dataset_view(tiny_dataset, other_labels, tmp_path / "view")
    assert (view / "labels" / "train").resolve() == other_labels.resolve()
    for split in ("train", "val", "test"):
        assert (view / "images" / split).resolve() == (tiny_dataset / "images" / split).resolve()
    for split in ("val", "test"):
        assert (view / "labels" / split).resolve() == (tiny_dataset / "labels" / split).resolve()
    # rebuilt on the next call: a view never keeps a previous source
    view = prepare_dataset_view(tiny_dataset, tiny_dataset / "labels" / "train", tmp_path / "view")
    assert (view / "labels" / "train").resolve() == (tiny_dataset / "labels" / "train").resolve()
    with pytest.raises(InputError, match="relabeled_gone: folder missing"):
        prepare_dataset_view(tiny_dataset, tmp_path / "relabeled_gone", tmp_path / "view")


def test_pretrained_backbone_is_loaded_from_the_given_file(tmp_path: Path) -> None:
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    # An earlier in-process Runner may have left mmengine's default scope active: build in mmseg's.
    DefaultScope.get_instance("test_pretrained_backbone", scope_name="mmseg")

    cfg = load_experiment_config("exp2", "full")
    assert cfg.model.pretrained is None
    source = MODELS.build(cfg.model.backbone)  # MiT-B2 with its own random init: our "ImageNet" weights
    weights = tmp_path / "mit_b2.pth"
    torch.save({"state_dict": source.state_dict()}, weights)

    model = MODELS.build(load_experiment_config("exp2", "full", pretrained=weights).model)
    model.init_weights()
    loaded = model.backbone.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def _mirrored_checkpoint(tmp_path: Path, epoch: int) -> Path:
    """A resume checkpoint as Runner.save_checkpoint writes it (plain: tasks.mmcompat)."""
    import mmengine.runner
    from mmengine.logging import MessageHub

    from tasks import mmcompat

    mmcompat.apply()
    hub = MessageHub.get_instance(f"test_mirror_{epoch}_{time.time_ns()}")
    hub.update_scalar("train/loss", 1.0 / epoch)
    checkpoint = {
        "meta": {"epoch": epoch, "iter": 10 * epoch},
        "state_dict": {"w": torch.full((2,), float(epoch))},
        "message_hub": hub.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
    }
    path = tmp_path / f"epoch_{epoch}.pth"
    mmengine.runner.save_checkpoint(checkpoint, str(path))
    return path


def test_mirror_is_resumed_only_for_the_same_inputs(s3_env: dict, tmp_path: Path) -> None:
    store = Store.from_env()
    prefix = "runs/r1/train/h1/work"
    inputs = {"dataset_version": "abc", "experiment": "h1", "max_epochs": 3}
    store.upload_file(_mirrored_checkpoint(tmp_path, 2), f"{prefix}/epoch_2.pth")
    store.put_text(f"{prefix}/20260101_000000/vis_data/20260101_000000.json", "{}\n")
    point = {"epoch": 2, "checkpoint": "epoch_2.pth", "best": None}
    index = {"inputs": inputs, "epoch": 2, "checkpoint": "epoch_2.pth", "points": [point]}
    index["files"] = ["epoch_2.pth", "20260101_000000/vis_data/20260101_000000.json"]
    store.put_json(f"{prefix}/{MIRROR_INDEX}", index)

    assert restore_mirror(store, prefix, {**inputs, "dataset_version": "other"}, tmp_path / "a") is None
    assert not (tmp_path / "a").exists()
    resumed = restore_mirror(store, prefix, inputs, tmp_path / "b")
    assert resumed.checkpoint == tmp_path / "b" / "epoch_2.pth" and resumed.point == point
    assert (tmp_path / "b" / "20260101_000000" / "vis_data" / "20260101_000000.json").is_file()
    assert restore_mirror(store, "runs/r1/train/h2/work", inputs, tmp_path / "c") is None
    # other config overrides: another training, whose mirror is not resumed
    other = {**inputs, "cfg_options": {"train_cfg.val_interval": 1}}
    assert restore_mirror(store, prefix, other, tmp_path / "d") is None


def test_a_corrupt_mirrored_checkpoint_is_discarded_for_the_one_before(
    s3_env: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The newest checkpoint of the mirror unreadable (truncated, forged, its object lost): the retry
    resumes from the resume point before it; with none left it starts over, never failing on it."""
    store = Store.from_env()
    prefix = "runs/r1/train/h1/work"
    inputs = {"dataset_version": "abc", "experiment": "h1", "max_epochs": 3}
    for epoch in (1, 2):
        store.upload_file(_mirrored_checkpoint(tmp_path, epoch), f"{prefix}/epoch_{epoch}.pth")
    points = [{"epoch": e, "checkpoint": f"epoch_{e}.pth", "best": None} for e in (2, 1)]
    index = {"inputs": inputs, "epoch": 2, "checkpoint": "epoch_2.pth", "points": points}
    store.put_json(f"{prefix}/{MIRROR_INDEX}", {**index, "files": ["epoch_2.pth", "epoch_1.pth"]})

    store.put_bytes(f"{prefix}/epoch_2.pth", b"PK\x03\x04 half a zip")  # its own sha256: it downloads
    resumed = restore_mirror(store, prefix, inputs, tmp_path / "a")
    assert resumed.point["epoch"] == 1 and resumed.checkpoint.name == "epoch_1.pth"
    assert "discarding the mirrored checkpoint of epoch 2" in caplog.text
    assert (tmp_path / "a" / "last_checkpoint").read_text() == str(resumed.checkpoint)

    # a pickle that is not plain data (code could hide in it) is corrupt too, and so is a lost object
    torch.save({"meta": {"epoch": 1}, "obj": object()}, tmp_path / "pickled.pth")
    store.upload_file(tmp_path / "pickled.pth", f"{prefix}/epoch_1.pth")
    store.delete_keys([f"{prefix}/epoch_2.pth"])
    caplog.clear()
    assert restore_mirror(store, prefix, inputs, tmp_path / "b") is None
    assert "no usable checkpoint in the mirror" in caplog.text
    assert store.list_keys(prefix) == []  # discarded: the next attempt starts clean


def test_bad_arguments_exit_2_with_a_clear_message(s3_env: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    cmd = _train_cmd("r1", tmp_path / "missing", "h1", 1)
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"error: {tmp_path / 'missing'}: dataset directory does not exist" in result.stderr
    with pytest.raises(InputError, match=f"{tmp_path / 'nope.pth'}: pretrained weights file does not exist"):
        train_experiment("h1", "r1", str(tiny_dataset), pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(InputError, match="s3://elsewhere/w.pth: bucket 'elsewhere' is not the pipeline's"):
        train_experiment("h1", "r1", str(tiny_dataset), pretrained="s3://elsewhere/w.pth")
    with pytest.raises(InputError, match="invalid run id"):
        train_experiment("h1", "../r1", str(tiny_dataset))


# ---------------------------------------------------------------- --cfg-options


def test_cfg_options_are_merged_last_and_recorded() -> None:
    items = ["train_cfg.val_interval=1", "custom_hooks.0.patience=3", "model.decode_head.dilations=(1,2,4,8)"]
    options = parse_items(items)
    assert options == {
        "train_cfg.val_interval": 1,
        "custom_hooks.0.patience": 3,
        "model.decode_head.dilations": (1, 2, 4, 8),
    }
    cfg = load_experiment_config("h1", "cpu", max_epochs=3, cfg_options=options)
    # after the profile's overlay (its own val_interval and patience) and after --max-epochs
    assert cfg.train_cfg.val_interval == 1 and cfg.train_cfg.max_epochs == 3
    assert cfg.custom_hooks[0].patience == 3
    assert cfg.model.decode_head.dilations == (1, 2, 4, 8)
    assert cfg.cfg_options == options  # recorded in the resolved config (published as config.py)
    assert load_experiment_config("h1", "cpu").cfg_options == {}
    # every other kind of allowed value, on the experiment that has the key
    more = parse_items(
        [
            "optim_wrapper.type=AmpOptimWrapper",
            "optim_wrapper.optimizer.lr=1e-3",
            "model.decode_head.loss_decode.0.class_weight=[0.1,1,1.5]",
            "randomness.deterministic=true",
            "train_dataloader.num_workers=0",
        ]
    )
    cfg = load_experiment_config("h2", "cpu", cfg_options=more)
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.optimizer.lr == 0.001
    assert cfg.model.decode_head.loss_decode[0].class_weight == [0.1, 1, 1.5]
    assert cfg.randomness.deterministic is True and cfg.train_dataloader.num_workers == 0


# One per kind of refusal: (experiment, KEY=VALUE, what the error says). On the old main the first
# two ran code (tests/reliability/test_bad_inputs.py shows them end to end).
REFUSED_CFG_OPTIONS = [
    ("h1", "default_hooks.timer.type=subprocess.Popen", "a `type` names the code mmengine builds"),
    ("h1", "default_hooks.timer.args=[touch,/tmp/x]", "not an override this pipeline allows"),
    ("h1", "custom_imports.imports=[os]", "imports Python modules"),
    ("h1", "custom_imports.allow_failed_imports=True", "imports Python modules"),
    ("exp2", "optim_wrapper._delete_=True", "replaces a whole section"),
    ("h1", "model._scope_=mmengine", "_scope_ is one of mmengine's special keys"),
    ("h1", "_base_=/tmp/evil.py", "_base_ is one of mmengine's special keys"),
    ("h1", "default_scope=mmengine", "changes the registry that turns every `type` into code"),
    ("h1", "model.decode_head.type=FCNHead", "a `type` names the code mmengine builds"),
    # lazy-import tricks: a dotted path where a registered name goes, a file to unpickle, a template
    ("h1", "optim_wrapper.type=torch.optim.SGD", "a dotted name imports a module"),
    ("h1", "optim_wrapper.type=mmengine.optim.OptimWrapper", "a dotted name imports a module"),
    ("h2", "model.decode_head.loss_decode.0.class_weight=/tmp/weights.pkl", "expected a list of 1 to 16"),
    ("h1", "randomness.seed={{fileDirname}}", "expected a whole number of at least 0"),
    ("h1", "optim_wrapper.type=NoSuchWrapper", "expected OptimWrapper or AmpOptimWrapper"),
    # outside the allow-list, malformed, or of the wrong kind
    ("h1", "model.backbone.depth=101", "not an override this pipeline allows"),
    ("h1", "train_cfg.val_interval", "expected KEY=VALUE"),
    ("h1", "-x=1", "not an override this pipeline allows"),
    ("h1", "train_cfg.val_interval=abc", "expected a whole number of at least 1"),
    ("h1", "train_cfg.val_interval=0", "expected a whole number of at least 1"),
    ("h1", "optim_wrapper.optimizer.lr=-1", "expected a number of at least 0"),
    ("h1", "optim_wrapper.optimizer.lr=nan", "expected a number of at least 0"),
    ("h1", "model.decode_head.dilations=(1,2", "expected a list of 1 to 8 whole numbers"),
    ("h1", "randomness.deterministic=yes", "expected true or false"),
    ("h1", "train_cfg.val_interval=1\n--max-epochs=9", "expected a whole number of at least 1"),
    # the stage's own keys
    ("h1", "train_cfg.max_epochs=3", "use --max-epochs"),
    ("h1", "model.pretrained=/tmp/w.pth", "use --pretrained"),
    ("h1", "train_dataloader.dataset.data_root=/data", "use --dataset"),
    ("h1", "work_dir=/tmp/w", "the stage sets its own work dir"),
    # allowed keys the experiment's config does not have
    ("exp2", "optim_wrapper.optimizer.momentum=0.5", "does not exist in the exp2 config"),
    ("exp2", "model.decode_head.dilations=(1,2)", "does not exist in the exp2 config"),
    ("h1", "model.decode_head.loss_decode.0.class_weight=[1,1,1]", "does not exist in the h1 config"),
    ("h1", "custom_hooks.4.patience=1", "custom_hooks.4 does not exist in the config"),
]


@pytest.mark.parametrize(("experiment", "item", "problem"), REFUSED_CFG_OPTIONS)
def test_bad_cfg_options_are_refused_naming_the_option(experiment: str, item: str, problem: str) -> None:
    with pytest.raises(InputError) as info:
        load_experiment_config(experiment, "cpu", cfg_options=parse_items([item]))
    assert str(info.value).startswith(f"--cfg-options {item.split('=')[0]}")
    assert problem in str(info.value)


def test_recorded_cfg_options_are_checked_by_the_same_rule() -> None:
    """What evaluate rebuilds a config from (the options a training recorded in the store)."""
    assert check_values({"train_cfg.val_interval": 1, "model.decode_head.dilations": [1, 2]})
    for forged in (
        {"default_hooks.timer.type": "subprocess.Popen"},
        {"custom_imports.imports": ["os"]},
        {"train_cfg.val_interval": 1.5},
        {"train_cfg.val_interval": True},
        {"optim_wrapper.type": "subprocess.Popen"},
        {"model.decode_head.loss_decode.0.class_weight": "/tmp/w.pkl"},
    ):
        with pytest.raises(InputError, match="--cfg-options"):
            check_values(forged)
    with pytest.raises(InputError, match="expected a mapping"):
        check_values(["train_cfg.val_interval=1"])


def test_type_names_are_looked_up_in_the_registries_never_imported() -> None:
    from tasks.overrides import ALLOWED

    assert not train.registered_name("subprocess.Popen", "OPTIM_WRAPPERS")
    # Registry.get would import the module of a dotted name; the lookup never does
    imported_before = "wave" in sys.modules
    assert not train.registered_name("wave.Wave_read", "OPTIM_WRAPPERS")
    assert ("wave" in sys.modules) == imported_before
    for kind in {kind for kind in ALLOWED.values() if kind.registry}:
        for name in kind.pattern.split("|"):  # every name an allowed `type` may take is registered
            assert train.registered_name(name, kind.registry), name


def test_cfg_options_are_part_of_the_training_inputs(
    s3_env: dict, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished training is reused only for the same overrides (the mirror test above: resume too)."""
    trained: list[tuple[object, dict]] = []

    def publish_without_training(cfg, stage, mirror_prefix, exp_dir, *_) -> dict:
        trained.append((cfg, stage.inputs))
        out = exp_dir / "publish"
        out.mkdir(parents=True, exist_ok=True)
        cfg.dump(str(out / "config.py"))
        stage.store.publish(out, stage.prefix, stage.inputs)
        return {"status": "trained"}

    monkeypatch.setattr(train, "_run_and_publish", publish_without_training)
    every, second = {"train_cfg.val_interval": 1}, {"train_cfg.val_interval": 2}
    statuses = [
        train_experiment("h1", "r1", str(tiny_dataset), "cpu", 2, cfg_options=options)["status"]
        for options in (every, every, second, None)
    ]
    assert statuses == ["trained", "cached", "trained", "trained"]
    assert [inputs["cfg_options"] for _, inputs in trained] == [every, second, {}]
    assert [cfg.train_cfg.val_interval for cfg, _ in trained[:2]] == [1, 2]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_publishes_outputs_then_a_second_run_is_cached(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    from mmengine.config import Config
    from mmengine.runner.checkpoint import _load_checkpoint

    store = Store.from_env()
    prefix = stage_prefix("r1", "train", "h2")
    first = _run(_train_cmd("r1", tiny_dataset, "h2", 1))
    assert "backbone starts from scratch" in first.stderr
    assert "train labels from dataset:labels/train" in first.stderr

    marker = store.marker(prefix)
    assert marker is not None and set(marker["files"]) >= TRAIN_FILES
    assert marker["inputs"]["labels_source"] == "dataset:labels/train"
    assert not store.list_keys(f"{prefix}/work")  # the resume mirror is gone once published
    assert any(name.startswith("clearml/") and name.endswith(".zip") for name in marker["files"]), (
        f"no ClearML offline session published; stage log:\n{first.stderr[-6000:]}"
    )
    local = store.fetch(prefix, tmp_path / "out")

    metrics = json.loads((local / "val_metrics.json").read_text())
    assert (metrics["experiment"], metrics["split"], metrics["best_epoch"]) == ("h2", "val", 1)
    assert metrics["checkpoint"] == "best_mDice_epoch_1.pth"
    assert metrics["dataset_version"] == marker["inputs"]["dataset_version"]
    assert metrics["train_labels"] == "dataset:labels/train" and metrics["pretrained"] is None
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):
        assert 0.0 <= metrics[key] <= 100.0
    assert set(metrics["per_class"]) == {"background", "cat", "dog"}
    for values in metrics["per_class"].values():
        assert set(values) == {"IoU", "Dice", "Acc"}
        assert all(v is None or 0.0 <= v <= 100.0 for v in values.values())
    dice = [v["Dice"] for v in metrics["per_class"].values() if v["Dice"] is not None]
    assert metrics["mDice"] == pytest.approx(sum(dice) / len(dice), abs=0.02)

    # best.pth holds weights only: it loads with torch's safe loader, no trust needed
    checkpoint = _load_checkpoint(str(local / "best.pth"), map_location="cpu")
    assert set(checkpoint) == {"meta", "state_dict"}
    assert checkpoint["meta"]["epoch"] == 1
    config = Config.fromfile(local / "config.py")
    assert config.model.decode_head.loss_decode[0].class_weight == [0.0585, 1.0, 1.0]
    assert config.profile == "cpu" and config.train_cfg.max_epochs == 1
    records = _val_records((local / "log.json").read_text())
    assert [r["step"] for r in records] == [1]
    assert records[0]["mDice"] == pytest.approx(metrics["mDice"], abs=0.01)  # float32 in the log

    second = _run(_train_cmd("r1", tiny_dataset, "h2", 1))
    assert "cached" in second.stderr
    assert json.loads(second.stdout)["status"] == "cached"
    assert store.marker(prefix)["published_at"] == marker["published_at"]


@pytest.mark.slow
def test_killed_training_resumes_at_the_next_epoch(s3_env: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from mmengine.config import Config
    from mmengine.runner.checkpoint import _load_checkpoint

    from tasks import mmcompat

    store = Store.from_env()
    prefix = stage_prefix("r1", "train", "exp2")
    index_key = f"{prefix}/work/{MIRROR_INDEX}"
    cmd = _train_cmd("r1", tiny_dataset, "exp2", 4, *EVERY_EPOCH)
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + 300
        while not store.exists(index_key):  # the first checkpoint has been mirrored
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint mirrored within 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a worker lost mid-training: no cleanup of any kind
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    index = store.get_json(index_key)
    mirrored = index["epoch"]
    assert store.marker(prefix) is None, "the training finished before it was killed"
    assert 1 <= mirrored < 4
    # what the retry resumes from carries the validation state of its epoch
    checkpoint_file = tmp_path / "mirrored.pth"
    store.download_file(f"{prefix}/work/{index['checkpoint']}", checkpoint_file)
    mmcompat.apply()  # mmengine's loader must be ours in this process too, whatever ran before
    hub = _load_checkpoint(str(checkpoint_file), map_location="cpu")["message_hub"]["runtime_info"]
    assert hub["best_val"]["epoch"] <= mirrored and "early_stopping" in hub

    retry = _run(cmd)
    output = retry.stdout + retry.stderr
    assert f"resumed epoch: {mirrored}," in output
    assert "resumed epoch: 0," not in output
    local = store.fetch(prefix, tmp_path / "out")
    metrics = json.loads((local / "val_metrics.json").read_text())
    assert metrics["epochs_trained"] > mirrored
    config = Config.fromfile(local / "config.py")
    assert config.train_cfg.val_interval == 1 and config.cfg_options == {"train_cfg.val_interval": 1}
    # every validation happened exactly once across the killed run and the retry: nothing trained twice
    steps = [r["step"] for r in _val_records((local / "log.json").read_text())]
    assert steps == list(range(1, metrics["epochs_trained"] + 1))


@pytest.mark.slow
def test_a_retry_resumes_from_the_checkpoint_before_a_corrupt_one(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    """On the old main a mirrored checkpoint that does not load failed every retry (exit 1)."""
    store = Store.from_env()
    prefix = stage_prefix("r1", "train", "h1")
    index_key = f"{prefix}/work/{MIRROR_INDEX}"
    cmd = _train_cmd("r1", tiny_dataset, "h1", 3, *EVERY_EPOCH, "custom_hooks.0.patience=10")
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + 300
        while not (store.exists(index_key) and store.get_json(index_key)["epoch"] >= 2):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint mirrored within 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    index = store.get_json(index_key)
    newest, before = index["points"]
    assert store.marker(prefix) is None and before["epoch"] == newest["epoch"] - 1
    # the newest checkpoint's object replaced by half a file (its own sha256: it downloads fine)
    store.put_bytes(f"{prefix}/work/{newest['checkpoint']}", b"PK\x03\x04 truncated")

    retry = _run(cmd)
    output = retry.stdout + retry.stderr
    assert f"discarding the mirrored checkpoint of epoch {newest['epoch']}" in output
    assert f"resumed epoch: {before['epoch']}," in output
    metrics = json.loads(store.get_text(f"{prefix}/val_metrics.json"))
    assert metrics["epochs_trained"] == 3 and store.marker(prefix) is not None


@pytest.mark.slow
def test_sigterm_stops_training_promptly_and_publishes_nothing(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path
) -> None:
    """What Airflow sends on a timeout or a kill: the stage must end at once, not publish."""
    store = Store.from_env()
    prefix = stage_prefix("r1", "train", "h1")
    log_path = tmp_path / "terminated.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            # long enough to be mid-training for sure: 50 epochs, no early stop
            _train_cmd("r1", tiny_dataset, "h1", 50, *EVERY_EPOCH, "custom_hooks.0.patience=50"),
            cwd=ROOT,
            env=subprocess_env(),
            stdout=log_file,
            stderr=log_file,
        )
        try:
            deadline = time.monotonic() + 300
            while not store.exists(f"{prefix}/work/{MIRROR_INDEX}"):  # mid-training, tracking on
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no epoch mirrored within 300 s"
                time.sleep(0.05)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_path.read_text()
    assert took < 15, f"exited {took:.0f} s after SIGTERM\n{output[-3000:]}"
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in output, output[-3000:]
    assert store.marker(prefix) is None  # not published; the resume mirror stays for a retry
