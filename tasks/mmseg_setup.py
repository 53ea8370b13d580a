"""What our mmseg configs need registered: imported by the configs' `custom_imports`.

Loading any config under configs/ imports this module, so train, evaluate and the bench all get
the same registrations (and mmcompat applied, tasks.losses imported) without a separate setup call:
- `StudyDataset`: the study's folder layout (images/<split>, labels/<split>); its samples are exactly
  what `tasks.dataset.list_samples` (validate's definition) finds: .jpg/.jpeg/.png images of any
  case side by side, .png/.PNG masks. `check_loaded_samples` proves it at run time.
- `PadToCrop`: mmcv's Pad to the crop size that also records where it padded, so that images of
  any size share one batch and mmseg cuts the padding off each prediction (the size policy in
  configs/_base_/datasets/study_256x256.py).
- `PerClassIoUMetric`: mmseg's IoUMetric that also returns the per-class values it otherwise only
  prints, so the per-class table of the best epoch is available without another validation pass.
- `ResumableEarlyStoppingHook`: mmengine's EarlyStoppingHook that keeps its patience counter in the
  message hub, so a resumed training stops where the uninterrupted one would have.

And one fix: mmseg 1.2.2's CrossEntropyLoss with `class_weight` (H2) indexes the weights with every
label, ignored ones included, so any 255 pixel (an "ignore" label, or the padding PadToCrop adds
to images of other sizes) fails with IndexError (open-mmlab/mmsegmentation#3734, #3831). Its
weighted mean is given the average factor PyTorch uses (the weights of the non-ignored pixels),
which is mmseg's own value whenever no pixel is ignored.
"""

from __future__ import annotations

import math
import os.path as osp
from pathlib import Path

from tasks import mmcompat

mmcompat.apply()  # before the first mmseg import: mmseg imports mmcv.ops unguarded

from mmcv.transforms import Pad  # noqa: E402
from mmengine.hooks import EarlyStoppingHook  # noqa: E402
from mmseg.datasets import BaseSegDataset  # noqa: E402
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.models.losses import cross_entropy_loss  # noqa: E402
from mmseg.registry import DATASETS, HOOKS, METRICS, TRANSFORMS  # noqa: E402

from tasks import losses  # noqa: E402, F401  registers SoftmaxFocalLoss (the h1_focal experiment)
from tasks.dataset import (  # noqa: E402
    CLASSES,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    list_pairs,
    list_samples,
)
from tasks.errors import InputError  # noqa: E402

_mmseg_cross_entropy = cross_entropy_loss.cross_entropy


def _cross_entropy(pred, label, weight=None, class_weight=None, reduction="mean", avg_factor=None, **kwargs):
    """mmseg's cross_entropy, with a weighted mean over the non-ignored pixels (module docstring)."""
    if class_weight is not None and avg_factor is None and reduction == "mean":
        ignore_index = kwargs.get("ignore_index", -100)
        avg_factor = class_weight[label[label != ignore_index]].sum()
    return _mmseg_cross_entropy(pred, label, weight, class_weight, reduction, avg_factor, **kwargs)


cross_entropy_loss.cross_entropy = _cross_entropy  # CrossEntropyLoss takes it when a model is built

# background black, cat and dog in colours that stay apart in panels and the MinIO console
PALETTE = [[0, 0, 0], [220, 120, 20], [40, 110, 230]]


@DATASETS.register_module()
class StudyDataset(BaseSegDataset):
    """The samples `tasks.dataset.list_samples` finds in data_prefix's image and mask folders.

    The suffixes are tasks.dataset's (IMAGE_SUFFIXES, MASK_SUFFIXES, any case), not parameters: a
    config cannot make training read another set of samples than validate checked.
    """

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("ignore_index", IGNORE_INDEX)
        super().__init__(img_suffix=IMAGE_SUFFIXES, seg_map_suffix=MASK_SUFFIXES[0], **kwargs)

    def load_data_list(self) -> list[dict]:
        root = Path(self.data_root or ".")
        folders = [osp.relpath(self.data_prefix[key], root) for key in ("img_path", "seg_map_path")]
        try:
            pairs = list_samples(root, *folders)
        except InputError as err:  # name the files where this dataset reads them
            raise InputError([f"{root}/{problem}" for problem in err.problems]) from None
        return [
            dict(
                img_path=str(image),
                seg_map_path=str(mask),
                label_map=self.label_map,
                reduce_zero_label=self.reduce_zero_label,
                seg_fields=[],
            )
            for image, mask in pairs
        ]


def check_loaded_samples(dataset: BaseSegDataset, root: Path, split: str, stage: str) -> None:
    """InputError (exit 2) naming each difference unless `dataset` holds exactly the samples of
    `split` that validate counts in root (tasks.dataset.list_pairs on the same, pinned, files).

    Guards what the shared definition alone cannot: a config that selects a subset (`indices`),
    points a loader elsewhere or filters samples.
    """
    root = Path(root)
    expected = {(str(i), str(m)) for i, m in list_pairs(root, split)}
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    loaded = [(str(info["img_path"]), str(info["seg_map_path"])) for info in infos]
    problems = [
        f"{osp.relpath(image, root)}: validated but not loaded by {stage} ({split} split)"
        for image, _ in sorted(expected - set(loaded))
    ]
    problems += [
        f"{osp.relpath(image, root)}: loaded by {stage} but not a validated {split} sample (mask {mask})"
        for image, mask in sorted(set(loaded) - expected)
    ]
    if len(loaded) != len(set(loaded)):
        problems.append(f"{stage}: the {split} dataset loads some samples more than once")
    if problems:
        head = f"{stage}: {len(loaded)} {split} samples loaded, {len(expected)} validated in {root}"
        raise InputError([head, *problems])


@TRANSFORMS.register_module()
class PadToCrop(Pad):
    """Pad the image (and the masks loaded so far) at the bottom and right to crop_size (h, w).

    Besides mmcv's Pad keys it records `img_padding_size` = [left, right, top, bottom], the key
    mmseg's segmentors read to cut the padding off a prediction before resizing it to the mask's
    own resolution (pack it with PackSegInputs' meta_keys). Image pixels pad with 0, masks with
    seg_pad_val (255: ignored by the loss). An image larger than the crop is a pipeline error.
    """

    def __init__(self, crop_size: tuple[int, int], seg_pad_val: int = IGNORE_INDEX) -> None:
        height, width = crop_size
        super().__init__(size=(width, height), pad_val=dict(img=0, seg=seg_pad_val))

    def transform(self, results: dict) -> dict:
        height, width = results["img"].shape[:2]
        crop_width, crop_height = self.size
        if height > crop_height or width > crop_width:
            raise ValueError(
                f"{results.get('img_path')}: image is {width}x{height} after resizing, larger than the "
                f"{crop_width}x{crop_height} crop PadToCrop pads to (resize or crop it first)"
            )
        results = super().transform(results)
        results["img_padding_size"] = [0, crop_width - width, 0, crop_height - height]
        return results


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """IoUMetric whose result also holds `IoU.<class>`, `Dice.<class>`, `Acc.<class>` (percent).

    The summary keys (aAcc, mIoU, mAcc, mDice) come from IoUMetric unchanged; the per-class values
    use IoUMetric's own `total_area_to_metrics` and rounding. A class absent from both truth and
    prediction has no defined IoU/Dice: its value is None, never NaN (it goes to JSON).
    """

    def compute_metrics(self, results: list) -> dict[str, float | None]:
        metrics = super().compute_metrics(results)
        totals = [sum(column) for column in zip(*results, strict=True)]
        per_class = self.total_area_to_metrics(*totals, self.metrics, self.nan_to_num, self.beta)
        per_class.pop("aAcc", None)
        for name, values in per_class.items():
            for cls, value in zip(self.dataset_meta["classes"], values, strict=True):
                value = float(value)
                metrics[f"{name}.{cls}"] = None if math.isnan(value) else round(value * 100, 2)
        return metrics


@HOOKS.register_module()
class ResumableEarlyStoppingHook(EarlyStoppingHook):
    """EarlyStoppingHook whose state (best score, patience counter) survives a resume."""

    _INFO_KEY = "early_stopping"

    def before_train(self, runner) -> None:
        state = runner.message_hub.get_info(self._INFO_KEY)
        if state:  # restored from the checkpoint by runner.resume()
            self.best_score, self.wait_count = state["best_score"], state["wait_count"]
            if self.wait_count >= self.patience:  # it had stopped the training before the interruption
                runner.train_loop.stop_training = True

    def after_val_epoch(self, runner, metrics: dict) -> None:
        super().after_val_epoch(runner, metrics)
        runner.message_hub.update_info(
            self._INFO_KEY, dict(best_score=self.best_score, wait_count=self.wait_count)
        )
