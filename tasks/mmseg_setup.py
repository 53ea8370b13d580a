"""What our mmseg configs need registered: imported by the configs' `custom_imports`.

Loading any config under configs/ imports this module, so train, evaluate and the bench all get
the same three registrations (and mmcompat applied) without a separate setup call:
- `StudyDataset`: the study's folder layout (images/<split>, labels/<split>), .jpg and .png images
  side by side (the study has jpg, the generated dataset png), classes from tasks.dataset.
- `PerClassIoUMetric`: mmseg's IoUMetric that also returns the per-class values it otherwise only
  prints, so the per-class table of the best epoch is available without another validation pass.
- `ResumableEarlyStoppingHook`: mmengine's EarlyStoppingHook that keeps its patience counter in the
  message hub, so a resumed training stops where the uninterrupted one would have.
"""

from __future__ import annotations

import math
import os
import os.path as osp

from tasks import mmcompat

mmcompat.apply()  # before the first mmseg import: mmseg imports mmcv.ops unguarded

from mmengine.hooks import EarlyStoppingHook  # noqa: E402
from mmseg.datasets import BaseSegDataset  # noqa: E402
from mmseg.evaluation import IoUMetric  # noqa: E402
from mmseg.registry import DATASETS, HOOKS, METRICS  # noqa: E402

from tasks.dataset import CLASSES, IGNORE_INDEX  # noqa: E402
from tasks.errors import InputError  # noqa: E402

# background black, cat and dog in colours that stay apart in panels and the MinIO console
PALETTE = [[0, 0, 0], [220, 120, 20], [40, 110, 230]]
IMAGE_SUFFIXES = (".jpg", ".png")


@DATASETS.register_module()
class StudyDataset(BaseSegDataset):
    """images/<split>/<stem>.jpg|png with labels/<split>/<stem>.png (values 0..2, 255 ignored)."""

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, img_suffix: tuple[str, ...] = IMAGE_SUFFIXES, **kwargs) -> None:
        kwargs.setdefault("ignore_index", IGNORE_INDEX)
        super().__init__(img_suffix=tuple(img_suffix), **kwargs)

    def load_data_list(self) -> list[dict]:
        img_dir = self.data_prefix["img_path"]
        ann_dir = self.data_prefix["seg_map_path"]
        if not osp.isdir(img_dir):
            raise InputError(f"{img_dir}: image folder missing")
        data_list, missing = [], []
        for name in sorted(f for f in _listdir(img_dir) if f.lower().endswith(self.img_suffix)):
            seg_map = osp.join(ann_dir, osp.splitext(name)[0] + self.seg_map_suffix)
            if not osp.isfile(seg_map):
                missing.append(f"{seg_map}: mask missing for image {osp.join(img_dir, name)}")
            data_list.append(
                dict(
                    img_path=osp.join(img_dir, name),
                    seg_map_path=seg_map,
                    label_map=self.label_map,
                    reduce_zero_label=self.reduce_zero_label,
                    seg_fields=[],
                )
            )
        if missing:
            raise InputError(missing)
        if not data_list:
            raise InputError(f"{img_dir}: no {' or '.join(self.img_suffix)} images")
        return data_list


def _listdir(path: str) -> list[str]:
    return [e.name for e in os.scandir(path) if e.is_file()]  # follows the dataset view's symlinks


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
