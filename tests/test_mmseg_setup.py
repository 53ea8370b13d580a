"""The registrations our configs import: the study dataset, the per-class metric."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.dataset import CLASSES, list_pairs
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
    image = root / "images" / "train" / mask.name
    with pytest.raises(InputError, match=f"{image}: image without mask \\(labels/train/{mask.name}\\)"):
        DATASETS.build(_train_dataset_cfg(root))


def test_study_dataset_takes_no_suffixes_of_its_own(tiny_dataset: Path) -> None:
    """The sample definition is tasks.dataset's: a config cannot narrow it (the old copy lacked .jpeg)."""
    from mmseg.registry import DATASETS

    cfg = _train_dataset_cfg(tiny_dataset)
    with pytest.raises(TypeError, match="img_suffix"):
        DATASETS.build({**cfg, "img_suffix": ".jpg"})


def test_a_loaded_subset_is_refused_naming_the_missing_samples(tiny_dataset: Path) -> None:
    from mmseg.registry import DATASETS

    from tasks.mmseg_setup import check_loaded_samples

    full = DATASETS.build(_train_dataset_cfg(tiny_dataset))
    check_loaded_samples(full, tiny_dataset, "train", "training")  # the validated set: passes
    subset = DATASETS.build({**_train_dataset_cfg(tiny_dataset), "indices": 5})  # mmengine's own option
    pairs = list_pairs(tiny_dataset, "train")
    with pytest.raises(InputError) as caught:
        check_loaded_samples(subset, tiny_dataset, "train", "training")
    assert (
        caught.value.problems[0]
        == f"training: 5 train samples loaded, {len(pairs)} validated in {tiny_dataset}"
    )
    assert caught.value.problems[1:] == [
        f"images/train/{image.name}: validated but not loaded by training (train split)"
        for image, _ in pairs[5:]
    ]
    with pytest.raises(InputError, match="loaded by evaluation but not a validated val sample"):
        check_loaded_samples(full, tiny_dataset, "val", "evaluation")


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


def _non_square_dataset(tiny_dataset: Path, root: Path, size: tuple[int, int] = (90, 40)) -> Path:
    """A copy of the tiny dataset whose first val and train samples are `size` (width, height)."""
    shutil.copytree(tiny_dataset, root)
    for split in ("train", "val"):
        image, mask = list_pairs(root, split)[0]
        Image.open(image).resize(size, Image.Resampling.BILINEAR).save(image)
        Image.open(mask).resize(size, Image.Resampling.NEAREST).save(mask)
    return root


@pytest.mark.parametrize("experiment", ["h1", "exp1"])
def test_train_pipelines_bring_any_size_to_the_crop(
    tiny_dataset: Path, tmp_path: Path, experiment: str
) -> None:
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    root = _non_square_dataset(tiny_dataset, tmp_path / "ds")
    init_default_scope("mmseg")
    cfg = load_experiment_config(experiment, "full", dataset_root=root).train_dataloader.dataset
    sample = DATASETS.build(cfg)[0]  # the 90x40 image
    assert tuple(sample["inputs"].shape) == (3, 256, 256)
    truth = sample["data_samples"].gt_sem_seg.data.numpy()[0]
    assert truth.shape == (256, 256)
    # the padding is ignored by the loss; the image's own pixels keep their labels
    assert (truth == 255).any() and set(np.unique(truth)) <= {0, 1, 2, 255}


def test_test_pipeline_pads_and_predictions_lose_the_padding(tiny_dataset: Path, tmp_path: Path) -> None:
    """A 90x40 image is scaled to 256x114, padded to 256x256; a prediction comes back at 90x40
    and holds only what the model said about the image, nothing of the padding."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, MODELS

    root = _non_square_dataset(tiny_dataset, tmp_path / "ds")
    init_default_scope("mmseg")
    cfg = load_experiment_config("h1", "cpu", dataset_root=root)
    dataset = DATASETS.build(cfg.val_dataloader.dataset)
    small, square = dataset[0], dataset[1]
    assert tuple(small["inputs"].shape) == tuple(square["inputs"].shape) == (3, 128, 128)  # one batch
    meta = small["data_samples"].metainfo
    assert meta["ori_shape"] == (40, 90) and meta["img_padding_size"] == [0, 0, 0, 128 - 57]
    assert small["data_samples"].gt_sem_seg.data.shape[-2:] == (40, 90)  # the mask as stored
    # logits: class 1 over the scaled image, class 2 over the padding
    logits = torch.zeros(1, 3, 128, 128)
    logits[0, 1, :57, :] = 1
    logits[0, 2, 57:, :] = 1
    model = MODELS.build(cfg.model)
    (result,) = model.postprocess_result(logits, [small["data_samples"]])
    pred = result.pred_sem_seg.data.numpy()[0]
    assert pred.shape == (40, 90) and set(np.unique(pred)) == {1}


def test_class_weighted_cross_entropy_takes_ignored_pixels() -> None:
    """H2's loss on masks with 255 pixels (ignore labels, padding): mmseg 1.2.2 raised IndexError."""
    import torch.nn.functional as F
    from mmseg.registry import MODELS

    import tasks.mmseg_setup as setup

    weights = [0.0585, 1.0, 1.0]
    loss = MODELS.build(
        dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, class_weight=weights)
    )
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    # without ignored pixels: exactly mmseg's own value
    mmseg_value = setup._mmseg_cross_entropy(
        logits, labels, class_weight=torch.tensor(weights), ignore_index=255
    )
    assert float(loss(logits, labels, ignore_index=255)) == pytest.approx(float(mmseg_value))
    # with them: PyTorch's weighted mean over the pixels that are not ignored
    labels[0, :, 5:] = 255
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(weights), ignore_index=255)
    assert float(loss(logits, labels, ignore_index=255)) == pytest.approx(float(expected))
