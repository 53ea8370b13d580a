"""EDA cost against dataset size: 1k and 10k masks, and the ratio (linear scaling means ~10).

    .venv/bin/python bench/eda_scale.py [--sizes 1000 10000] [--size 256] [--repeat 2]

Masks come from a cheap generator here, not tasks.synth (which draws textured images: ~35 ms per
sample): 256x256 label maps with 0-2 ellipses of cat/dog at study-like areas, stray speckles in ~20%
and a blocky (coarse-grid) outline in ~10% of them, written as PNG; every image is a hard link to one
grey PNG (EDA reads masks; images only for the 16 masks of the suspicious grid). All masks go to train,
the split where EDA also scores every mask. Each size runs `tasks.eda.run_eda` in a fresh process
(--repeat times; the fastest run counts, since other work shares the CPUs),
which reports its own wall time (split into measuring the masks, which grows with them, and the fixed
cost of the plots) and peak RSS (memory must stay bounded as the count grows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def generate_masks(root: Path, count: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for top in ("images", "labels"):
        for split in ("train", "val", "test"):
            (root / top / split).mkdir(parents=True, exist_ok=True)
    grey = root / "grey.png"
    cv2.imwrite(str(grey), np.full((size, size, 3), 128, np.uint8))
    k = size / 256
    for split, n in (("train", count), ("val", 1), ("test", 1)):
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            for cls in (1, 2):
                if rng.random() < 0.5:
                    area = float(np.clip(rng.lognormal(np.log(5000), 0.55), 700, 17000)) * k * k
                    a = np.sqrt(area / np.pi * rng.uniform(1.2, 2.5))
                    b = area / np.pi / a
                    centre = (int(rng.uniform(0.2, 0.8) * size), int(rng.uniform(0.2, 0.8) * size))
                    cv2.ellipse(mask, (centre, (2 * a, 2 * b), float(rng.uniform(0, 180))), cls, -1)
            if rng.random() < 0.1:  # a coarse-grid annotation
                block = int(rng.integers(6, 12))
                small = cv2.resize(mask, (size // block, size // block), interpolation=cv2.INTER_NEAREST)
                mask = cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)
            if rng.random() < 0.2:
                for _ in range(int(rng.integers(1, 5))):
                    y, x = rng.integers(0, size - 4, 2)
                    mask[y : y + 3, x : x + 3] = rng.integers(1, 3)
            stem = f"{i:07d}"
            cv2.imwrite(str(root / "labels" / split / f"{stem}.png"), mask)
            os.link(grey, root / "images" / split / f"{stem}.png")


def run_child(root: Path) -> dict:
    """Time run_eda in this (fresh) process; print seconds and peak RSS as JSON."""
    from tasks import eda

    start = time.perf_counter()
    report = eda.run_eda(root, root / "eda-out")
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": round(seconds, 2),
        "measure_s": report["seconds"]["masks"],
        "plots_s": report["seconds"]["plots"],
        "peak_rss_mb": round(rss_mb, 1),
        "flagged": report["flagged"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=256, help="mask side in px")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per size; the fastest counts (shared CPUs)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="eda-scale-") as tmp:
        for count in args.sizes:
            root = Path(tmp) / f"n{count}"
            start = time.perf_counter()
            generate_masks(root, count, args.size)
            gen_s = time.perf_counter() - start
            runs = []
            for _ in range(args.repeat):
                child = subprocess.run(
                    [sys.executable, __file__, "--child", str(root)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
            best = min(runs, key=lambda r: r["seconds"])
            results[count] = {**best, "runs_s": [r["seconds"] for r in runs], "generate_s": round(gen_s, 1)}
            results[count]["masks_per_s"] = round(count / results[count]["seconds"], 1)
            print(f"{count} masks: {results[count]}", file=sys.stderr)
    sizes = sorted(results)
    summary = {"results": results}
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        summary["time_ratio"] = round(results[hi]["seconds"] / results[lo]["seconds"], 2)
        summary["measure_ratio"] = round(results[hi]["measure_s"] / results[lo]["measure_s"], 2)
        summary["size_ratio"] = hi / lo
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
