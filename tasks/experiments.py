"""The experiments, and what every experiment reports: one source for both sides of the pipeline.

An experiment is one file, `configs/<name>_<model>_<size>.py`: an mmseg config (a delta on `_base_`)
that also holds a literal `EXPERIMENT = dict(...)` describing it:

    EXPERIMENT = dict(
        name="h2",               # the id in the params form, the DAG's mapping, run keys, the report
        order=2,                 # the last tie-break of selection: the lower order (the simpler setting) wins
        default=True,            # part of a run that does not name its experiments
        hypothesis="H1 + CrossEntropy class weights",
        model="DeepLabV3+ (DepthwiseSeparableASPPHead), ResNetV1c-50",
        augmentation="RandomFlip 0.5",
        weighting="CE class_weight [0.0585, 1.0, 1.0]",
    )

The catalogue reads that literal with `ast` (`ast.literal_eval` of each value): a config file is never
executed here, so the Airflow side (dags/) lists names and descriptions without torch, mmseg or
mmengine, and this module imports the standard library only. Adding a file adds an experiment to
the params form, the DAG's mapping, train/evaluate, selection and the report, with no code change.

Also here, because every stage must agree on them: the metric keys each evaluation reports.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
METADATA_NAME = "EXPERIMENT"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")  # safe as an argv item, an S3 key part, a task label
TEXT_FIELDS = ("hypothesis", "model", "augmentation", "weighting")
# What mmseg's IoUMetric reports (percent): the summary and, per class, these three.
SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mDice")
PER_CLASS_KEYS = ("IoU", "Dice", "Acc")


class ExperimentFileError(ValueError):
    """An experiment file whose metadata is missing or malformed (the message names the file)."""


@dataclass(frozen=True)
class Experiment:
    """One experiment file's metadata (never its config: that is mmengine's to read)."""

    name: str
    order: int
    default: bool
    hypothesis: str
    model: str
    augmentation: str
    weighting: str
    config_file: Path

    def sort_key(self) -> tuple[int, str]:
        """The fixed order of experiments: by `order`, then by name (total for any set of files)."""
        return (self.order, self.name)

    def description(self) -> dict[str, str]:
        """What the report and the model card say about the experiment."""
        return {field: getattr(self, field) for field in TEXT_FIELDS}


def _literal_metadata(path: Path) -> dict[str, Any]:
    """The file's top-level `EXPERIMENT = dict(...)` (or `{...}`) as plain values, without running it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise ExperimentFileError(f"{path}: cannot read the experiment file ({err})") from err
    found = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == METADATA_NAME for target in node.targets)
    ]
    if len(found) != 1:
        raise ExperimentFileError(
            f"{path}: expected one top-level `{METADATA_NAME} = dict(name=..., order=..., ...)`, "
            f"found {len(found)} (shared bases belong under configs/_base_/)"
        )
    value = found[0]
    try:
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
            if value.args or any(keyword.arg is None for keyword in value.keywords):
                raise ValueError("only keyword=literal items are allowed")
            return {keyword.arg: ast.literal_eval(keyword.value) for keyword in value.keywords}
        metadata = ast.literal_eval(value)
    except ValueError as err:
        raise ExperimentFileError(f"{path}: {METADATA_NAME} must hold literal values only ({err})") from err
    if not isinstance(metadata, dict):
        raise ExperimentFileError(f"{path}: {METADATA_NAME} must be a dict")
    return metadata


def read_experiment_file(path: Path) -> Experiment:
    """One experiment file's metadata, checked; ExperimentFileError naming the file and the field."""
    metadata = _literal_metadata(path)
    expected = {"name", "order", "default", *TEXT_FIELDS}
    problems = [f"missing {key!r}" for key in sorted(expected - set(metadata))]
    problems += [f"unknown field {key!r}" for key in sorted(set(metadata) - expected)]
    name = metadata.get("name")
    if "name" in metadata and not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        problems.append(f"name {name!r} must match {NAME_PATTERN.pattern}")
    order = metadata.get("order")
    if "order" in metadata and (isinstance(order, bool) or not isinstance(order, int)):
        problems.append(f"order {order!r} must be an integer")
    if "default" in metadata and not isinstance(metadata["default"], bool):
        problems.append(f"default {metadata['default']!r} must be True or False")
    problems += [
        f"{key} must be a non-empty one-line string"
        for key in TEXT_FIELDS
        if key in metadata
        and not (isinstance(metadata[key], str) and metadata[key].strip() and "\n" not in metadata[key])
    ]
    if problems:
        raise ExperimentFileError(f"{path}: {METADATA_NAME}: {'; '.join(problems)}")
    return Experiment(config_file=path, **metadata)


@functools.cache
def catalogue(config_dir: Path = CONFIG_DIR) -> dict[str, Experiment]:
    """Every experiment file directly under config_dir, by name, in the fixed order (sort_key)."""
    experiments: dict[str, Experiment] = {}
    for path in sorted(Path(config_dir).glob("*.py")):
        experiment = read_experiment_file(path)
        if experiment.name in experiments:
            other = experiments[experiment.name].config_file
            raise ExperimentFileError(f"{path}: experiment name {experiment.name!r} is also used by {other}")
        experiments[experiment.name] = experiment
    if not experiments:
        raise ExperimentFileError(f"{config_dir}: no experiment files (*.py)")
    return dict(sorted(experiments.items(), key=lambda item: item[1].sort_key()))


def names(config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """Every experiment's name, in the fixed order."""
    return tuple(catalogue(config_dir))


def default_names(config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """The experiments of a run that names none (those with default=True), in the fixed order."""
    return tuple(name for name, experiment in catalogue(config_dir).items() if experiment.default)


def get(name: str, config_dir: Path = CONFIG_DIR) -> Experiment:
    """One experiment; KeyError with the known names if there is none of that name."""
    known = catalogue(config_dir)
    if name not in known:
        raise KeyError(f"unknown experiment {name!r}: expected one of {', '.join(known)}")
    return known[name]


def apply_test_time_augmentation(cfg: Any) -> Any:
    """An experiment whose config defines `tta_model` and `tta_pipeline` is tested with them, as
    mmseg's own `tools/test.py --tta` does it: the test pipeline becomes `tta_pipeline` (mmcv's
    TestTimeAug) and the model is wrapped by `tta_model` (SegTTAModel merges the views). Training and
    its validation are unchanged. Used by evaluate and predict on a resolved mmengine Config."""
    if "tta_model" in cfg and "tta_pipeline" in cfg:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    return cfg
