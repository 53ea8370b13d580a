"""The pipeline's metric JSON, and mmseg's IoUMetric extended to keep what evaluate plots.

Every number comes from mmseg: the summary (aAcc, mIoU, mAcc, mDice) from `IoUMetric.compute_metrics`,
per-class IoU/Dice/Acc from tasks.mmseg_setup.PerClassIoUMetric (IoUMetric's own
`total_area_to_metrics`), the per-image Dice from `total_area_to_metrics` applied to the areas
`IoUMetric.intersect_and_union` computed for that image. Values are in percent, as mmseg reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mmseg.evaluation import IoUMetric  # mmseg's metrics import no mmcv op: no mmcompat needed first
from mmseg.registry import METRICS

from tasks.experiments import SUMMARY_KEYS
from tasks.mmseg_setup import PerClassIoUMetric


@dataclass
class Sample:
    """One evaluated image: its path, prediction and truth (H, W uint8) and mmseg's four areas."""

    img_path: str
    pred: np.ndarray
    truth: np.ndarray
    areas: tuple

    @property
    def stem(self) -> str:
        return Path(self.img_path).stem


def sample_dice(sample: Sample) -> float:
    """Mean Dice (fraction) of one image over the classes in its truth or prediction (NaN if none)."""
    dice = IoUMetric.total_area_to_metrics(*sample.areas, metrics=["mDice"])["Dice"]
    present = dice[~np.isnan(dice)]
    return float(present.mean()) if present.size else float("nan")


@METRICS.register_module()
class SampleKeepingIoUMetric(PerClassIoUMetric):
    """PerClassIoUMetric that also keeps every sample's prediction, truth and areas (in order)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.samples: list[Sample] = []

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        first = len(self.results)
        super().process(data_batch, data_samples)
        for offset, data_sample in enumerate(data_samples):
            self.samples.append(
                Sample(
                    img_path=str(data_sample["img_path"]),
                    pred=data_sample["pred_sem_seg"]["data"].squeeze().cpu().numpy().astype(np.uint8),
                    truth=data_sample["gt_sem_seg"]["data"].squeeze().cpu().numpy().astype(np.uint8),
                    areas=self.results[first + offset],
                )
            )


def metrics_document(summary: dict, per_class: dict) -> dict:
    """The contract's metric JSON core: aAcc, mIoU, mAcc, mDice (percent) and per_class."""
    missing = [key for key in SUMMARY_KEYS if summary.get(key) is None]
    if missing:
        raise ValueError(f"mmseg's IoUMetric returned no {missing} (got {sorted(summary)})")
    # mmseg rounds to 2 decimals in float32; round again so the JSON holds 90.39, not 90.38999938964844.
    doc = {key: round(float(summary[key]), 2) for key in SUMMARY_KEYS}
    doc["per_class"] = per_class
    return doc
