"""Segment images with a shipped model: `python -m tasks predict --model production --images DIR --out DIR`.

--model: `production` (the champion the production pointer names), a promoted model version
(`models/<version>/`, see `python -m tasks models list`) or `RUN_ID/EXP` (a trained experiment,
`runs/<id>/train/<exp>/`). Every downloaded file is checked against the sha256 its publisher
recorded, and the weights against the model card (or the train stage's marker).

--images: a folder or an s3:// prefix in the pipeline's bucket; every file below it is an input.
.jpg/.jpeg/.png images of any size are read under validate's rules (tasks.dataset.read_image:
grayscale, palette, RGBA, CMYK converted to RGB; 16-bit and EXIF-rotated images refused) and
segmented in batches (--batch-size) by the model's own test pipeline, exactly as evaluate runs it
(same resize, same test-time augmentation, prediction resized back to the image's size).

--out: a folder or an s3:// prefix, receiving for each image `masks/<path>.png` (the dataset's label
convention: single-channel 8-bit PNG, 0 background, 1 cat, 2 dog, same size as the image),
`overlays/<path>.png` (the image with the classes in the palette's colours) and `predictions.json`
(the model, and per image its files and class pixel shares). An s3 prefix is published with a
`_SUCCESS` marker, and only into an empty prefix or over an earlier predict output.

Bad inputs (unreadable, refused or not an image) are listed with the reason, the others are still
written, and the command then exits 2 naming each bad file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks import experiments
from tasks.dataset import CLASSES, IMAGE_SUFFIXES, read_image
from tasks.errors import InputError
from tasks.store import Store, check_run_id, parse_s3_uri, sha256_file, stage_prefix, work_dir

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
MASKS_DIR, OVERLAYS_DIR, SUMMARY_FILE = "masks", "overlays", "predictions.json"
OVERLAY_ALPHA = 0.5  # weight of the class colour over the image (background pixels stay the image)
OUTPUT_KIND = "predict"  # recorded in an s3 output's marker: what a later predict may overwrite


# ---------------------------------------------------------------- the model


@dataclass
class LoadedModel:
    """A segmentor ready for inference and where it came from."""

    source: str  # models/<version> or runs/<id>/train/<exp>
    experiment: str
    checkpoint_sha256: str
    model: Any  # mmseg segmentor (or SegTTAModel around it), eval mode
    pipeline: Any  # the test pipeline without annotations (mmcv Compose)
    palette: list
    card: dict | None = None

    def describe(self) -> dict:
        described = {
            "source": self.source,
            "experiment": self.experiment,
            "checkpoint_sha256": self.checkpoint_sha256,
        }
        if self.card is not None:
            described |= {k: self.card.get(k) for k in ("version", "run_id", "test_set_version")}
            described["test_mDice"] = self.card.get("test_metrics", {}).get("mDice")
        return described


def _without_annotations(pipeline: list) -> list:
    """The test pipeline minus LoadAnnotations (also inside TestTimeAug): new images have no mask."""
    kept = []
    for transform in pipeline:
        if transform["type"] == "LoadAnnotations":
            continue
        if transform["type"] == "TestTimeAug":
            branches = [
                [t for t in branch if t["type"] != "LoadAnnotations"] for branch in transform["transforms"]
            ]
            transform = {**transform, "transforms": [branch for branch in branches if branch]}
        kept.append(transform)
    return kept


def build_model(cfg: Any, checkpoint: Path, device: str) -> tuple[Any, Any, list]:
    """(model in eval mode, annotation-free test pipeline, palette) from a training's rebuilt config.

    The model is the one evaluate tests: the experiment's segmentor, wrapped by its `tta_model` when
    it defines test-time augmentation (tasks.experiments.apply_test_time_augmentation), with the
    weights loaded by evaluate's own `load_weights` (weights_only, strict).
    """
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from tasks import mmseg_setup  # registers the study's dataset, transforms, metric and losses
    from tasks.evaluate import load_weights

    tested = experiments.apply_test_time_augmentation(copy.deepcopy(cfg))
    init_default_scope(tested.get("default_scope", "mmseg"))
    model = MODELS.build(tested.model)
    load_weights(model, checkpoint, cfg.get("experiment"))
    pipeline = Compose(_without_annotations(tested.test_dataloader.dataset.pipeline))
    return model.to(device).eval(), pipeline, [list(c) for c in mmseg_setup.StudyDataset.METAINFO["palette"]]


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'production' | '<version>' | 'RUN_ID/EXP' -> (kind, value); InputError for anything else."""
    if spec == "production":
        return "production", None
    if spec.count("/") == 1:
        run_id, experiment = spec.split("/")
        check_run_id(run_id)
        try:
            experiments.get(experiment)
        except KeyError as err:
            raise InputError(f"--model {spec}: {err.args[0]}") from None
        return "run", spec
    if "/" not in spec and spec:
        return "version", spec
    raise InputError(f"--model {spec!r}: expected production, a model version or RUN_ID/EXPERIMENT")


def _verified(path: Path, expected: str | None, what: str) -> str:
    digest = sha256_file(path)
    if expected is None or digest != expected:
        raise InputError(f"{what}: sha256 {digest} does not match the recorded {expected}")
    return digest


def load_model(store: Store, spec: str, device: str, local_dir: Path) -> LoadedModel:
    """Resolve --model, download and verify its weights, rebuild its config, build the model.

    The config is never the store's config.py: tasks.train.training_config rebuilds it from this
    repository's experiment file and the training's recorded inputs (the train marker's, or the model
    card's copy of them for a promoted model), each checked again.
    """
    from tasks.train import fetch_training_outputs, training_config

    kind, value = parse_model_spec(spec)
    shutil.rmtree(local_dir / "model", ignore_errors=True)
    if kind == "run":
        run_id, experiment = value.split("/")
        prefix = stage_prefix(run_id, "train", experiment)
        marker = store.marker(prefix)
        if marker is None:
            raise InputError(f"--model {spec}: {store.uri(prefix)} has not published outputs")
        trained = fetch_training_outputs(store, run_id, experiment, local_dir / "model")  # sha256-checked
        checkpoint, cfg, card = trained.checkpoint, trained.config, None
        digest = _verified(checkpoint, marker["files"].get("best.pth"), store.uri(f"{prefix}/best.pth"))
    else:
        prefix, card = _promoted(store, spec, kind, value)
        checkpoint = store.download_file(f"{prefix}/model.pth", local_dir / "model" / "model.pth")
        experiment = card["experiment"]
        digest = _verified(checkpoint, card.get("checkpoint_sha256"), f"{store.uri(prefix)}/model.pth")
        cfg = training_config(card.get("training"), experiment, f"{store.uri(prefix)}/model_card.json")
    model, pipeline, palette = build_model(cfg, checkpoint, device)
    return LoadedModel(store.uri(prefix), experiment, digest, model, pipeline, palette, card)


def _promoted(store: Store, spec: str, kind: str, version: str | None) -> tuple[str, dict]:
    """(models/<version> prefix, its model card) of production or of a named version, both checked by
    tasks.models (complete, the card's checkpoint sha256 equal to the marker's and the pointer's)."""
    from tasks import models
    from tasks import store as st

    try:
        if kind == "production":
            production = models.read_production(store)
            if production.pointer is None:
                raise InputError(f"--model {spec}: no model in production ({store.uri(st.PRODUCTION_KEY)})")
            version, card = production.version, production.card
        else:
            card = models.version_card(store, version)
    except models.ProductionError as err:
        raise InputError(f"--model {spec}: {err}") from None
    return st.model_prefix(version), card


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The images to segment (relative output name -> local file) and the inputs refused up front."""

    root: Path
    uri: str
    images: dict[str, Path] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def collect_images(root: Path, uri: str | None = None) -> Inputs:
    """Every file under root: images by relative path, anything else refused with the reason."""
    found = Inputs(root, uri or str(root))
    outputs: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            found.refused[rel] = f"not an image ({'/'.join(IMAGE_SUFFIXES)})"
            continue
        name = path.relative_to(root).with_suffix(".png").as_posix()
        if name in outputs:
            found.refused[rel] = f"same output name {name} as {outputs[name]}"
            continue
        outputs[name] = rel
        found.images[rel] = path
    if not found.images and not found.refused:
        raise InputError(f"{found.uri}: no files to segment")
    return found


def materialize_images(spec: str, store: Store, cache: Path) -> Inputs:
    if spec.startswith("s3://"):
        prefix = parse_s3_uri(spec, store.bucket)
        if not store.list_keys(prefix):
            raise InputError(f"{spec}: no objects under this prefix")
        shutil.rmtree(cache, ignore_errors=True)
        store.download_prefix(prefix, cache)  # sha256-verified where the object records one
        return collect_images(cache, spec)
    root = Path(spec).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{spec}: not a folder")
    return collect_images(root)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------- outputs


def output_name(rel: str) -> str:
    return Path(rel).with_suffix(".png").as_posix()


def overlay(image: np.ndarray, mask: np.ndarray, palette: list) -> np.ndarray:
    """The image with each non-background class blended in its palette colour."""
    from tasks.evaluate import colourise

    colours = colourise(mask, palette).astype(np.float32)
    blended = image.astype(np.float32)
    classes = mask > 0
    blended[classes] = (1 - OVERLAY_ALPHA) * blended[classes] + OVERLAY_ALPHA * colours[classes]
    return np.rint(blended).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_outputs(rel: str, image: np.ndarray, mask: np.ndarray, palette: list, out: Path) -> dict:
    name = output_name(rel)
    _save_png(mask, out / MASKS_DIR / name)
    _save_png(overlay(image, mask, palette), out / OVERLAYS_DIR / name)
    counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
    shares = {cls: round(float(counts[i]) / mask.size, 6) for i, cls in enumerate(CLASSES)}
    return {
        "mask": f"{MASKS_DIR}/{name}",
        "overlay": f"{OVERLAYS_DIR}/{name}",
        "size": list(mask.shape),
        "shares": shares,
    }


# ---------------------------------------------------------------- inference


def _shape_key(item: dict) -> tuple:
    inputs = item["inputs"]  # one tensor, or one per view (test-time augmentation)
    return tuple(tuple(view.shape) for view in inputs) if isinstance(inputs, list) else tuple(inputs.shape)


def segment(loaded: LoadedModel, paths: Sequence[Path]) -> tuple[list[np.ndarray | None], list[str | None]]:
    """One batch through the model's test pipeline: a mask per image, or None and why it failed.

    Images whose pipeline outputs differ in shape (other sizes or aspect ratios) go through the
    model in separate forward passes: mmseg stacks a test batch only from equally shaped inputs.
    """
    import torch
    from mmengine.dataset import pseudo_collate

    prepared: list[dict | None] = []
    problems: list[str | None] = []
    for path in paths:
        try:
            prepared.append(loaded.pipeline(dict(img_path=str(path))))
            problems.append(None)
        except Exception as err:  # the model's own loader refused a file read_image accepted
            prepared.append(None)
            problems.append(f"the model's test pipeline could not read it ({type(err).__name__}: {err})")
    groups: dict[tuple, list[int]] = {}
    for index, item in enumerate(prepared):
        if item is not None:
            groups.setdefault(_shape_key(item), []).append(index)
    masks: list[np.ndarray | None] = [None] * len(paths)
    with torch.no_grad():
        for indices in groups.values():
            results = loaded.model.test_step(pseudo_collate([prepared[i] for i in indices]))
            for index, result in zip(indices, results, strict=True):
                masks[index] = result.pred_sem_seg.data[0].cpu().numpy().astype(np.uint8)
    return masks, problems


def predict(
    loaded: LoadedModel,
    inputs: Inputs,
    out: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Segment every image of `inputs` into `out`; the summary (also written as predictions.json)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size})")
    out.mkdir(parents=True, exist_ok=True)
    failed = {rel: reason for rel, reason in inputs.refused.items()}
    written: dict[str, dict] = {}
    items = list(inputs.images.items())
    with tqdm(total=len(items), unit="img", desc="predict", file=sys.stderr, disable=not progress) as bar:
        for batch in batches(items, batch_size):
            images, good = {}, []
            for rel, path in batch:
                try:
                    images[rel] = read_image(path)  # validate's rules: the same refusals, named
                    good.append((rel, path))
                except InputError as err:
                    failed[rel] = err.problems[0].removeprefix(f"{path}: ")
            masks, problems = segment(loaded, [path for _, path in good]) if good else ([], [])
            for (rel, _), mask, problem in zip(good, masks, problems, strict=True):
                if mask is None:
                    failed[rel] = problem
                elif mask.shape != images[rel].shape[:2]:
                    failed[rel] = (
                        f"prediction {mask.shape} does not match the image's size {images[rel].shape[:2]}"
                    )
                else:
                    written[rel] = write_outputs(rel, images[rel], mask, loaded.palette, out)
            bar.update(len(batch))
    summary = {
        "model": loaded.describe(),
        "images": inputs.uri,
        "classes": list(CLASSES),
        "written": len(written),
        "failed": dict(sorted(failed.items())),
        "predictions": dict(sorted(written.items())),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- the step


def _check_s3_output(store: Store, spec: str) -> str:
    prefix = parse_s3_uri(spec, store.bucket)
    if store.list_keys(prefix):
        marker = store.marker(prefix)
        if marker is None or (marker.get("inputs") or {}).get("kind") != OUTPUT_KIND:
            raise InputError(
                f"--out {spec}: holds other objects (not an earlier predict output): choose another prefix"
            )
    return prefix


def run_predict(
    model: str,
    images: str,
    out: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | None = None,
    store: Store | None = None,
    progress: bool = True,
) -> dict:
    """The stage: resolve the model and the images, segment, write (or publish) the outputs.

    Raises InputError naming every bad image after all the others were written.
    """
    from tasks.train import configure_torch_threads

    scratch = work_dir() / "predict"
    store = store or Store.from_env()
    out_prefix = _check_s3_output(store, out) if out.startswith("s3://") else None
    local_out = scratch / "out" if out_prefix is not None else Path(out).expanduser().resolve()
    inputs = materialize_images(images, store, scratch / "images")
    if local_out.is_relative_to(inputs.root):
        raise InputError(f"--out {out}: inside --images {images} (the outputs would become inputs)")
    if out_prefix is not None:
        shutil.rmtree(local_out, ignore_errors=True)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    log.info("torch uses %d threads", configure_torch_threads())
    loaded = load_model(store, model, device, scratch)
    log.info(
        "model %s (%s, sha256 %s) on %s",
        loaded.source,
        loaded.experiment,
        loaded.checkpoint_sha256[:12],
        device,
    )
    summary = predict(loaded, inputs, local_out, batch_size, progress)
    if out_prefix is not None:
        inputs_record = {"kind": OUTPUT_KIND, "model": loaded.describe(), "images": inputs.uri}
        store.publish(local_out, out_prefix, inputs=inputs_record)
    log.info("wrote %d masks and overlays to %s", summary["written"], out)
    if summary["failed"]:
        raise InputError([f"{inputs.uri.rstrip('/')}/{rel}: {why}" for rel, why in summary["failed"].items()])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="production",
        help="production (default), a promoted model version, or RUN_ID/EXPERIMENT (a trained experiment)",
    )
    parser.add_argument("--images", required=True, help="folder or s3:// prefix of .jpg/.jpeg/.png images")
    parser.add_argument(
        "--out", required=True, help="folder or s3:// prefix for masks/, overlays/, predictions.json"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    summary = run_predict(
        args.model, args.images, args.out, args.batch_size, args.device, progress=not args.no_progress
    )
    print(json.dumps({k: summary[k] for k in ("model", "images", "written", "failed")}, sort_keys=True))
    return 0
