"""Relabel quality on a generated dataset, against its held-back clean truth (labels_clean/train).

    .venv/bin/python bench/relabel_quality.py [--dataset DIR] [--seed 0] [--n-train 200]
        [--sam2-images 2] [--yolo-model yolov8x.yaml] [--sam2-config configs/sam2.1/sam2.1_hiera_l.yaml]

Prints, side by side:
- the EDA scorer's precision / recall / F1 on the injected defects (defects.json), at the scorer's
  threshold, and how many defects leave no geometric trace (a missing object or part with nothing else);
- mask IoU against the clean truth of the defective masks before and after `morphology` relabeling
  (mean per mask over the classes in either mask; pooled per class), and of the clean masks the scorer
  flagged by mistake (what relabeling them costs);
- throughput (masks/s) of each strategy that runs here: morphology, and yolo_sam2 with models built
  WITHOUT weights (the study's architectures, YOLOv8x + SAM2.1 hiera-large, randomly initialised, boxes
  injected from the clean truth because an untrained detector finds none). Its masks are noise, so its
  IoU is meaningless and not reported: only its speed, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tasks import eda, relabel
from tasks.dataset import list_pairs, read_image, read_mask
from tasks.synth import generate


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the foreground classes present in either mask (1.0 when neither has any)."""
    ious = []
    for c in eda.FOREGROUND:
        union = int(((pred == c) | (truth == c)).sum())
        if union:
            ious.append(int(((pred == c) & (truth == c)).sum()) / union)
    return float(np.mean(ious)) if ious else 1.0


def pooled_iou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    out = {}
    for c in eda.FOREGROUND:
        inter = sum(int(((p == c) & (t == c)).sum()) for p, t in pairs)
        union = sum(int(((p == c) | (t == c)).sum()) for p, t in pairs)
        out[eda.CLASSES[c]] = round(inter / union, 4) if union else float("nan")
    return out


def scorer_quality(root: Path, defects: set[str]) -> tuple[dict, list[dict]]:
    start = time.perf_counter()
    scored = eda.score_dataset(root)
    seconds = time.perf_counter() - start
    flagged = {r["mask"] for r in scored if r["score"] >= eda.SCORE_THRESHOLD}
    tp = len(flagged & defects)
    precision = tp / len(flagged) if flagged else 0.0
    recall = tp / len(defects) if defects else 0.0
    traceless = [r["mask"] for r in scored if r["mask"] in defects and r["score"] == 0]
    return {
        "threshold": eda.SCORE_THRESHOLD,
        "defects": len(defects),
        "flagged": len(flagged),
        "true_positives": tp,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(2 * precision * recall / (precision + recall), 3) if tp else 0.0,
        "defects_with_no_signal": len(traceless),
        "scoring_masks_per_s": round(len(scored) / seconds, 1),
    }, scored


def morphology_quality(root: Path, defects: set[str], flagged: set[str], out_dir: Path) -> dict:
    bad = defects | flagged
    tiny = eda.TINY_AREA
    result = relabel.relabel_train(
        root, out_dir, bad, lambda _image, mask: relabel.morphology_repair(mask, tiny), tiny
    )
    written = out_dir / relabel.RELABELED_DIR / "train"

    def triples(keys: set[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [
            (
                read_mask(root / key),
                read_mask(written / Path(key).name),
                read_mask(root / key.replace("labels/", "labels_clean/", 1)),
            )
            for key in sorted(keys)
        ]

    defective = triples(defects)
    false_alarms = triples(flagged - defects)
    return {
        "relabeled_masks": len(bad),
        "defective_mean_iou_before": round(float(np.mean([mask_iou(b, t) for b, _, t in defective])), 4),
        "defective_mean_iou_after": round(float(np.mean([mask_iou(a, t) for _, a, t in defective])), 4),
        "defective_pooled_iou_before": pooled_iou([(b, t) for b, _, t in defective]),
        "defective_pooled_iou_after": pooled_iou([(a, t) for _, a, t in defective]),
        "false_alarms": len(false_alarms),
        "false_alarm_mean_iou_after": (
            round(float(np.mean([mask_iou(a, t) for _, a, t in false_alarms])), 4) if false_alarms else None
        ),
        "masks_per_s": result["masks_per_s"],
        "median_object_area_change": result["object_area_change"]["bad"],
    }


class TruthBoxDetector:
    """The untrained YOLO runs (its cost counts); where it finds nothing, clean-truth boxes stand in."""

    def __init__(self, yolo: relabel.YoloDetector, boxes: dict[bytes, list[relabel.Detection]]):
        self.yolo, self.boxes = yolo, boxes

    def __call__(self, image: np.ndarray) -> list[relabel.Detection]:
        return self.yolo(image) or self.boxes[hashlib.sha256(image.tobytes()).digest()]


def yolo_sam2_throughput(
    root: Path, keys: list[str], yolo_model: str, sam2_config: str, out_dir: Path
) -> dict:
    boxes: dict[bytes, list[relabel.Detection]] = {}
    images = {Path(m).name: i for i, m in list_pairs(root, "train")}
    for key in keys:
        clean = read_mask(root / key.replace("labels/", "labels_clean/", 1))
        found = []
        for c in eda.FOREGROUND:
            ys, xs = np.nonzero(clean == c)
            if ys.size:
                found.append(relabel.Detection((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), c, 0.9))
        boxes[hashlib.sha256(read_image(images[Path(key).name]).tobytes()).digest()] = found
    device = relabel.torch_device()
    start = time.perf_counter()
    detector = TruthBoxDetector(relabel.YoloDetector(yolo_model, device), boxes)
    segmenter = relabel.Sam2Segmenter(sam2_config, None, device)
    build_s = time.perf_counter() - start
    repair = relabel.YoloSam2Repair(detector, segmenter, tiny_area=eda.TINY_AREA)
    result = relabel.relabel_train(root, out_dir, set(keys), repair, tiny_area=eda.TINY_AREA)
    return {
        "note": "models WITHOUT weights: throughput only, masks are noise (IoU not meaningful)",
        "yolo_model": yolo_model,
        "sam2_config": sam2_config,
        "device": device,
        "masks": len(keys),
        "prompts": repair.detections,
        "model_build_s": round(build_s, 2),
        "masks_per_s": result["masks_per_s"],
        "s_per_mask": round(1 / result["masks_per_s"], 2) if result["masks_per_s"] else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="a generated dataset (default: generate one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--sam2-images", type=int, default=2, help="masks timed through yolo_sam2 (0: skip)")
    parser.add_argument("--yolo-model", default="yolov8x.yaml", help="architecture built without weights")
    parser.add_argument("--sam2-config", default=relabel.SAM2_CONFIG)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="relabel-bench-") as tmp:
        tmp_dir = Path(tmp)
        root = args.dataset
        if root is None:
            start = time.perf_counter()
            root = generate(tmp_dir / "synth", seed=args.seed, n_train=args.n_train, n_val=1, n_test=1)
            print(f"generated {args.n_train} train masks (tasks.synth, seed {args.seed}) in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)  # fmt: skip
        defects = set(json.loads((root / "defects.json").read_text()))
        scorer, scored = scorer_quality(root, defects)
        flagged = {r["mask"] for r in scored if r["score"] >= eda.SCORE_THRESHOLD}
        report = {"dataset": str(root), "scorer": scorer}
        report["morphology"] = morphology_quality(root, defects, flagged, tmp_dir / "morphology")
        if args.sam2_images > 0:
            with_boxes = [
                k
                for k in sorted(defects)
                if (read_mask(root / k.replace("labels/", "labels_clean/", 1)) > 0).any()
            ]
            report["yolo_sam2_weightless"] = yolo_sam2_throughput(
                root, with_boxes[: args.sam2_images], args.yolo_model, args.sam2_config, tmp_dir / "yolo_sam2"
            )
    print(json.dumps(report, indent=2))
    m = report["morphology"]
    print(
        f"\nscorer: precision {scorer['precision']:.2f} recall {scorer['recall']:.2f} "
        f"({scorer['true_positives']}/{scorer['defects']} defects, {scorer['flagged']} flagged)\n"
        f"morphology: defective-mask IoU {m['defective_mean_iou_before']:.3f} -> "
        f"{m['defective_mean_iou_after']:.3f}, {m['masks_per_s']:.1f} masks/s",
        file=sys.stderr,
    )
    if "yolo_sam2_weightless" in report:
        y = report["yolo_sam2_weightless"]
        print(f"yolo_sam2 (weightless {y['yolo_model']} + {y['sam2_config']}, {y['device']}): "
              f"{y['masks_per_s']} masks/s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
