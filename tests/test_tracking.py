"""tasks.tracking: a real ClearML offline session from a short mmengine training, and ClearML failing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clearml_session import read_session
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, MODELS
from mmengine.runner import Runner
from torch import nn

from tasks import mmcompat, tracking

CLASSES = ("background", "cat", "dog")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ClearML keeps its last-task cache in ~/.clearml/.session.json (a fixed path): not the real HOME
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@MODELS.register_module(force=True)
class TinySegmenter(BaseModel):
    """A 1x1 conv segmenter: enough for mmengine's loops, mmseg's IoUMetric and the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(CLASSES), 1)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "tensor"):
        logits = self.conv(inputs)
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels)}
        # IoUMetric reads pred_sem_seg/gt_sem_seg 'data' of each sample
        return [
            {"pred_sem_seg": {"data": pred[None]}, "gt_sem_seg": {"data": label[None]}}
            for pred, label in zip(logits.argmax(1), labels, strict=True)
        ]


@DATASETS.register_module(force=True)
class ColourBlobs(torch.utils.data.Dataset):
    """Random 8x8 images whose label is the strongest colour channel: learnable in a few steps."""

    metainfo = {"classes": CLASSES}

    def __init__(self, n: int, seed: int) -> None:
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.labels = self.images.argmax(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"inputs": self.images[index], "labels": self.labels[index]}


ROOT = Path(__file__).resolve().parents[1]


def train_briefly(work_dir: Path, tracker: tracking.Tracker) -> Runner:
    mmcompat.apply()
    import mmseg.evaluation  # noqa: F401 - registers mmseg.IoUMetric

    loader = {"batch_size": 4, "num_workers": 0, "collate_fn": {"type": "default_collate"}}
    cfg = Config(
        {
            "model": {"type": "TinySegmenter"},
            "work_dir": str(work_dir),
            "train_dataloader": {
                **loader,
                "dataset": {"type": "ColourBlobs", "n": 32, "seed": 0},
                "sampler": {"type": "DefaultSampler", "shuffle": True},
            },
            "val_dataloader": {
                **loader,
                "dataset": {"type": "ColourBlobs", "n": 8, "seed": 1},
                "sampler": {"type": "DefaultSampler", "shuffle": False},
            },
            "train_cfg": {"by_epoch": False, "max_iters": 20, "val_interval": 10},
            "val_cfg": {},
            "val_evaluator": {"type": "mmseg.IoUMetric", "iou_metrics": ["mIoU", "mDice"]},
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.5}},
            "default_hooks": {"checkpoint": None},
            "randomness": {"seed": 0},
            "log_level": "WARNING",
        }
    )
    runner = Runner.from_cfg(cfg)
    runner.register_hook(tracking.TrackerHook(tracker, interval=5), priority="LOW")
    runner.train()
    return runner


def run_fresh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A Python script in a fresh process, as a stage runs: ClearML holds one task per process and
    keeps per-process state (offline or online, reporter threads) that earlier tasks would skew."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


OFFLINE_SESSION = """
import json, sys
from pathlib import Path
from PIL import Image
sys.path.insert(0, "tests")
from test_tracking import train_briefly
from tasks import tracking

out = Path(sys.argv[1])
session_dir = out / "out" / "clearml"
tracker = tracking.open_task("run-1", "train", "h1", params={"profile": "cpu"}, session_dir=session_dir)
assert tracker.enabled and tracker.offline
with tracker:
    runner = train_briefly(out / "work", tracker)
    metrics = out / "val_metrics.json"
    metrics.write_text(json.dumps({"mDice": runner.message_hub.get_scalar("val/mDice").current()}))
    tracker.upload_artifact("val_metrics", metrics)
    panel = out / "panel.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(panel)
    tracker.report_image("panels", "best", panel)
assert tracker.close() is None  # already closed by the context manager: nothing more happens
"""


def test_offline_session_holds_scalars_and_hyperparameters(tmp_path: Path) -> None:
    run_fresh(OFFLINE_SESSION, str(tmp_path))
    session_dir = tmp_path / "out" / "clearml"
    [session_zip] = session_dir.glob("offline-*.zip")
    events, task = read_session(session_zip)
    # the session lives where we said (conftest's CLEARML_CACHE_DIR), not in ~/.clearml
    cache = Path(os.environ["CLEARML_CACHE_DIR"])
    assert (cache / "offline" / session_zip.name).is_file()

    with zipfile.ZipFile(session_zip) as zf:
        stored = [name for name in zf.namelist() if name.startswith("data/")]
    assert any(name.endswith("val_metrics.json") for name in stored)
    assert any(name.endswith(".png") for name in stored)
    images = [e for e in events if e.get("type") == "training_debug_image"]
    assert [(e["metric"], e["variant"]) for e in images] == [("panels", "best")]

    scalars = {
        (e["metric"], e["variant"], e["iter"]): e["value"]
        for e in events
        if e["type"] == "training_stats_scalar"
    }
    assert {iteration for (metric, _, iteration) in scalars if metric == "loss"} == {5, 10, 15, 20}
    assert scalars[("lr", "train", 20)] == pytest.approx(0.5)
    for metric in ("mIoU", "mDice", "aAcc"):
        assert {iteration for (m, series, iteration) in scalars if (m, series) == (metric, "val")} == {10, 20}
    assert 0 <= scalars[("mDice", "val", 20)] <= 100
    assert scalars[("loss", "train", 20)] < scalars[("loss", "train", 5)]  # it trained

    assert task["name"] == "train/h1"
    hyper = task["hyperparams"]
    assert hyper["params"]["profile"]["value"] == "cpu"
    assert hyper["config"]["train_cfg/max_iters"]["value"] == "20"
    assert hyper["config"]["val_evaluator/type"]["value"] == "mmseg.IoUMetric"


def test_a_stage_launched_by_a_clearml_process_is_its_own_task(tmp_path: Path) -> None:
    """A parent that used ClearML (this test runner, a notebook) leaves CLEARML_PROC_MASTER_ID in
    the environment: the stage must still record its own session, not become ClearML's stub."""
    script = (
        "import sys; from pathlib import Path; from tasks import tracking; "
        "t = tracking.open_task('run-3', 'train', 'h1', session_dir=Path(sys.argv[1])); "
        "t.report_scalar('loss', 'train', 0.5, 1); print(t.close())"
    )
    master = {"CLEARML_PROC_MASTER_ID": "1:", "TRAINS_PROC_MASTER_ID": "1:"}
    done = run_fresh(script, str(tmp_path / "session"), **master)
    [session_zip] = (tmp_path / "session").glob("offline-*.zip")
    assert str(session_zip) in done.stdout.splitlines()  # what close() returned
    events, task = read_session(session_zip)
    assert task["name"] == "train/h1"
    assert [(e["metric"], e["value"]) for e in events if e["type"] == "training_stats_scalar"] == [
        ("loss", 0.5)
    ]


UNREACHABLE_CLEARML = """
import logging, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_tracking import train_briefly
from tasks import tracking

logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
assert not tracking.offline_mode()
out = Path(sys.argv[1])
with tracking.open_task("run-2", "train", "h2", session_dir=out / "clearml") as tracker:
    runner = train_briefly(out / "work", tracker)
    tracker.report_scalar("x", "y", 1.0, 0)
    tracker.upload_artifact("nothing", out)
assert not tracker.enabled and tracker.close() is None
print("iterations", runner.iter)
"""


def test_clearml_failure_is_logged_once_and_training_goes_on(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    online = {
        "CLEARML_OFFLINE_MODE": "0",
        "CLEARML_API_HOST": f"http://127.0.0.1:{port}",
        "CLEARML_API_ACCESS_KEY": "test-access",
        "CLEARML_API_SECRET_KEY": "test-secret",
    }
    done = run_fresh(UNREACHABLE_CLEARML, str(tmp_path), **online)
    assert "iterations 20" in done.stdout  # training finished
    warnings = [line for line in done.stderr.splitlines() if line.startswith("tasks.tracking WARNING")]
    assert len(warnings) == 1 and "ClearML unavailable" in warnings[0], done.stderr[-3000:]
    assert "test-secret" not in done.stdout + done.stderr
    assert not (tmp_path / "clearml").exists()


def test_clearml_leaves_the_signal_handlers_alone(tmp_path: Path) -> None:
    # ClearML's own SIGTERM handler ignored SIGTERM: a stage must stop when Airflow says so.
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT)
    before = {sig: signal.getsignal(sig) for sig in signals}
    with tracking.open_task("run-1", "train", "h1", session_dir=tmp_path / "session") as tracker:
        assert tracker.enabled
        assert {sig: signal.getsignal(sig) for sig in signals} == before
    assert {sig: signal.getsignal(sig) for sig in signals} == before


def test_online_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGPIPE_BUCKET", "segmentation")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert tracking.output_uri("r1") == "s3://minio:9000/segmentation/runs/r1/clearml"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert tracking.output_uri("r1") == "s3://segmentation/runs/r1/clearml"
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "0")
    for name in tracking.ONLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tracking.offline_mode()  # no credentials: offline
    for name in tracking.ONLINE_VARIABLES:
        monkeypatch.setenv(name, "set")
    assert not tracking.offline_mode()
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    assert tracking.offline_mode()


def test_metric_items_flatten_per_class() -> None:
    metrics = {"mIoU": 80.5, "IoU.cat": 70.0, "per_class": {"dog": {"IoU": 60.0, "Dice": 75.0}}, "note": "x"}
    assert sorted(tracking._metric_items(metrics)) == [
        ("Dice", "dog", 75.0),
        ("IoU", "cat", 70.0),
        ("IoU", "dog", 60.0),
        ("mIoU", "val", 80.5),
    ]
