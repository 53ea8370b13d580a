"""The FiftyOne side of `python -m tasks review` (runs in .venv-fiftyone; stdlib + fiftyone only).

    python -m tasks.review_app build SAMPLES_JSON         # (re)build the dataset, keeping its tags
    python -m tasks.review_app serve NAME --port PORT     # the App on 127.0.0.1 until stopped
    python -m tasks.review_app export NAME --tag TAG      # JSON list of the tagged samples' masks

SAMPLES_JSON is what tasks/review.py prepared (local files only: nothing here reads the store). Each
command's result is the last line of its stdout, as JSON (FiftyOne may print progress before it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

SCORE_FIELD = "suspicion"
SIGNAL_PREFIX = "signal_"
# samples.json key -> the dataset's segmentation field of that mask
MASK_FIELDS = {"ground_truth": "ground_truth", "relabeled": "relabeled", "prediction": "prediction"}


def build(samples_json: Path) -> dict[str, Any]:
    """The dataset doc["name"] from samples.json; a rebuild keeps every tag a person already set."""
    import fiftyone as fo
    from fiftyone.core.odm.dataset import ActiveFields

    doc = json.loads(samples_json.read_text())
    name = doc["name"]
    tags: dict[str, list[str]] = {}
    if fo.dataset_exists(name):
        old = fo.load_dataset(name)
        tags = dict(zip(old.values("mask_key"), old.values("tags"), strict=True))
        old.delete()
    dataset = fo.Dataset(name, persistent=True)
    targets = {int(value): label for value, label in doc["mask_targets"].items()}
    dataset.default_mask_targets = targets
    dataset.info = {"run_id": doc["run_id"], "dataset": doc["dataset"], "winner": doc["winner"]}
    # The App opens with the original masks drawn, in the EDA's overlay colours (samples.json).
    dataset.app_config.active_fields = ActiveFields(paths=["ground_truth"])
    dataset.app_config.color_scheme = fo.ColorScheme(
        color_by="value",
        default_mask_targets_colors=[
            {"intTarget": int(value), "color": colour} for value, colour in doc["mask_colours"].items()
        ],
    )
    samples = []
    for item in doc["samples"]:
        sample = fo.Sample(filepath=item["filepath"], tags=tags.get(item["mask_key"], []))
        sample["mask_key"] = item["mask_key"]
        for key, field in MASK_FIELDS.items():
            if item.get(key):
                sample[field] = fo.Segmentation(mask_path=item[key])
        sample[SCORE_FIELD] = item["suspicion"]
        sample["flagged"] = item["flagged"]
        for signal_name, value in item["signals"].items():
            sample[f"{SIGNAL_PREFIX}{signal_name}"] = value
        samples.append(sample)
    dataset.add_samples(samples)
    dataset.save()
    return {"name": name, "samples": len(dataset), "kept_tags": sum(1 for t in tags.values() if t)}


def serve(name: str, port: int) -> None:
    """The App on 127.0.0.1:port, sorted by suspicion (highest first), until SIGINT/SIGTERM."""
    import fiftyone as fo

    dataset = fo.load_dataset(name)
    view = dataset.sort_by(SCORE_FIELD, reverse=True) if dataset.has_field(SCORE_FIELD) else dataset
    session = fo.launch_app(view, address="127.0.0.1", port=port, remote=True, auto=False)
    print(json.dumps({"app": session.url}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        session.wait(-1)


def export(name: str, tag: str) -> list[str] | None:
    """The mask keys (labels/train/<stem>.png) of the samples tagged `tag`, sorted (None: no dataset)."""
    import fiftyone as fo

    if not fo.dataset_exists(name):
        return None
    dataset = fo.load_dataset(name)
    return sorted(dataset.match_tags(tag).values("mask_key"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.review_app", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build").add_argument("samples_json", type=Path)
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("name")
    serve_parser.add_argument("--port", type=int, required=True)
    export_parser = sub.add_parser("export")
    export_parser.add_argument("name")
    export_parser.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(json.dumps(build(args.samples_json)))
    elif args.command == "serve":
        serve(args.name, args.port)
    else:
        print(json.dumps(export(args.name, args.tag)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
