"""Relabel stage: repair the bad train masks, write a full relabeled copy of train (labels_sam2/train).

    python -m tasks relabel --run-id ID --dataset URI --strategy {yolo_sam2,morphology,auto}
        [--bad-masks URI_OR_PATH] [--score-threshold X] [--tiny-area 100]
        [--yolo-weights PATH_OR_S3] [--sam2-checkpoint PATH_OR_S3] [--sam2-config NAME]

Bad set = the given list (the study's bad_mask_paths.json: a JSON list of mask paths, relative to the
dataset root like "labels/train/<stem>.png") UNION the train masks whose EDA suspicious score reaches
the threshold (read from runs/<id>/eda/report.json, or computed with the EDA scorer when the EDA of this
dataset version is not published). Only train masks change; val and test are never read for writing.

Strategies:
- yolo_sam2 (the study's method): YOLOv8 boxes of COCO classes 15 (cat) and 16 (dog), each box prompting
  SAM2 for one mask, merged with the original by MERGE_RULE below. Weights are files the user supplies:
  yolov8x.pt and sam2.1_hiera_large.pt baked into the image ($SEGPIPE_WEIGHTS_DIR), else
  s3://<bucket>/weights/<file> (or --yolo-weights / --sam2-checkpoint with a local path or an s3://
  URI in the pipeline's bucket).
- morphology (weights-free), MORPHOLOGY_RULE below: speckles under --tiny-area take their surroundings'
  label, small holes are filled, staircase/jagged outlines are redrawn from their smoothed contour. It
  cannot restore missing objects or missing parts; the report says so.
- auto: yolo_sam2 when both weight files resolve, else morphology; the report says which ran and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from tasks import eda, masks, store, tracking
from tasks.dataset import CLASSES, list_pairs, read_image, read_mask
from tasks.errors import InputError
from tasks.materialize import materialize_dataset
from tasks.stage import Stage, add_recompute_argument
from tasks.weights import fetch_weights

log = logging.getLogger(__name__)

STRATEGIES = ("yolo_sam2", "morphology", "auto")
RELABELED_DIR = "labels_sam2"
FOREGROUND = eda.FOREGROUND
COCO_TO_CLASS = {15: CLASSES.index("cat"), 16: CLASSES.index("dog")}  # COCO ids -> our class ids
DETECTION_CONF = 0.25  # ultralytics' own default confidence threshold
# The user-supplied weight files, found as tasks.weights.fetch_weights says (see module docstring).
YOLO_WEIGHTS_FILE = "yolov8x.pt"
SAM2_CHECKPOINT_FILE = "sam2.1_hiera_large.pt"
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"
MERGE_RULE = (
    "SAM2 masks are painted with their detection's class, most confident detection last (it wins "
    "overlaps). Original pixels no new mask covers are kept, unless their original object is covered "
    "mostly by new masks of the other class (then the detector says it is another animal and they are "
    "dropped); ignore (255) pixels stay where no new mask covers them. Finally components under "
    "tiny-area px take their surroundings' label."
)
MORPHOLOGY_RULE = (
    "Components under tiny-area px take the most common label around them; holes under tiny-area px "
    "are filled (bigger ones can be real: an occluder in front of the animal); objects whose outline is "
    "a staircase or jagged are redrawn from their smoothed contour, grown back to their drawn area; "
    "clean outlines stay pixel-exact; ignore (255) pixels stay unless a repaired object covers them."
)
MORPHOLOGY_LIMITS = (
    "morphology only removes and smooths: it cannot restore missing objects or missing parts (ears, "
    "paws, tails); use yolo_sam2 with weights for those."
)


# ---------------------------------------------------------------- ultralytics offline


def prepare_ultralytics_offline() -> None:
    """Keep ultralytics off the network; call before importing it (it checks at import time).

    YOLO_OFFLINE=1 stops its DNS/online checks, sync=False its telemetry, and a local font stops its
    plotting code from downloading Arial.ttf (matplotlib's DejaVuSans stands in for it).
    ULTRALYTICS_SAFE_LOAD=1 makes it load user-supplied .pt files with torch's weights_only
    allow-list instead of unpickling them in full (a weights file must not run code).
    Importing ultralytics replaces PIL.Image.open process-wide; PIL's own is put back (see below).
    """
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(store.work_dir() / "ultralytics")))
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.is_file():
        import matplotlib

        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    # ultralytics.utils.patches (imported with the package) swaps in an Image.open that, on a file PIL
    # cannot identify, tries to pip-install pi-heif (network) instead of raising: our dataset checks
    # rely on PIL's own UnidentifiedImageError. The patch runs once, at that first import.
    pil_open = Image.open
    try:
        from ultralytics import settings
    finally:
        Image.open = pil_open

    settings.update({"sync": False})


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- detector and segmenter


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    label: int  # our class id
    score: float


class Detector(Protocol):
    def __call__(self, image: np.ndarray) -> list[Detection]: ...


class Segmenter(Protocol):
    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray: ...


class YoloDetector:
    """Ultralytics YOLO keeping COCO cat/dog boxes. `model` is a weights file, or a model yaml (untrained)."""

    def __init__(self, model: str | Path, device: str, conf: float = DETECTION_CONF):
        prepare_ultralytics_offline()
        from ultralytics import YOLO

        self.model = YOLO(str(model))
        self.device = device
        self.conf = conf

    def __call__(self, image: np.ndarray) -> list[Detection]:
        # ultralytics reads numpy arrays as OpenCV BGR.
        result = self.model.predict(
            np.ascontiguousarray(image[..., ::-1]),
            conf=self.conf,
            classes=list(COCO_TO_CLASS),
            device=self.device,
            verbose=False,
        )[0]
        boxes = result.boxes
        return [
            Detection(tuple(float(v) for v in box), COCO_TO_CLASS[int(cls)], float(score))
            for box, cls, score in zip(
                boxes.xyxy.cpu().numpy(), boxes.cls.cpu().numpy(), boxes.conf.cpu().numpy(), strict=True
            )
        ]


class Sam2Segmenter:
    """SAM2ImagePredictor: one mask per box prompt. checkpoint None builds an untrained model (tests)."""

    def __init__(self, config: str, checkpoint: Path | None, device: str):
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        model = build_sam2(config, ckpt_path=str(checkpoint) if checkpoint else None, device=device)
        self.predictor = SAM2ImagePredictor(model)

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, H, W) bool masks for N xyxy boxes."""
        import torch

        with torch.inference_mode():
            self.predictor.set_image(np.array(image))  # a writable copy: torch refuses read-only arrays
            found, _, _ = self.predictor.predict(box=boxes, multimask_output=False)
        return found.reshape(len(boxes), -1, *image.shape[:2])[:, 0] > 0


# ---------------------------------------------------------------- repairs


def merge_masks(original: np.ndarray, new: list[tuple[np.ndarray, int]], tiny_area: int) -> np.ndarray:
    """Merge new (binary mask, class) pairs, least confident first, into the original (MERGE_RULE)."""
    painted = np.zeros_like(original)
    for binary, label in new:
        painted[binary] = label
    out = original.copy()
    covered = painted > 0
    for c in FOREGROUND:
        comp = masks.components(original == c)
        if not len(comp.areas):
            continue
        # Per original object: pixels covered by new masks of its class vs of another class.
        same = np.bincount(comp.labels[covered & (painted == c)], minlength=len(comp.areas) + 1)
        other = np.bincount(comp.labels[covered & (painted != c)], minlength=len(comp.areas) + 1)
        conflict = other > same
        conflict[0] = False
        out[conflict[comp.labels]] = 0
    out[covered] = painted[covered]
    return masks.drop_small(out, FOREGROUND, tiny_area)


def morphology_repair(mask: np.ndarray, tiny_area: int) -> np.ndarray:
    """The weights-free repair: speckles absorbed, small holes filled, blocky/jagged outlines smoothed."""
    cleaned = masks.drop_small(mask, FOREGROUND, tiny_area)
    # A contour is redrawn from where the EDA scorer starts to see it as blocky / rough.
    return masks.repair_label_map(cleaned, FOREGROUND, tiny_area, eda.BLOCKY_RAMP[0], eda.ROUGH_RAMP[0])


class YoloSam2Repair:
    """Detector boxes -> SAM2 masks -> merge_masks. The detector is any Detector (tests inject boxes)."""

    def __init__(self, detector: Detector, segmenter: Segmenter, tiny_area: int):
        self.detector, self.segmenter, self.tiny_area = detector, segmenter, tiny_area
        self.detections = 0

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if image.shape[:2] != mask.shape:
            raise InputError(f"image size {image.shape[:2]} differs from mask size {mask.shape}")
        found = sorted(self.detector(image), key=lambda d: d.score)
        self.detections += len(found)
        new = []
        if found:
            boxes = np.array([d.box for d in found], np.float32)
            new = list(zip(self.segmenter(image, boxes), [d.label for d in found], strict=True))
        return merge_masks(mask, new, self.tiny_area)


Repair = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image RGB, mask) -> repaired mask


# ---------------------------------------------------------------- the relabeled copy


def _class_areas(mask: np.ndarray) -> dict[int, np.ndarray]:
    return {c: masks.components(mask == c).areas for c in FOREGROUND}


def _median_change(before: list[np.ndarray], after: list[np.ndarray], tiny_area: int) -> dict[str, Any]:
    """Median object area before/after, over every component (as the EDA counts objects, speckles
    included) and over objects of at least tiny_area px (so removed speckles do not dominate)."""
    out: dict[str, Any] = {}
    b_all = np.concatenate(before) if before else np.zeros(0, np.int64)
    a_all = np.concatenate(after) if after else np.zeros(0, np.int64)
    for scope, b, a in (
        ("all", b_all, a_all),
        ("objects", b_all[b_all >= tiny_area], a_all[a_all >= tiny_area]),
    ):
        mb = float(np.median(b)) if b.size else None
        ma = float(np.median(a)) if a.size else None
        out[scope] = {
            "count_before": int(b.size),
            "count_after": int(a.size),
            "median_before": mb,
            "median_after": ma,
            "median_change_pct": round(100.0 * (ma - mb) / mb, 2) if mb and ma is not None else None,
        }
    return out


def relabel_train(root: Path, out_dir: Path, bad: set[str], repair: Repair, tiny_area: int) -> dict[str, Any]:
    """Write out_dir/labels_sam2/train/: repaired bad masks, byte-identical copies of the others.

    Returns per-mask area changes (repaired masks) and per-class median object area change, over the
    repaired masks and over all train masks.
    """
    dest = out_dir / RELABELED_DIR / "train"
    dest.mkdir(parents=True, exist_ok=True)
    per_mask = []
    areas: dict[str, dict[int, list[np.ndarray]]] = {
        k: {c: [] for c in FOREGROUND} for k in ("bad_before", "bad_after", "all_before", "all_after")
    }
    repair_s = 0.0
    for image_path, mask_path in tqdm(
        list_pairs(root, "train"), desc="relabel train", unit="mask", mininterval=2
    ):
        key = eda.mask_key("train", mask_path)
        original = read_mask(mask_path)
        before = _class_areas(original)
        if key in bad:
            start = time.perf_counter()
            new = repair(read_image(image_path), original)
            repair_s += time.perf_counter() - start
            Image.fromarray(new).save(dest / mask_path.name)
            after = _class_areas(new)
            per_mask.append(_mask_change(key, original, new))
            for c in FOREGROUND:
                areas["bad_before"][c].append(before[c])
                areas["bad_after"][c].append(after[c])
        else:
            shutil.copyfile(mask_path, dest / mask_path.name)
            after = before
        for c in FOREGROUND:
            areas["all_before"][c].append(before[c])
            areas["all_after"][c].append(after[c])
    return {
        "masks": per_mask,
        "object_area_change": {
            scope: {
                CLASSES[c]: _median_change(areas[f"{scope}_before"][c], areas[f"{scope}_after"][c], tiny_area)
                for c in FOREGROUND
            }
            for scope in ("bad", "all")
        },
        "repaired": len(per_mask),
        "changed": sum(m["changed_px"] > 0 for m in per_mask),
        "repair_seconds": round(repair_s, 3),
        "masks_per_s": round(len(per_mask) / repair_s, 3) if repair_s else None,
    }


def _mask_change(key: str, before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    record: dict[str, Any] = {"mask": key, "changed_px": int((before != after).sum())}
    for c in FOREGROUND:
        a, b = int((before == c).sum()), int((after == c).sum())
        record[CLASSES[c]] = {
            "area_before": a,
            "area_after": b,
            "change_pct": round(100.0 * (b - a) / a, 2) if a else None,
        }
    return record


# ---------------------------------------------------------------- inputs: bad list, scores, weights


def _normalise_entry(entry: Any) -> str | None:
    """'labels/train/x.png', or any path ending in labels/<split>/x.png (absolute notebook paths)."""
    if not isinstance(entry, str):
        return None
    parts = Path(entry).parts
    if "labels" not in parts:
        return None
    tail = parts[len(parts) - 1 - parts[::-1].index("labels") :]
    return "/".join(tail) if len(tail) == 3 else None


def load_bad_list(source: str, root: Path, st: store.Store) -> list[str]:
    """The given bad-mask list, each entry checked against the dataset (InputError naming the bad ones)."""
    if source.startswith("s3://"):
        key = store.parse_s3_uri(source, st.bucket)
        if not st.exists(key):
            raise InputError(f"--bad-masks {source}: no such object in the bucket")
        data = st.get_bytes(key)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputError(f"--bad-masks {source}: file not found")
        data = path.read_bytes()
    try:
        entries = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"--bad-masks {source}: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise InputError(f"--bad-masks {source}: not valid JSON ({err})") from err
    except RecursionError as err:  # json's C parser recurses once per nesting level
        raise InputError(f"--bad-masks {source}: JSON nested too deeply to be a list of mask paths") from err
    if not isinstance(entries, list):
        raise InputError(
            f"--bad-masks {source}: expected a JSON list of mask paths, got {type(entries).__name__}"
        )
    problems, found = [], []
    for entry in entries:
        rel = _normalise_entry(entry)
        if rel is None:
            problems.append(
                f"--bad-masks {source}: entry {entry!r} is not a mask path like labels/train/<stem>.png"
            )
        elif not rel.startswith("labels/train/"):
            problems.append(
                f"--bad-masks {source}: {entry!r} is not a train mask (val/test are never relabeled)"
            )
        elif not (root / rel).is_file():
            problems.append(f"--bad-masks {source}: {entry!r} does not exist in the dataset ({root / rel})")
        else:
            found.append(rel)
    if problems:
        raise InputError(problems)
    return sorted(set(found))


def suspicious_scores(
    st: store.Store, run_id: str, root: Path, version: str, tiny_area: int
) -> tuple[list[dict], dict]:
    """The EDA's suspicious list for this dataset version and scorer, else scores computed here."""
    prefix = store.stage_prefix(run_id, "eda")
    inputs = {"dataset_version": version, "scorer": eda.scorer_settings(tiny_area)}
    if st.is_current(prefix, inputs):
        local = store.work_dir() / "runs" / run_id / "eda-for-relabel" / "report.json"
        report = json.loads(st.fetch_file(prefix, "report.json", local).read_text())  # not the plots
        return report["suspicious"], {
            "source": st.uri(f"{prefix}/report.json"),
            "score_threshold": report["score_threshold"],
        }
    log.info("no EDA published for dataset %s at %s: scoring train masks here", version, st.uri(prefix))
    return eda.score_dataset(root, tiny_area), {
        "source": "computed by relabel (EDA not published for this dataset version)",
        "score_threshold": eda.SCORE_THRESHOLD,
    }


def check_sam2_config(name: str) -> str:
    """A config name of the installed sam2 package (found without importing sam2 and torch)."""
    package = Path(importlib.util.find_spec("sam2").origin).parent
    if not (package / name).is_file():
        known = sorted(p.relative_to(package).as_posix() for p in (package / "configs").rglob("*.yaml"))
        raise InputError(f"--sam2-config {name}: not a config of the sam2 package; known: {', '.join(known)}")
    return name


@dataclass(frozen=True)
class Plan:
    strategy: str
    reason: str
    models: dict[str, str]


def plan_strategy(args: argparse.Namespace, st: store.Store) -> tuple[Plan, Callable[[], Repair]]:
    """Which strategy runs and a factory building its repair (models load only when it is called)."""

    def morphology() -> Repair:
        return lambda _image, mask: morphology_repair(mask, args.tiny_area)

    if args.strategy == "morphology":
        return Plan("morphology", "requested", {}), morphology
    problems, resolved = [], {}
    for name, spec, filename, flag in (
        ("yolo", args.yolo_weights, YOLO_WEIGHTS_FILE, "--yolo-weights"),
        ("sam2", args.sam2_checkpoint, SAM2_CHECKPOINT_FILE, "--sam2-checkpoint"),
    ):
        try:
            resolved[name] = fetch_weights(st, spec, filename, flag)
        except InputError as err:
            problems += err.problems
    try:
        config = check_sam2_config(args.sam2_config)
    except InputError as err:
        problems += err.problems
    if problems:
        if args.strategy == "yolo_sam2":
            raise InputError(problems)
        reason = "auto: yolo_sam2 weights not available (" + "; ".join(problems) + ")"
        return Plan("morphology", reason, {}), morphology
    device = torch_device()
    models = {
        "yolo_weights": resolved["yolo"][1],
        "sam2_checkpoint": resolved["sam2"][1],
        "sam2_config": config,
        "device": device,
    }
    reason = "requested" if args.strategy == "yolo_sam2" else "auto: yolo_sam2 weights found"

    def build() -> Repair:
        # A weights file that does not load is bad input (exit 2, no retry), named with its flag.
        problems, loaded = [], {}
        for name, flag, load in (
            ("yolo", "--yolo-weights", lambda: YoloDetector(resolved["yolo"][0], device)),
            ("sam2", "--sam2-checkpoint", lambda: Sam2Segmenter(config, resolved["sam2"][0], device)),
        ):
            try:
                loaded[name] = load()
            except Exception as err:  # ultralytics, sam2 and torch each raise their own type
                why = (str(err).strip().splitlines() or [""])[0]
                problems.append(
                    f"{flag} {resolved[name][1]}: not a loadable checkpoint ({type(err).__name__}: {why})"
                )
        if problems:
            raise InputError(problems)
        return YoloSam2Repair(loaded["yolo"], loaded["sam2"], args.tiny_area)

    return Plan("yolo_sam2", reason, models), build


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, help="pipeline run id")
    parser.add_argument("--dataset", required=True, help="dataset: local directory or s3://bucket/prefix")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto", help="repair method (default auto)")
    parser.add_argument(
        "--bad-masks", help="JSON list of bad mask paths (bad_mask_paths.json): local path or s3://"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        help=f"EDA suspicious score that flags a mask (default: the EDA report's, {eda.SCORE_THRESHOLD})",
    )
    parser.add_argument(
        "--tiny-area",
        type=int,
        default=eda.TINY_AREA,
        help=f"speckles under this many px are dropped (default {eda.TINY_AREA})",
    )
    parser.add_argument(
        "--yolo-weights",
        help=f"{YOLO_WEIGHTS_FILE}: local path or s3:// (default $SEGPIPE_WEIGHTS_DIR/{YOLO_WEIGHTS_FILE}, "
        f"else s3://<bucket>/{store.weights_key(YOLO_WEIGHTS_FILE)})",
    )
    parser.add_argument(
        "--sam2-checkpoint",
        help=f"SAM2 checkpoint: local path or s3:// (default $SEGPIPE_WEIGHTS_DIR/{SAM2_CHECKPOINT_FILE}, "
        f"else s3://<bucket>/{store.weights_key(SAM2_CHECKPOINT_FILE)})",
    )
    parser.add_argument(
        "--sam2-config", default=SAM2_CONFIG, help=f"sam2 package config name (default {SAM2_CONFIG})"
    )
    add_recompute_argument(parser)


def report_to_clearml(tracker: tracking.Tracker, report: dict) -> None:
    """Mask counts, repair speed and the per-class median object area before/after (scalars at
    iteration 0): over the repaired masks and over all train masks, all components and objects only."""
    counts = {
        "bad_given": len(report["bad_masks"]["given"]["masks"]),
        "bad_scored": len(report["bad_masks"]["scored"]["masks"]),
        "relabeled": report["repaired"],
        "changed": report["changed"],
        "detections": report.get("detections"),
    }
    for key, value in counts.items():
        if value is not None:
            tracker.report_scalar("masks", key, value, 0)
    for key in ("repair_seconds", "masks_per_s"):
        if report[key] is not None:
            tracker.report_scalar("repair speed", key, report[key], 0)
    for scope, per_class in report["object_area_change"].items():
        for cls, by_kind in per_class.items():
            for kind, change in by_kind.items():
                series = f"{cls} ({kind})"
                if change["median_change_pct"] is not None:
                    tracker.report_scalar(
                        f"median object area change % ({scope} masks)", series, change["median_change_pct"], 0
                    )
                for when in ("before", "after"):
                    if change[f"median_{when}"] is not None:
                        tracker.report_scalar(
                            f"median object area px ({scope} masks)",
                            f"{series} {when}",
                            change[f"median_{when}"],
                            0,
                        )


def write_previews(root: Path, out_dir: Path, changes: list[dict], dest: Path, count: int = 4) -> list[Path]:
    """Side-by-side PNGs (image | original mask | relabeled mask) of the `count` most changed masks."""
    dest.mkdir(parents=True, exist_ok=True)
    images = {eda.mask_key("train", m): i for i, m in list_pairs(root, "train")}
    paths = []
    for change in sorted(changes, key=lambda m: (-m["changed_px"], m["mask"]))[:count]:
        if not change["changed_px"]:
            break
        image = read_image(images[change["mask"]])
        name = Path(change["mask"]).name
        panels = [
            image.astype(np.float64) / 255,
            eda.overlay(image, read_mask(root / change["mask"])),
            eda.overlay(image, read_mask(out_dir / RELABELED_DIR / "train" / name)),
        ]
        path = dest / name
        Image.fromarray((np.concatenate(panels, axis=1) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _flagged(scores: Iterable[dict], threshold: float) -> list[str]:
    return sorted(r["mask"] for r in scores if r["score"] >= threshold)


def main(args: argparse.Namespace) -> int:
    run_id = store.check_run_id(args.run_id)
    eda.check_tiny_area(args.tiny_area)
    st = store.Store.from_env()
    ref = materialize_dataset(args.dataset, st, run_id=args.run_id)
    given = load_bad_list(args.bad_masks, ref.root, st) if args.bad_masks else []
    plan, build_repair = plan_strategy(args, st)
    scores, score_source = suspicious_scores(st, run_id, ref.root, ref.version, args.tiny_area)
    threshold = args.score_threshold if args.score_threshold is not None else score_source["score_threshold"]
    flagged = _flagged(scores, threshold)
    bad = sorted(set(given) | set(flagged))
    inputs = {
        "dataset_version": ref.version,
        "strategy": plan.strategy,
        "models": plan.models,
        "tiny_area": args.tiny_area,
        "bad_masks": bad,
    }
    stage = Stage(st, run_id, "relabel", None, inputs, key=inputs, module=__name__, recompute=args.recompute)
    if stage.reuse() is not None:
        return 0
    out_dir = store.work_dir() / "runs" / run_id / "relabel"
    preview_dir = store.work_dir() / "runs" / run_id / "relabel-previews"  # ClearML only, not published
    log.info("relabel: %s (%s) on %d train masks", plan.strategy, plan.reason, len(bad))
    # what both the ClearML parameters and report.json say of this run
    described = {
        "dataset": {"name": ref.name, "version": ref.version, "uri": ref.uri},
        "strategy_requested": args.strategy,
        "strategy": plan.strategy,
        "strategy_reason": plan.reason,
        "models": plan.models,
        "tiny_area": args.tiny_area,
    }
    params = {
        **described,
        "score_threshold": threshold,
        "bad_masks": {
            "given_source": args.bad_masks,
            "scores_source": score_source["source"],
            "given": len(given),
            "scored": len(flagged),
            "union": len(bad),
        },
    }
    repair = build_repair()  # weights that do not load end the stage before a task is opened

    def body(tracker: tracking.Tracker) -> dict:
        result = relabel_train(ref.root, out_dir, set(bad), repair, args.tiny_area)
        report = {
            **described,
            "rule": MERGE_RULE if plan.strategy == "yolo_sam2" else MORPHOLOGY_RULE,
            "limits": None if plan.strategy == "yolo_sam2" else MORPHOLOGY_LIMITS,
            "bad_masks": {
                "given": {"source": args.bad_masks, "masks": given},
                "scored": {**score_source, "score_threshold": threshold, "masks": flagged},
                "union": bad,
            },
            **result,
        }
        if isinstance(repair, YoloSam2Repair):
            report["detections"] = repair.detections
        (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        report_to_clearml(tracker, report)
        if tracker.enabled:
            for path in write_previews(ref.root, out_dir, report["masks"], preview_dir):
                tracker.report_image("before and after relabel (image, original, relabeled)", path.stem, path)
        tracker.upload_artifact("report", out_dir / "report.json")
        return result

    result = stage.compute(out_dir, params, body, scratch=[preview_dir])
    shutil.rmtree(preview_dir, ignore_errors=True)  # ClearML holds its copies
    log.info("relabel: %d of %d repaired masks changed", result["changed"], result["repaired"])
    return 0
