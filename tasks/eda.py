"""EDA stage: class shares, object areas and tiny components per split, plots, suspicious-mask scores.

    python -m tasks eda --run-id ID --dataset URI [--tiny-area 100]

Masks are streamed one at a time (memory grows only with the number of objects, a few ints each),
so the cost is linear in the number of masks. Geometry comes from tasks.masks; the scorer here is
also what relabel uses when the EDA report is not published.

Suspicious-mask score (train masks; no model involved). Each signal becomes evidence e in [0, 1]:
- tiny:    components under --tiny-area px (the study's annotation noise). A stray one, farther than
           STRAY_PX from every bigger object of its class, counts 1; one next to such an object counts
           NEAR_WEIGHT (it may be a real piece of that animal seen past an occluder): e = 1 - 0.5**count
- blocky:  the blockiest object's share of contour in axis-parallel straight runs (masks.blockiness): a
           staircase outline from a coarse annotation grid or an upscaled low-resolution mask; smooth
           outlines run straight only near their extremes. Ramp BLOCKY_RAMP
- straight: the straightest object's share of outline on long edges of its polygon fit along which
           the outline does not bend (masks.straightness): a hasty polygon of a few clicks,
           which cuts off ears, paws and tails; natural outlines are curved almost everywhere (legs
           have some straight sides). Ramp STRAIGHT_RAMP
- rough:   the roughest object's contour length over its smoothed contour length, minus 1 (zig-zag
           jags); ~0.06 for a clean disk, but legs, ears and tails add up to ~0.35 on their own, so the
           ramp ROUGH_RAMP starts above that
- holes:   regions an object encloses (occluders in front of an animal make real ones): 1 - 0.5**count
- border:  an object touching the image edge and lying wholly within a few px of it (a strip along the
           frame, touching nothing but the border): 1 if any
- area:    a class's main (largest, non-tiny) object far from its typical size, e.g. half an animal:
           robust z of its log area against the median and MAD over all train masks (the spread floored
           at LOG_AREA_SIGMA_FLOOR, so a uniform dataset does not make every small difference an
           outlier). Ramp AREA_Z_RAMP
The score combines them as a noisy-OR, 1 - prod(1 - w_i * e_i), where w_i says how far one signal alone
is trusted to mean "bad mask": the weak ones (holes, border) are below SCORE_THRESHOLD, so they flag a
mask only together with other evidence. A mask is flagged when its score reaches SCORE_THRESHOLD.
Ramps, weights and the threshold were set from the distributions of each signal over clean and injected
defective masks of generated datasets (tasks.synth, several seeds), never from individual masks;
bench/relabel_quality.py measures the resulting precision and recall.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tasks import masks, store, tracking
from tasks.dataset import CLASSES, IGNORE_INDEX, SPLITS, list_pairs, read_image, read_mask
from tasks.errors import InputError
from tasks.materialize import materialize_dataset
from tasks.stage import Stage, add_recompute_argument

log = logging.getLogger(__name__)

TINY_AREA = 100
FOREGROUND = tuple(range(1, len(CLASSES)))  # class ids that form objects (background does not)
STRAY_PX = 32.0
NEAR_WEIGHT = 0.15
BLOCKY_RAMP = (0.65, 0.9)
STRAIGHT_RAMP = (0.6, 0.72)
ROUGH_RAMP = (0.35, 0.7)
AREA_Z_RAMP = (3.0, 4.5)
LOG_AREA_SIGMA_FLOOR = 0.25
SIGNAL_WEIGHTS = {
    "tiny": 0.8,
    "blocky": 0.9,
    "straight": 0.9,
    "rough": 0.6,
    "holes": 0.25,
    "border": 0.25,
    "area": 0.6,
}
SCORE_THRESHOLD = 0.5
# Bumped whenever the scorer's definition changes, so cached EDA outputs are recomputed.
SCORER_VERSION = 3
GRID_SIZE = 16  # masks in the suspicious-masks plot
QUANTILES = {"p25": 25, "median": 50, "p75": 75}


def scorer_settings(tiny_area: int) -> dict[str, Any]:
    """Everything the scores depend on besides the data (recorded in the report and the cache key)."""
    return {
        "tiny_area": tiny_area,
        "version": SCORER_VERSION,
        "weights": SIGNAL_WEIGHTS,
        "threshold": SCORE_THRESHOLD,
        "stray_px": STRAY_PX,
        "near_weight": NEAR_WEIGHT,
        "blocky_ramp": BLOCKY_RAMP,
        "straight_ramp": STRAIGHT_RAMP,
        "poly_tolerance": masks.POLY_TOLERANCE,
        "straight_edge": masks.STRAIGHT_EDGE,
        "max_bulge": masks.MAX_BULGE,
        "rough_ramp": ROUGH_RAMP,
        "area_z_ramp": AREA_Z_RAMP,
        "log_area_sigma_floor": LOG_AREA_SIGMA_FLOOR,
        "contour_sigma": masks.CONTOUR_SIGMA,
        "block_run": masks.BLOCK_RUN,
        "border_band": masks.BORDER_BAND,
    }


def mask_key(split: str, mask_path: Path) -> str:
    """A mask's name in reports: its path relative to the dataset root (bad_mask_paths.json style)."""
    return f"labels/{split}/{mask_path.name}"


# ---------------------------------------------------------------- per-split statistics


def area_summary(areas: np.ndarray) -> dict[str, float | int | None]:
    if areas.size == 0:
        return {"count": 0, "min": None, **dict.fromkeys(QUANTILES), "max": None, "mean": None, "std": None}
    q = np.percentile(areas, list(QUANTILES.values()))
    return {
        "count": int(areas.size),
        "min": int(areas.min()),
        **{name: float(v) for name, v in zip(QUANTILES, q, strict=True)},
        "max": int(areas.max()),
        "mean": float(areas.mean()),
        "std": float(areas.std()),
    }


@dataclass
class SplitStats:
    """Running totals of one split; object areas are kept (one int per object) for exact quantiles."""

    tiny_area: int
    images: int = 0
    pixel_counts: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    images_with: np.ndarray = field(default_factory=lambda: np.zeros(len(CLASSES), np.int64))
    masks_with_tiny: int = 0
    areas: dict[int, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in FOREGROUND})

    def add(self, geom: masks.MaskGeometry) -> None:
        self.images += 1
        self.pixel_counts += geom.pixel_counts
        self.images_with += geom.pixel_counts[: len(CLASSES)] > 0
        self.masks_with_tiny += any((g.areas < self.tiny_area).any() for g in geom.classes.values())
        for c, g in geom.classes.items():
            self.areas[c].append(g.areas)

    def class_areas(self, c: int) -> np.ndarray:
        return np.concatenate(self.areas[c]) if self.areas[c] else np.zeros(0, np.int64)

    def summary(self) -> dict[str, Any]:
        labelled = self.pixel_counts[: len(CLASSES)].sum()
        total = self.pixel_counts.sum()
        other = total - labelled - self.pixel_counts[IGNORE_INDEX]
        objects = {CLASSES[c]: self.class_areas(c) for c in FOREGROUND}
        return {
            "images": self.images,
            # Shares over labelled pixels (ignore excluded), as the study reports them.
            "pixel_share": {n: _ratio(self.pixel_counts[i], labelled) for i, n in enumerate(CLASSES)},
            "ignore_share": _ratio(self.pixel_counts[IGNORE_INDEX], total),
            "unexpected_value_pixels": int(other),
            "image_share": {n: _ratio(self.images_with[i], self.images) for i, n in enumerate(CLASSES)},
            "object_areas": {n: area_summary(a) for n, a in objects.items()},
            "tiny_components": {
                "threshold_px": self.tiny_area,
                "per_class": {n: int((a < self.tiny_area).sum()) for n, a in objects.items()},
                "masks_with_tiny": self.masks_with_tiny,
            },
        }


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


# ---------------------------------------------------------------- suspicious-mask scoring


@dataclass(frozen=True)
class MaskSignals:
    """Raw, model-free signals of one mask (small: kept for every train mask until scoring)."""

    tiny_stray: int
    tiny_near: int
    blocky: float  # max over measured objects; 0 when none measured
    straight: float  # idem
    rough: float  # idem
    holes: int
    border: int
    main_area: dict[int, int]  # class -> area of its largest object, for classes with a non-tiny one


def _max(values: Iterable[np.ndarray]) -> float:
    finite = [v[~np.isnan(v)] for v in values]
    finite = [v for v in finite if v.size]
    return float(max(v.max() for v in finite)) if finite else 0.0


def mask_signals(geom: masks.MaskGeometry, tiny_area: int) -> MaskSignals:
    classes = geom.classes.values()
    tiny = [g.isolation[g.areas < tiny_area] for g in classes]
    return MaskSignals(
        tiny_stray=int(sum((t > STRAY_PX).sum() for t in tiny)),
        tiny_near=int(sum((t <= STRAY_PX).sum() for t in tiny)),
        blocky=_max(g.blockiness for g in classes),
        straight=_max(g.straightness for g in classes),
        rough=_max(g.roughness for g in classes),
        holes=sum(g.hole_count for g in classes),
        border=int(sum(g.border_sliver.sum() for g in classes)),
        main_area={
            c: int(g.areas.max()) for c, g in geom.classes.items() if g.areas.max(initial=0) >= tiny_area
        },
    )


def _ramp(x: float, ramp: tuple[float, float]) -> float:
    return float(np.clip((x - ramp[0]) / (ramp[1] - ramp[0]), 0.0, 1.0))


def _log_area_reference(signals: Iterable[MaskSignals]) -> dict[int, tuple[float, float]]:
    """Per class: median and robust sigma (1.4826 * MAD, floored) of the log area of the main object."""
    signals = list(signals)
    ref = {}
    for c in FOREGROUND:
        logs = np.log([s.main_area[c] for s in signals if c in s.main_area])
        if logs.size < 5:  # too few objects for a meaningful spread: no area evidence for this class
            continue
        med = float(np.median(logs))
        ref[c] = (med, max(1.4826 * float(np.median(np.abs(logs - med))), LOG_AREA_SIGMA_FLOOR))
    return ref


def evidence(s: MaskSignals, area_z: float) -> dict[str, float]:
    return {
        "tiny": 1 - 0.5 ** (s.tiny_stray + NEAR_WEIGHT * s.tiny_near),
        "blocky": _ramp(s.blocky, BLOCKY_RAMP),
        "straight": _ramp(s.straight, STRAIGHT_RAMP),
        "rough": _ramp(s.rough, ROUGH_RAMP),
        "holes": 1 - 0.5**s.holes,
        "border": float(s.border > 0),
        "area": _ramp(area_z, AREA_Z_RAMP),
    }


def score_signals(
    named: list[tuple[str, MaskSignals]], weights: dict[str, float] = SIGNAL_WEIGHTS
) -> list[dict[str, Any]]:
    """Scores of every mask, sorted by score (desc), each with its raw signals and evidence."""
    ref = _log_area_reference(s for _, s in named)
    scored = []
    for name, s in named:
        z = max(
            [
                abs(math.log(s.main_area[c]) - med) / sigma
                for c, (med, sigma) in ref.items()
                if c in s.main_area
            ],
            default=0.0,
        )
        ev = evidence(s, z)
        score = 1 - math.prod(1 - weights[k] * e for k, e in ev.items())
        signals = {
            "tiny_stray": s.tiny_stray,
            "tiny_near": s.tiny_near,
            "blocky": round(s.blocky, 4),
            "straight": round(s.straight, 4),
            "rough": round(s.rough, 4),
            "holes": s.holes,
            "border": s.border,
            "area_z": round(z, 3),
        }
        scored.append(
            {
                "mask": name,
                "score": round(score, 4),
                "signals": signals,
                "evidence": {k: round(e, 4) for k, e in ev.items()},
            }
        )
    scored.sort(key=lambda r: (-r["score"], r["mask"]))
    return scored


def iter_geometry(root: Path, split: str, tiny_area: int) -> Iterator[tuple[Path, masks.MaskGeometry]]:
    for _, mask_path in tqdm(list_pairs(root, split), desc=f"eda {split}", unit="mask", mininterval=2):
        yield mask_path, masks.mask_geometry(read_mask(mask_path), FOREGROUND, tiny_area)


def score_dataset(root: Path, tiny_area: int = TINY_AREA) -> list[dict[str, Any]]:
    """Suspicious-mask scores of every train mask (what relabel uses when EDA did not publish)."""
    named = [
        (mask_key("train", path), mask_signals(geom, tiny_area))
        for path, geom in iter_geometry(root, "train", tiny_area)
    ]
    return score_signals(named)


# ---------------------------------------------------------------- plots

# Overlay colours per class id (background transparent, ignore grey).
CLASS_COLOURS = {1: (1.0, 0.55, 0.0), 2: (0.1, 0.45, 1.0), IGNORE_INDEX: (0.6, 0.6, 0.6)}


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An RGB image (uint8) with the mask's classes painted over it in CLASS_COLOURS; floats in [0, 1]."""
    out = image.astype(np.float64) / 255
    for value, colour in CLASS_COLOURS.items():
        out[mask == value] = 0.45 * out[mask == value] + 0.55 * np.array(colour)
    return out


def write_plots(
    root: Path,
    out_dir: Path,
    summaries: dict[str, dict[str, Any]],
    split_stats: dict[str, SplitStats],
    top: list[dict[str, Any]],
) -> list[str]:
    """class_shares.png, object_areas.png and suspicious_masks.png; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers
    import matplotlib.pyplot as plt

    splits = list(split_stats)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(splits), 1)
    for ax, key, title in (
        (axes[0], "pixel_share", "pixel share per class (log)"),
        (axes[1], "image_share", "share of images containing the class"),
    ):
        for i, split in enumerate(splits):
            values = [summaries[split][key][n] or 0.0 for n in CLASSES]
            ax.bar(np.arange(len(CLASSES)) + i * width, values, width, label=split)
        ax.set_xticks(np.arange(len(CLASSES)) + width * (len(splits) - 1) / 2, CLASSES)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "class_shares.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 2 * len(splits) * len(FOREGROUND)), 4.5))
    data, labels = [], []
    for c in FOREGROUND:
        for split in splits:
            data.append(np.maximum(split_stats[split].class_areas(c), 1))
            labels.append(f"{CLASSES[c]}\n{split}")
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(np.arange(1, len(labels) + 1), labels)
    ax.set_yscale("log")
    tiny = next(iter(split_stats.values())).tiny_area if split_stats else TINY_AREA
    ax.axhline(tiny, color="red", linestyle="--", linewidth=1, label=f"tiny (< {tiny} px)")
    ax.set_ylabel("object area (px, log)")
    ax.set_title("connected-component areas per class and split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "object_areas.png", dpi=100)
    plt.close(fig)

    images = {mask_key("train", m): i for i, m in list_pairs(root, "train")} if top else {}
    cols = 4
    rows = max(1, math.ceil(len(top) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), top, strict=False):
        ax.imshow(overlay(read_image(images[rec["mask"]]), read_mask(root / rec["mask"])))
        strong = [k for k, e in rec["evidence"].items() if e > 0]
        ax.set_title(f"{Path(rec['mask']).stem}\nscore {rec['score']:.2f}: {', '.join(strong)}", fontsize=8)
    fig.suptitle("most suspicious train masks (orange cat, blue dog, grey ignore)")
    fig.tight_layout()
    fig.savefig(out_dir / "suspicious_masks.png", dpi=100)
    plt.close(fig)
    return ["class_shares.png", "object_areas.png", "suspicious_masks.png"]


# ---------------------------------------------------------------- the stage


def run_eda(
    root: Path,
    out_dir: Path,
    tiny_area: int = TINY_AREA,
    splits: tuple[str, ...] = SPLITS,
    dataset_info: dict[str, str] | None = None,
) -> dict:
    """Compute the EDA of a local dataset; writes report.json and the plots into out_dir."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    split_stats: dict[str, SplitStats] = {}
    named: list[tuple[str, MaskSignals]] = []
    for split in splits:
        stats = SplitStats(tiny_area)
        for mask_path, geom in iter_geometry(root, split, tiny_area):
            stats.add(geom)
            if split == "train":
                named.append((mask_key(split, mask_path), mask_signals(geom, tiny_area)))
        split_stats[split] = stats
        summaries[split] = stats.summary()
    suspicious = score_signals(named)
    report = {
        "dataset": dataset_info or {"root": str(root)},
        "splits": summaries,
        "scorer": scorer_settings(tiny_area),
        "score_threshold": SCORE_THRESHOLD,
        "flagged": sum(r["score"] >= SCORE_THRESHOLD for r in suspicious),
        "suspicious": suspicious,
    }
    measured = time.perf_counter()
    report["plots"] = write_plots(root, out_dir, summaries, split_stats, suspicious[:GRID_SIZE])
    # Measuring grows with the masks; plotting is a fixed cost: both shown for capacity planning.
    report["seconds"] = {
        "masks": round(measured - start, 3),
        "plots": round(time.perf_counter() - measured, 3),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def report_to_clearml(tracker: tracking.Tracker, report: dict, out_dir: Path) -> None:
    """Per split: class pixel/image shares, object-area summaries, tiny components (scalars at
    iteration 0, one title per table); the suspicious-mask counts; the plots as debug images."""
    for split, summary in report["splits"].items():
        for key, title in (("pixel_share", "pixel share"), ("image_share", "image share")):
            for cls, value in summary[key].items():
                if value is not None:
                    tracker.report_scalar(f"{split} {title}", cls, value, 0)
        for key in ("images", "ignore_share", "unexpected_value_pixels"):
            tracker.report_scalar(f"{split} masks", key, summary[key], 0)
        for cls, areas in summary["object_areas"].items():
            for stat, value in areas.items():
                if value is not None:
                    tracker.report_scalar(f"{split} {cls} object area (px)", stat, value, 0)
        tiny = summary["tiny_components"]
        for cls, count in tiny["per_class"].items():
            tracker.report_scalar(f"{split} tiny components", cls, count, 0)
        tracker.report_scalar(f"{split} tiny components", "masks_with_tiny", tiny["masks_with_tiny"], 0)
    tracker.report_scalar("suspicious train masks", "flagged", report["flagged"], 0)
    tracker.report_scalar("suspicious train masks", "scored", len(report["suspicious"]), 0)
    for name in report["plots"]:
        tracker.report_image("eda plots", Path(name).stem, out_dir / name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, help="pipeline run id")
    parser.add_argument("--dataset", required=True, help="dataset: local directory or s3://bucket/prefix")
    parser.add_argument(
        "--tiny-area",
        type=int,
        default=TINY_AREA,
        help=f"components under this many px are tiny (default {TINY_AREA})",
    )
    add_recompute_argument(parser)


def check_tiny_area(tiny_area: int) -> int:
    """--tiny-area as eda and relabel take it: at least one pixel."""
    if tiny_area < 1:
        raise InputError(f"--tiny-area must be >= 1 px (got {tiny_area})")
    return tiny_area


def main(args: argparse.Namespace) -> int:
    run_id = store.check_run_id(args.run_id)
    check_tiny_area(args.tiny_area)
    st = store.Store.from_env()
    ref = materialize_dataset(args.dataset, st, run_id=args.run_id)
    inputs = {"dataset_version": ref.version, "scorer": scorer_settings(args.tiny_area)}
    stage = Stage(st, run_id, "eda", None, inputs, key=inputs, module=__name__, recompute=args.recompute)
    if stage.reuse() is not None:
        return 0
    out_dir = store.work_dir() / "runs" / run_id / "eda"
    info = {"name": ref.name, "version": ref.version, "uri": ref.uri}

    def body(tracker: tracking.Tracker) -> dict:
        report = run_eda(ref.root, out_dir, args.tiny_area, dataset_info=info)
        report_to_clearml(tracker, report, out_dir)
        tracker.upload_artifact("report", out_dir / "report.json")
        return report

    report = stage.compute(out_dir, {**inputs, "dataset": info}, body)
    log.info("eda: %d train masks flagged of %d", report["flagged"], len(report["suspicious"]))
    return 0
