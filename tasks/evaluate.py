"""Evaluate one experiment's best checkpoint: `python -m tasks evaluate --experiment h1 --run-id ID`.

Flow: fetch runs/<id>/train/<exp>/ (best.pth, the resolved config.py) -> point the config's test
dataloader at the split of the dataset -> mmengine's Runner.test with mmseg's IoUMetric (extended
only to keep each sample) -> <split>_metrics.json (aAcc, mIoU, mAcc, mDice, per-class IoU/Dice/Acc,
percent as mmseg reports; `<split>_set_version`, the version of the split's images and labels, see
tasks.dataset.dataset_versions), 1x4 panels (image | truth | prediction | errors) of the N best and N
worst images by Dice, a row-normalised confusion matrix -> ClearML -> runs/<id>/eval/<exp>/.

Outputs per split: `<split>_metrics.json`, `<split>_per_image.json` (Dice of every image),
`panels/<split>_{best,worst}_<rank>_<stem>.png`, the confusion matrix `confusion.png` for test and
`confusion_<split>.png` for another split. Several splits (`--split val,test`) go into one publish,
because a publish replaces everything under the prefix.

Caching (tasks/stage.py): the key holds the train outputs' digest, the dataset version, splits, panel
count, the rebuilt config's content and the code; an evaluation with the same key published by this
run or an earlier one is reused (its metrics files then name this run and its checkpoint key).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks import experiments
from tasks.dataset import split_version
from tasks.errors import InputError
from tasks.experiments import SUMMARY_KEYS
from tasks.materialize import DatasetRef, materialize_dataset
from tasks.stage import Stage, add_recompute_argument
from tasks.store import (
    Store,
    check_run_id,
    manifest_key,
    marker_key,
    sha256_file,
    stage_prefix,
    utc_now,
    work_dir,
)
from tasks.train import (
    config_digest,
    configure_torch_threads,
    experiment_config_path,
    fetch_training_outputs,
    metrics_from_flat,
    set_data_root,
    training_config,
)

if TYPE_CHECKING:  # mmseg-heavy: imported where used
    from mmengine.config import Config

    from tasks.metrics import Sample, SampleKeepingIoUMetric
    from tasks.tracking import Tracker

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")
DEFAULT_PANELS = 4
IGNORE_COLOUR = (255, 255, 255)
ERROR_COLOURS = {"right": (30, 30, 30), "wrong": (230, 40, 40)}


# ---------------------------------------------------------------- inputs


def parse_splits(text: str) -> list[str]:
    splits = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not splits or any(s not in EVAL_SPLITS for s in splits):
        raise InputError(f"--split {text!r}: expected test, val or a comma list of both")
    return splits


def confusion_name(split: str) -> str:
    return "confusion.png" if split == "test" else f"confusion_{split}.png"


def recorded_dataset_uri(store: Store, run_id: str) -> str:
    """The dataset the run validated (runs/<id>/manifest.json, written by validate)."""
    key = manifest_key(run_id)
    if not store.exists(key):
        raise InputError(f"no --dataset given and {store.uri(key)} does not exist (run validate first)")
    uri = (store.get_json(key).get("dataset") or {}).get("uri")
    if not uri:
        raise InputError(f"no --dataset given and {store.uri(key)} records no dataset uri")
    return uri


def set_version_key(split: str) -> str:
    """The <split>_metrics.json field holding the evaluated split's version: test_set_version, ..."""
    return f"{split}_set_version"


def train_digest(train_marker: dict) -> str:
    """One digest of everything the train stage published (checkpoint, config, metrics)."""
    return hashlib.sha256(json.dumps(train_marker["files"], sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- inference


def load_weights(model: Any, checkpoint: Path, experiment: str | None) -> None:
    """Load a trained checkpoint into a model built from its rebuilt config, as data (weights_only,
    tasks.mmcompat) and strictly: weights that do not fit are refused, not half loaded. A test-time
    augmentation wrapper (or a model wrapper) gets the weights into the segmentor it wraps. Shared by
    evaluate and predict, so both run the same weights in the same model."""
    from mmengine.model import BaseTTAModel, is_model_wrapper
    from mmengine.runner.checkpoint import load_checkpoint

    inner = model.module if isinstance(model, BaseTTAModel) or is_model_wrapper(model) else model
    try:
        load_checkpoint(inner, str(checkpoint), map_location="cpu", strict=True)
    except (RuntimeError, ValueError, KeyError) as err:  # other keys or shapes, or not a checkpoint
        raise InputError(f"{checkpoint}: does not fit the {experiment} model ({err})") from None


def run_split(
    config: Config, checkpoint: Path, dataset_root: Path, split: str, scratch: Path
) -> tuple[dict, SampleKeepingIoUMetric, tuple[str, ...], list]:
    """Runner.test on one split: mmseg's flat metrics, the metric with its samples, classes, palette.

    config: the training's config as `tasks.train.training_config` rebuilds it (never the store's
    config.py). The checkpoint is loaded as data (weights_only, tasks.mmcompat) and strictly: weights
    that do not fit the model this code builds are refused, not half loaded.
    """
    from mmengine.runner import Runner

    from tasks.metrics import SampleKeepingIoUMetric
    from tasks.mmseg_setup import check_loaded_samples

    cfg = copy.deepcopy(config)
    experiments.apply_test_time_augmentation(cfg)  # only experiments that define tta_model/tta_pipeline
    set_data_root(cfg, dataset_root)
    cfg.test_dataloader.dataset.data_prefix = dict(img_path=f"images/{split}", seg_map_path=f"labels/{split}")
    evaluator = dict(cfg.test_evaluator)
    cfg.test_evaluator = dict(evaluator, type=SampleKeepingIoUMetric.__name__)
    cfg.work_dir = str(scratch / split)
    cfg.load_from, cfg.resume = None, False
    # unique: mmengine keeps one logger/visualizer per experiment name for the whole process
    cfg.experiment_name = f"evaluate_{cfg.get('experiment', 'model')}_{split}_{time.time_ns()}"
    runner = Runner.from_cfg(cfg)
    load_weights(runner.model, checkpoint, cfg.get("experiment"))
    check_loaded_samples(runner.test_dataloader.dataset, dataset_root, split, "evaluation")
    flat = runner.test()
    metric = runner.test_loop.evaluator.metrics[0]
    classes = tuple(runner.test_dataloader.dataset.metainfo["classes"])
    palette = runner.test_dataloader.dataset.metainfo["palette"]
    return flat, metric, classes, palette


# ---------------------------------------------------------------- pictures


def colourise(mask: np.ndarray, palette: list) -> np.ndarray:
    out = np.full((*mask.shape, 3), IGNORE_COLOUR, dtype=np.uint8)
    for value, colour in enumerate(palette):
        out[mask == value] = colour
    return out


def error_map(pred: np.ndarray, truth: np.ndarray, ignore_index: int) -> np.ndarray:
    out = np.full((*truth.shape, 3), IGNORE_COLOUR, dtype=np.uint8)
    valid = truth != ignore_index
    out[valid & (pred == truth)] = ERROR_COLOURS["right"]
    out[valid & (pred != truth)] = ERROR_COLOURS["wrong"]
    return out


def save_panel(
    sample: Sample, dice: float, classes: tuple[str, ...], palette: list, ignore_index: int, path: Path
) -> Path:
    """image | truth | prediction | error map (red: wrong, dark: right, white: ignored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from tasks.dataset import read_image

    image = read_image(Path(sample.img_path))
    pictures = {
        "image": image,
        "truth": colourise(sample.truth, palette),
        "prediction": colourise(sample.pred, palette),
        "error map": error_map(sample.pred, sample.truth, ignore_index),
    }
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
    for ax, (title, picture) in zip(axes, pictures.items(), strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{sample.stem}  Dice {dice * 100:.2f}")
    legend = {**dict(zip(classes, palette, strict=True)), "ignore": IGNORE_COLOUR}
    legend |= {f"error map: {kind}": colour for kind, colour in ERROR_COLOURS.items()}
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="grey", label=n) for n, c in legend.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def confusion_counts(samples: list[Sample], n_classes: int, ignore_index: int) -> np.ndarray:
    """counts[truth, prediction] over every non-ignored pixel."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    for sample in samples:
        valid = sample.truth != ignore_index
        index = sample.truth[valid].astype(np.int64) * n_classes + sample.pred[valid]
        counts += np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return counts


def save_confusion(counts: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    for (row, col), value in np.ndenumerate(normalised):
        colour = "white" if value > 0.5 else "black"
        ax.text(
            col, row, f"{value:.1%}\n{counts[row, col]}", ha="center", va="center", color=colour, fontsize=8
        )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rank_samples(
    samples: list[Sample], n: int
) -> tuple[list[tuple[Sample, float]], list[tuple[Sample, float]], dict[str, float | None]]:
    """(n best, n worst) (sample, Dice) pairs by per-image Dice, and every image's Dice by stem."""
    from tasks.metrics import sample_dice

    scored = [(sample, sample_dice(sample)) for sample in samples]
    ranked = sorted((p for p in scored if not np.isnan(p[1])), key=lambda p: (-p[1], p[0].stem))
    n_best = min(n, len(ranked))
    best = ranked[:n_best]
    worst = ranked[n_best:][::-1][:n]  # worst first; never an image already shown as best
    return best, worst, {s.stem: None if np.isnan(d) else round(d * 100, 2) for s, d in scored}


# ---------------------------------------------------------------- the stage


def evaluate_split(
    split: str,
    config: Config,
    checkpoint: Path,
    dataset: DatasetRef,
    n_panels: int,
    out: Path,
    scratch: Path,
) -> dict:
    """Metrics, per-image Dice, panels and confusion matrix of one split, written under out."""
    flat, metric, classes, palette = run_split(config, checkpoint, dataset.root, split, scratch)
    if not metric.samples:
        raise InputError(f"{dataset.root}/images/{split}: no images evaluated")
    doc = metrics_from_flat(flat, classes)
    best, worst, per_image = rank_samples(metric.samples, n_panels)
    panels = {}
    for kind, chosen in (("best", best), ("worst", worst)):
        panels[kind] = []
        for position, (sample, dice) in enumerate(chosen, start=1):
            rel = f"panels/{split}_{kind}_{position:02d}_{sample.stem}.png"
            save_panel(sample, dice, classes, palette, metric.ignore_index, out / rel)
            panels[kind].append({"stem": sample.stem, "dice": round(dice * 100, 2), "file": rel})
    counts = confusion_counts(metric.samples, len(classes), metric.ignore_index)
    save_confusion(counts, classes, f"{split}: row-normalised confusion", out / confusion_name(split))
    doc.update(
        samples=len(metric.samples),
        panels=panels,
        confusion_matrix={"classes": list(classes), "counts": counts.tolist(), "file": confusion_name(split)},
    )
    (out / f"{split}_per_image.json").write_text(json.dumps(per_image, indent=2, sort_keys=True) + "\n")
    return doc


def evaluate_experiment(
    experiment: str,
    run_id: str,
    splits: list[str],
    dataset_uri: str | None = None,
    n_panels: int = DEFAULT_PANELS,
    store: Store | None = None,
    recompute: bool = False,
) -> dict:
    """Evaluate (or reuse) one experiment's best checkpoint; returns a summary of what was published.

    recompute: evaluate even if this run or an earlier one published an evaluation with the same
    cache key (the training's files, the dataset, splits, panels, the rebuilt config, the code)."""
    check_run_id(run_id)
    experiment_config_path(experiment)  # InputError for an unknown experiment
    if n_panels < 0:
        raise InputError(f"--panels must be 0 or more (got {n_panels})")
    store = store or Store.from_env()
    train_prefix = stage_prefix(run_id, "train", experiment)
    prefix = stage_prefix(run_id, "eval", experiment)
    train_marker = store.marker(train_prefix)
    if train_marker is None:
        raise InputError(f"stage {train_prefix} has not published outputs (train {experiment} first)")
    dataset = materialize_dataset(dataset_uri or recorded_dataset_uri(store, run_id), store, run_id=run_id)
    trained_on = train_marker["inputs"].get("dataset_version")
    if trained_on != dataset.version:
        raise InputError(
            f"{dataset.uri}: dataset version {dataset.version}, but {experiment} was trained on version "
            f"{trained_on}: evaluate on the run's own dataset"
        )
    inputs = {
        "experiment": experiment,
        "train_outputs": train_digest(train_marker),
        "dataset_version": dataset.version,
        "splits": splits,
        "panels": n_panels,
    }
    # the config evaluate rebuilds (from this repository's file) is part of what determines the outputs
    where = store.uri(marker_key(train_prefix))
    config = training_config(train_marker["inputs"], experiment, where, register=False)  # no torch yet
    key = {**inputs, "config": config_digest(config)}
    stage = Stage(store, run_id, "eval", experiment, inputs, key, __name__, recompute, relocate_to(run_id))
    if stage.reuse() is not None:
        cached_from = {"cached_from": stage.hit["run_id"]} if stage.hit else {}
        return {"status": "cached", "prefix": store.uri(prefix), **cached_from, **inputs}

    exp_dir = work_dir() / "runs" / run_id / "eval" / experiment
    trained = fetch_training_outputs(store, run_id, experiment, exp_dir / "train")  # config rebuilt
    out, scratch = exp_dir / "publish", exp_dir / "runner"
    log.info("torch uses %d threads", configure_torch_threads())
    checkpoint_key = f"{train_prefix}/{trained.checkpoint.name}"
    provenance = {
        "experiment": experiment,
        "run_id": run_id,
        "dataset_version": dataset.version,
        "dataset_uri": dataset.uri,
        "checkpoint": checkpoint_key,
        "checkpoint_sha256": sha256_file(trained.checkpoint),
        "best_epoch": trained.val_metrics.get("best_epoch"),
        "profile": trained.val_metrics.get("profile"),
    }
    results = {}

    def body(tracker: Tracker) -> None:
        scratch.mkdir(parents=True)
        for split in splits:
            # The version of exactly the files evaluated (images/<split>, labels/<split>): select compares
            # champion and challenger on it, so added train images (a new dataset version) keep them
            # comparable.
            doc = {"split": split, **provenance, set_version_key(split): split_version(dataset.root, split)}
            doc["evaluated_at"] = utc_now()
            doc.update(
                evaluate_split(split, trained.config, trained.checkpoint, dataset, n_panels, out, scratch)
            )
            path = out / f"{split}_metrics.json"
            path.write_text(json.dumps(doc, indent=2) + "\n")
            report_to_clearml(tracker, split, doc, out)
            tracker.upload_artifact(f"{split}_metrics", path)
            results[split] = {key: doc[key] for key in SUMMARY_KEYS}
            log.info("%s %s: %s", experiment, split, results[split])

    stage.compute(out, inputs, body, scratch=[scratch])
    shutil.rmtree(scratch, ignore_errors=True)  # runner logs: the metrics JSON and ClearML hold what matters
    return {"status": "evaluated", "prefix": store.uri(prefix), **inputs, "metrics": results}


def relocate_to(run_id: str) -> Callable[[str, str], Callable[[bytes], bytes] | None]:
    """How an evaluation reused from another run names this run: its `<split>_metrics.json` record
    the run and the checkpoint key (the same bytes, under this run's train prefix: the cache key
    holds the training's file digests), which select checks against this run's training."""

    def relocate(rel: str, source_run: str) -> Callable[[bytes], bytes] | None:
        if not rel.endswith("_metrics.json") or "/" in rel:
            return None

        def rewrite(data: bytes) -> bytes:
            doc = json.loads(data)
            if doc.get("run_id") == source_run and isinstance(doc.get("checkpoint"), str):
                experiment, name = doc["experiment"], doc["checkpoint"].rpartition("/")[2]
                doc["checkpoint"] = f"{stage_prefix(run_id, 'train', experiment)}/{name}"
                doc["run_id"] = run_id
            return (json.dumps(doc, indent=2) + "\n").encode()

        return rewrite

    return relocate


def report_to_clearml(tracker: Tracker, split: str, doc: dict, out: Path) -> None:
    """Scalars (summary, per class) and images (panels, confusion matrix) to ClearML."""
    for key in SUMMARY_KEYS:
        tracker.report_scalar(f"{split} metrics", key, doc[key], 0)
    for cls, values in doc["per_class"].items():
        for key, value in values.items():
            if value is not None:
                tracker.report_scalar(f"{split} {key} per class", cls, value, 0)
    for kind, panels in doc["panels"].items():
        for panel in panels:
            tracker.report_image(f"{split} {kind} panels", panel["stem"], out / panel["file"])
    tracker.report_image(f"{split} confusion matrix", "row-normalised", out / doc["confusion_matrix"]["file"])


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment", required=True, choices=experiments.names(), help="experiment (a file under configs/)"
    )
    parser.add_argument("--run-id", required=True, help="pipeline run id")
    parser.add_argument(
        "--split", default="test", help="split to evaluate: test (default), val, or both as val,test"
    )
    parser.add_argument(
        "--dataset", default=None, help="dataset (local dir or s3:// URI); default: the one the run validated"
    )
    parser.add_argument(
        "--panels",
        type=int,
        default=DEFAULT_PANELS,
        help=f"N best and N worst panels (default {DEFAULT_PANELS})",
    )
    add_recompute_argument(parser)


def main(args: argparse.Namespace) -> int:
    summary = evaluate_experiment(
        args.experiment,
        args.run_id,
        parse_splits(args.split),
        args.dataset,
        args.panels,
        recompute=args.recompute,
    )
    print(json.dumps(summary, sort_keys=True))  # one line, last: what Airflow pushes to XCom
    return 0
