"""The registrations our configs import: the study dataset, the per-class metric."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.dataset import CLASSES
from tasks.errors import InputError
from tasks.train import load_experiment_config


def _train_dataset_cfg(root: Path) -> dict:
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")  # as the Runner does (default_scope): mmseg's transforms, not mmcv's
    return load_experiment_config("h1", "full", dataset_root=root).train_dataloader.dataset


def test_study_dataset_reads_jpg_and_png_side_by_side(tiny_dataset: Path, tmp_path: Path) -> None:
    from mmseg.registry import DATASETS

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    pngs = sorted((root / "images" / "train").glob("*.png"))
    for png in pngs[::2]:  # half the images become JPEG, as in the study
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    dataset = DATASETS.build(_train_dataset_cfg(root))
    assert len(dataset) == len(pngs)
    suffixes = {Path(dataset.get_data_info(i)["img_path"]).suffix for i in range(len(dataset))}
    assert suffixes == {".jpg", ".png"}
    assert dataset.metainfo["classes"] == CLASSES
    assert len(dataset.metainfo["palette"]) == len(CLASSES)
    sample = dataset[0]  # the real pipeline: load, resize, flip, pack
    assert tuple(sample["inputs"].shape) == (3, 256, 256)
    assert set(np.unique(sample["data_samples"].gt_sem_seg.data.numpy())) <= {0, 1, 2, 255}


def test_study_dataset_names_a_missing_mask(tiny_dataset: Path, tmp_path: Path) -> None:
    from mmseg.registry import DATASETS

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    mask = sorted((root / "labels" / "train").glob("*.png"))[3]
    mask.unlink()
    with pytest.raises(InputError, match=f"{mask}: mask missing for image"):
        DATASETS.build(_train_dataset_cfg(root))


def test_per_class_metric_matches_numpy_on_fixed_arrays() -> None:
    from mmengine.structures import PixelData
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import METRICS
    from mmseg.structures import SegDataSample

    truth = np.array([[0, 0, 1, 1], [0, 2, 2, 255], [0, 0, 0, 0], [1, 1, 0, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2], [0, 0, 0, 0], [1, 0, 0, 2]])
    sample = SegDataSample()
    sample.gt_sem_seg = PixelData(data=torch.from_numpy(truth)[None])
    sample.pred_sem_seg = PixelData(data=torch.from_numpy(pred)[None])
    outputs = {}
    for name in ("PerClassIoUMetric", "IoUMetric"):
        metric = METRICS.build(dict(type=name, iou_metrics=["mIoU", "mDice"]))
        metric.dataset_meta = dict(classes=CLASSES)
        metric.process({}, [sample.to_dict()])
        outputs[name] = metric.evaluate(1)
    ours, mmseg = outputs["PerClassIoUMetric"], outputs["IoUMetric"]
    assert isinstance(METRICS.build(dict(type="PerClassIoUMetric")), IoUMetric)
    for key in ("aAcc", "mIoU", "mAcc", "mDice"):  # the summary is mmseg's, unchanged
        assert ours[key] == mmseg[key]
    valid = truth != 255
    for index, cls in enumerate(CLASSES):
        t, p = (truth == index) & valid, (pred == index) & valid
        inter = (t & p).sum()
        assert ours[f"IoU.{cls}"] == pytest.approx(100 * inter / (t | p).sum(), abs=0.01)
        assert ours[f"Dice.{cls}"] == pytest.approx(100 * 2 * inter / (t.sum() + p.sum()), abs=0.01)
        assert ours[f"Acc.{cls}"] == pytest.approx(100 * inter / t.sum(), abs=0.01)
    dice = [ours[f"Dice.{cls}"] for cls in CLASSES]
    assert ours["mDice"] == pytest.approx(np.mean(dice), abs=0.01)
