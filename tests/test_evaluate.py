"""Evaluate: mmseg's metric path against an independent numpy computation, and the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks import cli
from tasks import store as st
from tasks.dataset import split_version

CLASSES = ("background", "cat", "dog")
IGNORE = 255


def numpy_metrics(preds: list[np.ndarray], truths: list[np.ndarray]) -> dict:
    """aAcc, mIoU, mAcc, mDice and per-class values (percent) from a confusion matrix, in plain numpy."""
    n = len(CLASSES)
    confusion = np.zeros((n, n), dtype=np.int64)
    for pred, truth in zip(preds, truths, strict=True):
        valid = truth != IGNORE
        np.add.at(confusion, (truth[valid], pred[valid]), 1)
    tp = np.diag(confusion).astype(float)
    fn = confusion.sum(axis=1) - tp
    fp = confusion.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, dice, acc = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn), tp / (tp + fn)
    return {
        "aAcc": tp.sum() / confusion.sum() * 100,
        "mIoU": np.nanmean(iou) * 100,
        "mAcc": np.nanmean(acc) * 100,
        "mDice": np.nanmean(dice) * 100,
        "per_class": {
            c: {"IoU": iou[i] * 100, "Dice": dice[i] * 100, "Acc": acc[i] * 100}
            for i, c in enumerate(CLASSES)
        },
    }


def image_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != IGNORE
    scores = []
    for cls in range(len(CLASSES)):
        p, t = (pred == cls) & valid, (truth == cls) & valid
        if p.sum() + t.sum():
            scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores))


def fixed_arrays() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three small images: mixed classes with ignored pixels, a perfect one, one where dog never appears."""
    rng = np.random.default_rng(7)
    truth_a = rng.integers(0, 3, (12, 16)).astype(np.uint8)
    truth_a[:2, :] = IGNORE
    pred_a = truth_a.copy()
    pred_a[rng.random(truth_a.shape) < 0.3] = rng.integers(0, 3)
    pred_a[:2, :] = rng.integers(0, 3, (2, 16))  # predictions on ignored pixels must not count
    truth_b = np.zeros((12, 16), dtype=np.uint8)
    truth_b[3:9, 4:10] = 2
    pred_b = truth_b.copy()
    truth_c = np.zeros((12, 16), dtype=np.uint8)
    truth_c[5:, 8:] = 1
    pred_c = np.zeros_like(truth_c)
    pred_c[6:, 9:] = 1
    pred_c[0, 0] = 2  # a false dog pixel where no dog exists
    return [pred_a, pred_b, pred_c], [truth_a, truth_b, truth_c]


def test_metrics_match_independent_numpy() -> None:
    from tasks.metrics import SampleKeepingIoUMetric, sample_dice
    from tasks.train import metrics_from_flat

    preds, truths = fixed_arrays()
    # the evaluate stage's path: mmseg's metric processes data samples, Runner.test calls evaluate()
    metric = SampleKeepingIoUMetric(iou_metrics=["mIoU", "mDice"], ignore_index=IGNORE)
    metric.dataset_meta = {"classes": CLASSES}
    for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
        sample = {
            "img_path": f"/data/images/test/{i:03d}.png",
            "pred_sem_seg": {"data": torch.from_numpy(pred.astype(np.int64))[None]},
            "gt_sem_seg": {"data": torch.from_numpy(truth.astype(np.int64))[None]},
        }
        metric.process({}, [sample])
    doc = metrics_from_flat(metric.evaluate(len(preds)), CLASSES)

    expected = numpy_metrics(preds, truths)
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):
        assert doc[key] == pytest.approx(expected[key], abs=0.006), key
    for cls in CLASSES:
        for key in ("IoU", "Dice", "Acc"):
            assert doc["per_class"][cls][key] == pytest.approx(expected["per_class"][cls][key], abs=0.006)
    assert [s.stem for s in metric.samples] == ["000", "001", "002"]
    for sample, pred, truth in zip(metric.samples, preds, truths, strict=True):
        assert sample_dice(sample) == pytest.approx(image_dice(pred, truth), abs=1e-6)
    assert sample_dice(metric.samples[1]) == 1.0


def test_absent_class_is_null_and_left_out_of_means() -> None:
    from tasks.metrics import SampleKeepingIoUMetric
    from tasks.train import metrics_from_flat

    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[2:6, 2:6] = 1
    pred = truth.copy()
    pred[2, 2] = 0
    metric = SampleKeepingIoUMetric(iou_metrics=["mIoU", "mDice"], ignore_index=IGNORE)
    metric.dataset_meta = {"classes": CLASSES}
    data = {
        "pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
        "gt_sem_seg": {"data": torch.from_numpy(truth)[None]},
    }
    metric.process({}, [{"img_path": "x.png", **data}])
    doc = metrics_from_flat(metric.evaluate(1), CLASSES)
    assert doc["per_class"]["dog"] == {"IoU": None, "Dice": None, "Acc": None}
    expected = numpy_metrics([pred], [truth])
    assert doc["mDice"] == pytest.approx(expected["mDice"], abs=0.006)  # mean over background and cat


@pytest.mark.slow
def test_evaluate_end_to_end(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """validate -> train h1 (CPU profile, 1 epoch) -> evaluate val and test through the CLI -> cached."""
    from tasks.train import train_experiment

    assert cli.main(["validate", str(tiny_dataset), "--run-id", "e2e"]) == 0
    trained = train_experiment("h1", "e2e", str(tiny_dataset), profile="cpu", max_epochs=1)
    args = ["evaluate", "--experiment", "h1", "--run-id", "e2e", "--split", "val,test", "--panels", "2"]
    capsys.readouterr()
    assert cli.main(args) == 0  # no --dataset: the one the run validated
    assert _last_json(capsys.readouterr().out)["status"] == "evaluated"
    store = st.Store.from_env()
    prefix = st.stage_prefix("e2e", "eval", "h1")
    out = store.fetch(prefix, tmp_path / "eval")

    test = json.loads((out / "test_metrics.json").read_text())
    assert test["experiment"] == "h1" and test["split"] == "test"
    assert test["checkpoint"] == "runs/e2e/train/h1/best.pth" and len(test["checkpoint_sha256"]) == 64
    assert test["dataset_version"] == trained["dataset_version"]
    # the test set's own version (what select compares champion and challenger on)
    assert test["test_set_version"] == split_version(tiny_dataset, "test")
    assert test["samples"] == len(list((tiny_dataset / "images" / "test").iterdir()))
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):
        assert 0 <= test[key] <= 100, key
    assert set(test["per_class"]) == set(CLASSES)
    for values in test["per_class"].values():
        assert set(values) == {"IoU", "Dice", "Acc"}
        assert all(v is None or 0 <= v <= 100 for v in values.values())

    # the best checkpoint's val metrics, recomputed by evaluate, equal what training recorded for it
    val = json.loads((out / "val_metrics.json").read_text())
    assert val["val_set_version"] == split_version(tiny_dataset, "val") != test["test_set_version"]
    assert val["best_epoch"] == trained["best_epoch"]
    assert val["mDice"] == pytest.approx(trained["mDice"], abs=0.011)

    for split, confusion in (("test", "confusion.png"), ("val", "confusion_val.png")):
        doc = json.loads((out / f"{split}_metrics.json").read_text())
        panels = doc["panels"]["best"] + doc["panels"]["worst"]
        assert len(doc["panels"]["best"]) == 2 and len(doc["panels"]["worst"]) == 2
        assert len({p["stem"] for p in panels}) == 4  # the best are never shown again as worst
        dices = [p["dice"] for p in panels]
        assert dices[0] >= dices[1] >= max(dices[2:]) and dices[2] <= dices[3]
        for panel in panels:
            width, height = _png_size(out / panel["file"])
            assert width > 3 * height  # a 1x4 strip
        assert _png_size(out / confusion)[0] > 0
        assert np.array(doc["confusion_matrix"]["counts"]).sum() > 0
        per_image = json.loads((out / f"{split}_per_image.json").read_text())
        assert len(per_image) == doc["samples"]
    assert list((out / "clearml").iterdir())  # the offline ClearML session

    before = store.marker(prefix)
    assert cli.main(args) == 0
    assert _last_json(capsys.readouterr().out)["status"] == "cached"
    assert store.marker(prefix) == before


def test_evaluate_bad_input_exits_2(s3_env: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["evaluate", "--experiment", "h1", "--run-id", "nothing", "--split", "train"]) == 2
    assert cli.main(["evaluate", "--experiment", "h1", "--run-id", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "--split 'train'" in err and "runs/nothing/train/h1 has not published outputs" in err


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _last_json(stdout: str) -> dict:
    # mmengine logs to stdout too: the stage's summary is the last line
    return json.loads(stdout.strip().splitlines()[-1])
