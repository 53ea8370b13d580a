"""One command line for every stage: `python -m tasks <step> ...`.

A stage module is imported only when its step runs (or its `--help` is asked for), so
`python -m tasks --help` stays fast and a step never pays for another step's imports.
Each stage module exposes `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tasks.errors import InputError, QualityGateError

# step -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("tasks.synth", "generate a synthetic dataset in the study's layout"),
    "validate": ("tasks.dataset", "check a dataset (local dir or s3:// prefix); print counts and version"),
    "eda": ("tasks.eda", "class shares, object areas, tiny components, suspicious-mask scores"),
    "relabel": ("tasks.relabel", "relabel bad train masks (YOLOv8 + SAM2, or morphology)"),
    "train": ("tasks.train", "train one study experiment with mmengine's Runner"),
    "evaluate": ("tasks.evaluate", "evaluate an experiment's best checkpoint on a split"),
    "select": ("tasks.selection", "pick the winner by val mDice, gate it, promote the champion"),
    "models": ("tasks.models", "list the promoted model versions; roll production back to one"),
    "review": ("tasks.review", "review a run's train masks in FiftyOne; export the bad_mask tags"),
    "predict": ("tasks.predict", "segment images with the promoted (or a trained) model: masks and overlays"),
}


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM handler of a stage process (tasks/__main__.py): unwind now and exit 128 + signum.

    Airflow stops a task (timeout, kill, marked failed) and `docker stop` a container with SIGTERM.
    Raised as SystemExit, it runs the stage's `with`/`finally` blocks (tracking closes) and nothing
    after them: a stage publishes last, so nothing is published. A container's PID 1 needs a handler:
    the kernel drops signals whose action is the default one there.
    """
    os.write(2, b"stopped by SIGTERM\n")  # a raw write: safe whatever the interrupted code was printing
    raise SystemExit(128 + signum)


def build_parser(step: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="python logging level (default INFO)")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (module, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == step:
            importlib.import_module(module).add_arguments(stage_parser)
    return parser


def _requested_step(argv: list[str]) -> str | None:
    return next((a for a in argv if a in STAGES), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_requested_step(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module = importlib.import_module(STAGES[args.step][0])
    try:
        return int(module.main(args) or 0)
    except InputError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except QualityGateError as err:
        print(f"quality gate failed: {err}", file=sys.stderr)
        return 3
