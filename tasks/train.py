"""Train one study experiment with mmengine's Runner: `python -m tasks train --experiment h1 ...`.

Flow: materialize the dataset -> choose the train labels (relabel stage output, else the dataset's
labels_sam2/train, else labels/train) -> a dataset view (symlinks) under the local work dir ->
the experiment's config (+ profile overlay, --max-epochs, then --cfg-options, merged last) -> mmengine
Runner with two hooks of ours:
`StoreMirrorHook` (resume state to the store after every validation) and tracking.TrackerHook.
Outputs go to runs/<id>/train/<exp>/: best.pth (weights of the best val-mDice epoch), config.py,
log.json, val_metrics.json, clearml/.

Resume: the mirror (runs/<id>/train/<exp>/work/) holds the latest post-validation checkpoint, the
best checkpoint and the logs; a retry with the same inputs downloads it and resumes at the next
epoch. Caching (tasks/stage.py): a training with the same cache key (inputs, --cfg-options, the
resolved config's content, the code) published by this run or any earlier one is reused, not trained.

Imports: torch, mmseg and mmengine's runner and hooks are imported inside the functions that train
(or load weights), never at module level: a cache hit computes its key from the config alone
(`load_experiment_config(..., register=False)`) and copies the outputs without loading them.

Public helpers evaluate reuses: `load_experiment_config`, `set_data_root`, `prepare_dataset_view`,
`resolve_train_labels`, `fetch_training_outputs`, `configure_torch_threads`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mmengine.config import Config  # no torch: the cache key needs the resolved config only

from tasks import experiments, overrides
from tasks.dataset import SPLITS
from tasks.errors import InputError
from tasks.experiments import PER_CLASS_KEYS, SUMMARY_KEYS
from tasks.materialize import materialize_dataset
from tasks.stage import Stage, add_recompute_argument
from tasks.store import (
    Store,
    check_run_id,
    marker_key,
    parse_s3_uri,
    sha256_file,
    stage_prefix,
    work_dir,
)

log = logging.getLogger(__name__)

PROFILE_DIR = experiments.CONFIG_DIR / "profiles"
PROFILES = ("full", "cpu")
BEST_INFO_KEY = "best_val"  # message-hub entry: the best epoch's checkpoint name, epoch and metrics
MIRROR_INDEX = "mirror.json"  # written last: the mirror's files, epoch and inputs
# ---------------------------------------------------------------- configs


def experiment_config_path(experiment: str) -> Path:
    """The experiment's file under configs/ (tasks.experiments); InputError for an unknown name."""
    try:
        return experiments.get(experiment).config_file
    except KeyError as err:
        raise InputError(err.args[0]) from None


def set_data_root(cfg: Config, dataset_root: Path) -> Config:
    """Point the train/val/test dataloaders at a dataset in the study's layout (e.g. a view)."""
    cfg.data_root = str(dataset_root)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(dataset_root)
    return cfg


def set_max_epochs(cfg: Config, max_epochs: int) -> Config:
    """Change the schedule length; schedulers that ended at the old last epoch end at the new one."""
    if max_epochs < 1:
        raise InputError(f"--max-epochs must be at least 1 (got {max_epochs})")
    old = cfg.train_cfg.max_epochs
    cfg.train_cfg.max_epochs = max_epochs
    for scheduler in cfg.param_scheduler:
        if scheduler.get("end") == old:
            scheduler.end = max_epochs
        # a warm-up longer than the whole schedule would never finish
        scheduler.begin = min(scheduler.get("begin", 0), max_epochs - 1)
        scheduler.end = min(scheduler.end, max_epochs)
    return cfg


def _pipelines(cfg: Config) -> list[list]:
    pipelines = [
        cfg[loader].dataset.pipeline for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
    ]
    pipelines += [cfg[name] for name in ("train_pipeline", "test_pipeline", "tta_pipeline") if name in cfg]
    return pipelines


def _rescale_images(cfg: Config, image_size: int) -> None:
    """Every 256-pixel size (the study's scale) becomes image_size; ratios and probabilities stay."""
    factor = image_size / cfg.img_scale[0]

    def scaled(size: Any) -> Any:
        return (
            tuple(round(s * factor) for s in size) if isinstance(size, list | tuple) else round(size * factor)
        )

    def rescale(pipeline: list) -> None:
        for transform in pipeline:
            for key in ("scale", "crop_size"):
                if key in transform:
                    transform[key] = scaled(transform[key])
            for branch in transform.get("transforms", []) if transform.type == "TestTimeAug" else []:
                rescale(branch)  # the views of test-time augmentation (tta_pipeline)

    for pipeline in _pipelines(cfg):
        rescale(pipeline)
    cfg.model.data_preprocessor.size = scaled(cfg.model.data_preprocessor.size)
    cfg.img_scale, cfg.crop_size = scaled(cfg.img_scale), scaled(cfg.crop_size)


def apply_profile(cfg: Config, profile: str) -> Config:
    """Overlay configs/profiles/<profile>.py ('full' = the study's settings, no overlay)."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    if profile == "full":
        return cfg
    overlay = Config.fromfile(PROFILE_DIR / f"{profile}.py")
    family = cfg.model.backbone.type
    if family not in overlay.models:
        raise InputError(f"{PROFILE_DIR / f'{profile}.py'}: no `models` entry for backbone {family}")
    cfg.merge_from_dict(overlay.common.to_dict())
    cfg.merge_from_dict(overlay.models[family].to_dict())
    _rescale_images(cfg, overlay.image_size)
    set_max_epochs(cfg, overlay.max_epochs)
    for hook in cfg.custom_hooks:
        if hook.type == "ResumableEarlyStoppingHook":
            hook.patience = overlay.early_stopping_patience
    return cfg


def _kind(value: Any) -> str | None:
    """What an overridden value has to stay (None: anything goes)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a section"
    return None


def registered_name(name: str, registry_name: str) -> bool:
    """Whether mmseg's registry `registry_name` or its mmengine parent holds `name` itself.

    Looked up in the registries' own tables, never through `Registry.get`, which imports any dotted
    path it is given (`subprocess.Popen` would be "registered").
    """
    from tasks import mmcompat  # torch and mmseg: only a registry option needs them

    mmcompat.apply()  # before the first mmseg import
    import mmengine.optim  # noqa: F401  (registers mmengine's optimizers and wrappers)
    import mmseg.registry

    registry = getattr(mmseg.registry, registry_name)
    registry.import_from_location()
    while registry is not None:
        if name in registry.module_dict:
            return True
        registry = registry.parent
    return False


def apply_cfg_options(cfg: Config, options: dict[str, Any]) -> Config:
    """Merge overrides into a resolved config: values only (tasks.overrides), checked against it.

    Refused (InputError naming the option): anything tasks.overrides refuses (keys outside its
    allow-list, values of another kind), a key the experiment's config does not have (a path through
    a section or list item that does not exist, or a leaf that is not there), a value of another kind
    than the one it replaces, and a name its registry does not hold.
    """
    for key, value in overrides.check_values(options).items():
        option = f"--cfg-options {key}={value}"
        *parents, leaf = key.split(".")
        node: Any = cfg
        for depth, part in enumerate(parents):
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                where = ".".join(parents[: depth + 1])
                raise InputError(f"{option}: {where} does not exist in the config") from None
        if isinstance(node, list) and not (leaf.isdigit() and int(leaf) < len(node)):
            raise InputError(f"{option}: {key} is not an item of a {len(node)}-item list")
        if not isinstance(node, Config | dict | list):
            raise InputError(f"{option}: {'.'.join(parents)} is {node!r}, not a section")
        if not isinstance(node, list) and leaf not in node:
            raise InputError(f"{option}: {key} does not exist in the {cfg.experiment} config")
        old = node[int(leaf)] if isinstance(node, list) else node[leaf]
        if None not in (_kind(old), _kind(value)) and _kind(old) != _kind(value):
            has = "" if isinstance(old, dict) else f" (the config has {old!r})"
            raise InputError(f"{option}: expected {_kind(old)}{has}")
        registry = overrides.kind_of(key).registry
        if registry and not registered_name(value, registry):
            raise InputError(f"{option}: no {value!r} in the {registry} registry (mmseg/mmengine)")
        cfg.merge_from_dict({key: value})
    return cfg


def register_config_modules(cfg: Config) -> Config:
    """Import the config's `custom_imports` (tasks.mmseg_setup: mmseg, torch), as mmengine's
    `Config.fromfile` would: what building anything from the config needs."""
    from mmengine.utils import import_modules_from_strings

    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    return cfg


def load_experiment_config(
    experiment: str,
    profile: str = "full",
    dataset_root: Path | None = None,
    work_dir: Path | None = None,
    max_epochs: int | None = None,
    pretrained: Path | None = None,
    cfg_options: dict[str, Any] | None = None,
    register: bool = True,
) -> Config:
    """The resolved mmengine Config of one experiment: its file, the profile overlay, then overrides.

    dataset_root: a dataset in the study's layout (a view from `prepare_dataset_view`); pretrained:
    a local backbone checkpoint (full profile only; None = train from scratch); cfg_options: from
    `overrides.parse_items` (or recorded ones), merged last and recorded as `cfg_options`.
    register: import the config's custom modules (`register_config_modules`); False gives the same
    config without importing mmseg or torch, for what only reads it (a cache key).
    """
    cfg = Config.fromfile(experiment_config_path(experiment), import_custom_modules=False)
    apply_profile(cfg, profile)
    if dataset_root is not None:
        set_data_root(cfg, Path(dataset_root))
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    if max_epochs is not None:
        set_max_epochs(cfg, max_epochs)
    if pretrained is not None:
        if profile != "full":
            raise InputError(
                f"--pretrained {pretrained}: pretrained weights fit the full profile's backbones "
                f"(ResNet-50 V1c, MiT-B2); the {profile} profile shrinks the backbone"
            )
        cfg.model.pretrained = str(pretrained)
    cfg.experiment, cfg.profile = experiment, profile
    apply_cfg_options(cfg, cfg_options or {})
    cfg.cfg_options = cfg_options or {}
    return register_config_modules(cfg) if register else cfg


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainLabels:
    """Which train masks a training uses: a local folder, where it came from, and its version."""

    path: Path
    source: str
    version: str | None  # the relabel output's content digest; None when the dataset version covers it
    # relabel's published prefix, downloaded into path by `fetch_train_labels`; None: the dataset's own
    relabel_prefix: str | None = None


def _relabeled_masks_digest(marker: dict) -> str:
    # the masks' checksums only: relabel's ClearML session zip differs on every run
    masks = {rel: sha for rel, sha in marker["files"].items() if rel.startswith("labels_sam2/train/")}
    return hashlib.sha256(json.dumps(masks, sort_keys=True).encode()).hexdigest()[:16]


def resolve_train_labels(
    store: Store, run_id: str, dataset_root: Path, cache_dir: Path, download: bool = True
) -> TrainLabels:
    """The run's relabeled train masks when relabel published, else labels_sam2/train, else labels/train.

    download=False: relabel's masks are not downloaded yet (their version comes from the marker:
    what a cache key needs); `fetch_train_labels` downloads them."""
    prefix = stage_prefix(run_id, "relabel")
    marker = store.marker(prefix)
    if marker is not None:
        if not any(rel.startswith("labels_sam2/train/") for rel in marker["files"]):
            raise InputError(f"{store.uri(prefix)}: relabel outputs have no labels_sam2/train/")
        path = cache_dir / "labels_sam2" / "train"
        labels = TrainLabels(
            path, f"{store.uri(prefix)}/labels_sam2/train", _relabeled_masks_digest(marker), prefix
        )
        return fetch_train_labels(store, labels, cache_dir) if download else labels
    for rel in ("labels_sam2/train", "labels/train"):
        if (dataset_root / rel).is_dir():
            return TrainLabels(dataset_root / rel, f"dataset:{rel}", None)
    raise InputError(f"{dataset_root}: no labels/train/ folder")


def fetch_train_labels(store: Store, labels: TrainLabels, cache_dir: Path) -> TrainLabels:
    """Download relabel's published outputs into cache_dir (nothing for the dataset's own labels),
    sha256-checked; RuntimeError (a retry) if relabel published other masks since `labels` was made."""
    if labels.relabel_prefix is not None:
        marker = store.fetch_marked(labels.relabel_prefix, cache_dir, wait_s=0)
        if _relabeled_masks_digest(marker) != labels.version:
            raise RuntimeError(f"{store.uri(labels.relabel_prefix)}: re-published with other masks meanwhile")
    return labels


def prepare_dataset_view(dataset_root: Path, train_labels: Path, view_dir: Path) -> Path:
    """A folder in the study's layout made of symlinks: images/*, labels/{val,test}, labels/train ->
    train_labels. Rebuilt on every call, so it never points at a previous source."""
    if view_dir.exists():
        shutil.rmtree(view_dir)
    links = {f"images/{split}": dataset_root / "images" / split for split in SPLITS}
    links |= {"labels/val": dataset_root / "labels" / "val", "labels/test": dataset_root / "labels" / "test"}
    links["labels/train"] = train_labels
    for rel, target in links.items():
        if not target.is_dir():
            raise InputError(f"{target}: folder missing (needed as {rel} of the training dataset)")
        link = view_dir / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve(), target_is_directory=True)
    return view_dir


# ---------------------------------------------------------------- runtime


def configure_torch_threads() -> int:
    """On CPU: one intra-op thread per core but one (unless OMP_NUM_THREADS says otherwise).

    Measured on the 2-core workplace (bench notes in the train issue): 2 threads make a CPU-profile
    step only ~15% faster than 1 when the machine is idle, but ~70x slower as soon as other
    processes compete (OpenMP threads spin at every barrier while a sibling is descheduled); the
    spare core also runs the data-loading worker, the S3 server and Airflow.
    """
    import torch

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    return torch.get_num_threads()


@cache
def _store_mirror_hook() -> type:
    from mmengine.hooks import Hook  # torch: only a training builds the hook

    class StoreMirrorHook(Hook):
        """After every validation: save the resume checkpoint and mirror it, the best one and the logs.

        mmengine's CheckpointHook saves epoch_N.pth BEFORE epoch N's validation, so its message hub
        misses that validation (best score, best checkpoint, early-stopping state): resuming from it
        would forget a best epoch N. This hook saves epoch_N.pth again after validation, then uploads
        what changed and deletes superseded keys. `mirror.json` goes last and names the files, the
        inputs and two resume points (this validation's checkpoint and the one before, each with the
        best checkpoint its message hub names), so a retry that finds the newest one corrupt resumes
        from the other; a retry with other inputs ignores the mirror.
        """

        priority = "LOWEST"  # after CheckpointHook (best checkpoint) and early stopping (its state)

        def __init__(self, store: Store, prefix: str, inputs: dict, resumed: dict | None = None) -> None:
            self.store, self.prefix, self.inputs = store, prefix, inputs
            self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) already uploaded
            self._previous = resumed  # the resume point before the newest (uploaded earlier)

        def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
            # The message hub stores absolute paths of the worker that saved it; a retry may run elsewhere.
            info = checkpoint.get("message_hub", {}).get("runtime_info", {})
            for key in ("best_ckpt", "last_ckpt"):
                if info.get(key):
                    info[key] = os.path.join(runner.work_dir, os.path.basename(info[key]))

        def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
            hub = runner.message_hub
            best = hub.get_info("best_ckpt")
            if best and os.path.basename(best) != (hub.get_info(BEST_INFO_KEY) or {}).get("checkpoint"):
                plain = {
                    key: None if value is None else float(value) for key, value in (metrics or {}).items()
                }
                hub.update_info(
                    BEST_INFO_KEY, dict(checkpoint=os.path.basename(best), epoch=runner.epoch, metrics=plain)
                )
            name = f"epoch_{runner.epoch}.pth"
            runner.save_checkpoint(runner.work_dir, name, meta=dict(epoch=runner.epoch, iter=runner.iter))
            Path(runner.work_dir, "last_checkpoint").write_text(os.path.join(runner.work_dir, name))
            self.mirror(Path(runner.work_dir), name, best, runner.epoch)

        def mirror(self, work: Path, checkpoint: str, best: str | None, epoch: int) -> None:
            point = dict(epoch=epoch, checkpoint=checkpoint, best=os.path.basename(best) if best else None)
            files = [checkpoint, "last_checkpoint"] + ([point["best"]] if best else [])
            # logs of this and earlier attempts: <timestamp>/<timestamp>.log, <timestamp>/vis_data/*.json
            files += sorted(p.relative_to(work).as_posix() for p in work.glob("*/**/*") if p.is_file())
            for rel in files:
                stat = (work / rel).stat()
                if self._sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    self.store.upload_file(work / rel, f"{self.prefix}/{rel}")
                    self._sent[rel] = (stat.st_size, stat.st_mtime_ns)
            points = [point] + ([self._previous] if self._previous and self._previous != point else [])
            kept = [rel for p in points[1:] for rel in _point_files(p) if rel not in files]  # uploaded before
            index = dict(
                inputs=self.inputs, epoch=epoch, checkpoint=checkpoint, files=files + kept, points=points
            )
            self.store.put_json(f"{self.prefix}/{MIRROR_INDEX}", index)
            wanted = {f"{self.prefix}/{rel}" for rel in [*index["files"], MIRROR_INDEX]}
            stale = [key for key in self.store.list_keys(self.prefix) if key not in wanted]
            if stale:
                self.store.delete_keys(stale)
            self._previous = point
            log.info("mirrored epoch %d (%s) to %s", epoch, checkpoint, self.store.uri(self.prefix))

    return StoreMirrorHook


def _point_files(point: dict) -> list[str]:
    return [point["checkpoint"]] + ([point["best"]] if point.get("best") else [])


@dataclass(frozen=True)
class Resume:
    """Where a retry resumes: a checkpoint of the mirror that loads, and its resume point."""

    checkpoint: Path
    point: dict


def _check_loads(path: Path, resume: bool) -> None:
    """Raise unless path loads as a checkpoint (as data: weights_only, tasks.mmcompat) with the
    parts a resume (or, for a best checkpoint, the published weights) needs."""
    from tasks import mmcompat  # torch: only a resume loads checkpoints

    checkpoint = mmcompat.load_checkpoint_file(str(path), map_location="cpu")
    needed = ("meta", "state_dict", "message_hub", "optimizer") if resume else ("meta", "state_dict")
    missing = [key for key in needed if key not in checkpoint]
    if missing:
        raise ValueError(f"{path.name}: not a whole checkpoint (no {', '.join(missing)})")


def restore_mirror(store: Store, prefix: str, inputs: dict, local_work: Path) -> Resume | None:
    """Download the mirrored work dir if it was written for these inputs; where to resume.

    The newest resume point whose checkpoint (and best checkpoint) download, verify and load wins;
    a corrupt or missing one is logged and skipped, so a bad upload never fails every retry. With
    no usable point the mirror is deleted and the training starts over.
    """
    key = f"{prefix}/{MIRROR_INDEX}"
    if not store.exists(key):
        return None
    index = store.get_json(key)
    if index.get("inputs") != json.loads(json.dumps(inputs)):
        log.info("ignoring the mirror in %s: it was written for other inputs", store.uri(prefix))
        return None
    for point in index.get("points") or []:
        try:
            for rel in _point_files(point):
                _check_loads(
                    store.download_file(f"{prefix}/{rel}", local_work / rel), rel == point["checkpoint"]
                )
        except Exception as err:  # a corrupt, truncated, forged or missing object: try the point before
            log.warning(
                "discarding the mirrored checkpoint of epoch %s (%s): %s",
                point.get("epoch"),
                store.uri(prefix),
                err,
            )
            continue
        for rel in index["files"]:  # the logs of the earlier attempts, best effort
            if rel not in _point_files(point) and rel != "last_checkpoint":
                try:
                    store.download_file(f"{prefix}/{rel}", local_work / rel)
                except Exception as err:
                    log.warning("mirror log %s not restored: %s", rel, err)
        (local_work / "last_checkpoint").write_text(str(local_work / point["checkpoint"]))
        log.info("downloaded the mirror of epoch %d from %s", point["epoch"], store.uri(prefix))
        return Resume(local_work / point["checkpoint"], point)
    log.warning(
        "no usable checkpoint in the mirror %s: discarding it, training starts over", store.uri(prefix)
    )
    store.delete_keys(store.list_keys(prefix))
    for path in list(local_work.iterdir()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


# ---------------------------------------------------------------- outputs


def _scalar_logs(work: Path) -> list[Path]:
    # one <timestamp>/vis_data/<timestamp>.json per attempt (scalars.json duplicates it); timestamps sort
    return sorted(p for p in work.glob("*/vis_data/*.json") if p.name != "scalars.json")


def metrics_from_flat(flat: dict[str, float | None], classes: tuple[str, ...]) -> dict:
    """PerClassIoUMetric's flat keys (mDice, Dice.cat, ...) -> the contract's {summary..., per_class}."""
    from tasks import mmcompat  # torch and mmseg: tasks.metrics imports mmseg

    mmcompat.apply()
    from tasks.metrics import metrics_document  # the contract's metric JSON shape lives there

    per_class = {cls: {key: flat.get(f"{key}.{cls}") for key in PER_CLASS_KEYS} for cls in classes}
    return metrics_document({key: flat[key] for key in SUMMARY_KEYS}, per_class)


def _published_best(work: Path, best_name: str) -> Path:
    # CheckpointHook(published_keys=[meta, state_dict]) writes <best stem>-<sha8>.pth after training
    stem = Path(best_name).stem
    found = sorted(work.glob(f"{stem}-*.pth"))
    if not found:
        raise RuntimeError(f"{work}: no weights-only copy of {best_name} (CheckpointHook published_keys?)")
    return found[-1]


def training_config(inputs: Any, experiment: str, where: str, register: bool = True) -> Config:
    """The resolved config of a published training, rebuilt from this repository's experiment file and
    the training's recorded inputs (its `_SUCCESS` marker), each checked again as the CLI checks it.

    The store's config.py is never executed: it is Python, and whoever can write to the bucket could
    put any code in it. A forged marker can at most pick another allowed experiment setting.
    where: the marker's location, named in errors; register: as `load_experiment_config`'s.
    """
    if not isinstance(inputs, dict):
        raise InputError(f"{where}: records no training inputs")
    recorded = {name: inputs.get(name) for name in ("experiment", "profile", "max_epochs", "cfg_options")}
    if recorded["experiment"] != experiment:
        raise InputError(f"{where}: records experiment {recorded['experiment']!r}, not {experiment!r}")
    if recorded["profile"] not in PROFILES:
        raise InputError(
            f"{where}: records profile {recorded['profile']!r}, not one of {', '.join(PROFILES)}"
        )
    epochs = recorded["max_epochs"]
    if epochs is not None and (type(epochs) is not int or epochs < 1):
        raise InputError(f"{where}: records max_epochs {epochs!r}, not a whole number of at least 1")
    try:
        options = overrides.check_values(recorded["cfg_options"] or {})
    except InputError as err:
        raise InputError(f"{where}: recorded {err}") from None
    return load_experiment_config(
        experiment, recorded["profile"], max_epochs=epochs, cfg_options=options, register=register
    )


@dataclass(frozen=True)
class TrainOutputs:
    """A published training, downloaded: best weights, its config (rebuilt, never read from the
    store: `training_config`), val metrics."""

    checkpoint: Path
    config: Config
    val_metrics: dict


def fetch_training_outputs(store: Store, run_id: str, experiment: str, local_dir: Path) -> TrainOutputs:
    """Download runs/<id>/train/<exp>/ (InputError if not published); its config rebuilt."""
    prefix = stage_prefix(run_id, "train", experiment)
    local = store.fetch(prefix, local_dir)
    marker = store.marker(prefix) or {}
    return TrainOutputs(
        checkpoint=local / "best.pth",
        config=training_config(marker.get("inputs"), experiment, store.uri(marker_key(prefix))),
        val_metrics=json.loads((local / "val_metrics.json").read_text()),
    )


# ---------------------------------------------------------------- the stage


def _pretrained_file(store: Store, spec: str | None, cache_dir: Path) -> Path | None:
    """The --pretrained file, local (downloaded from the store if given as s3://); `_check_pretrained`
    loads it."""
    if spec is None:
        return None
    if spec.startswith("s3://"):
        key = parse_s3_uri(spec, store.bucket)
        if not store.exists(key):
            raise InputError(f"{spec}: pretrained weights not found in the store")
        path = store.download_file(key, cache_dir / Path(key).name)
    else:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise InputError(f"{spec}: pretrained weights file does not exist")
    return path


def _check_pretrained(path: Path | None, spec: str | None) -> None:
    """A --pretrained file that does not load is bad input (exit 2, no retry), found before any model
    is built. Only a training that computes checks it (torch): a cached one keyed on its sha256 was
    trained from these very bytes."""
    if path is None:
        return
    from tasks import mmcompat  # torch: loading weights

    try:
        mmcompat.load_checkpoint_file(str(path), map_location="cpu")
    except ValueError as err:  # user weights load with weights_only=True only (tasks.mmcompat)
        raise InputError(f"--pretrained {spec}: {err}") from err


def train_experiment(
    experiment: str,
    run_id: str,
    dataset: str,
    profile: str = "full",
    max_epochs: int | None = None,
    pretrained: str | None = None,
    cfg_options: dict[str, Any] | None = None,
    store: Store | None = None,
    recompute: bool = False,
) -> dict:
    """Train (or resume, or reuse) one experiment; returns a summary of the published outputs.

    cfg_options: config overrides from `overrides.parse_items`, merged last (see `apply_cfg_options`).
    recompute: train even if this run or an earlier one published a training with the same cache key.
    """
    check_run_id(run_id)
    experiment_config_path(experiment)
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}: expected one of {', '.join(PROFILES)}")
    store = store or Store.from_env()
    exp_dir = work_dir() / "runs" / run_id / "train" / experiment
    prefix = stage_prefix(run_id, "train", experiment)
    mirror_prefix = f"{prefix}/work"

    weights = _pretrained_file(store, pretrained, exp_dir / "pretrained")
    # Before the dataset is read (or published): bad overrides are refused first.
    cfg = load_experiment_config(
        experiment,
        profile,
        max_epochs=max_epochs,
        pretrained=weights,
        cfg_options=cfg_options,
        register=False,
    )
    ds = materialize_dataset(dataset, store, run_id=run_id)  # the version validate pinned
    # relabel's masks by their digest only: downloaded when the training is not cached
    labels = resolve_train_labels(store, run_id, ds.root, exp_dir / "relabel", download=False)
    inputs = {
        "dataset_version": ds.version,
        "experiment": experiment,
        "profile": profile,
        "max_epochs": max_epochs,
        "labels_source": labels.source,
        "labels_version": labels.version,
        "pretrained_sha256": sha256_file(weights) if weights else None,
        "cfg_options": cfg.cfg_options,
    }
    # the cache key: relabeled masks by their digest (not this run's prefix), the config by its content
    key = {
        **inputs,
        "labels_source": "relabel" if labels.version else labels.source,
        "config": config_digest(cfg),
    }
    stage = Stage(store, run_id, "train", experiment, inputs, key, __name__, recompute)
    if (marker := stage.reuse()) is not None:
        cached_from = {"cached_from": stage.hit["run_id"]} if stage.hit else {}
        return {"status": "cached", "prefix": store.uri(prefix), **cached_from, **marker["inputs"]}

    _check_pretrained(weights, pretrained)
    register_config_modules(cfg)
    fetch_train_labels(store, labels, exp_dir / "relabel")
    view = prepare_dataset_view(ds.root, labels.path, exp_dir / "data")
    work = exp_dir / "work"
    if work.exists():
        shutil.rmtree(work)  # the store's mirror, not a local leftover, decides where to resume
    work.mkdir(parents=True)
    set_data_root(cfg, view)
    cfg.work_dir = str(work)
    resume = restore_mirror(store, mirror_prefix, inputs, work)
    if resume is not None:
        cfg.resume, cfg.load_from = True, str(resume.checkpoint)
    if weights is None:
        log.info(
            "%s: no pretrained weights given: the backbone starts from scratch (random init)", experiment
        )
    else:
        log.info("%s: backbone initialised from %s", experiment, pretrained)
    log.info("%s: train labels from %s", experiment, labels.source)
    threads = configure_torch_threads()
    log.info("torch uses %d threads", threads)

    return _run_and_publish(cfg, stage, mirror_prefix, exp_dir, labels, ds.version, resume)


def config_digest(cfg: Config) -> str:
    """sha256 of a resolved config's content, without the local path of the pretrained weights (their
    sha256 is an input of its own): equal for equal settings, whatever the file names."""
    content = cfg.to_dict()
    content["model"] = {k: v for k, v in content.get("model", {}).items() if k != "pretrained"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=repr).encode()).hexdigest()


def _run_and_publish(
    cfg: Config,
    stage: Stage,
    mirror_prefix: str,
    exp_dir: Path,
    labels: TrainLabels,
    dataset_version: str,
    resume: Resume | None = None,
) -> dict:
    from mmengine.runner import Runner

    from tasks import tracking
    from tasks.mmseg_setup import check_loaded_samples

    out = exp_dir / "publish"
    store, inputs, experiment = stage.store, stage.inputs, cfg.experiment

    def body(tracker: tracking.Tracker) -> dict:
        runner = Runner.from_cfg(cfg)
        # exactly the validated samples, or exit 2 before the first epoch
        check_loaded_samples(runner.train_dataloader.dataset, Path(cfg.data_root), "train", "training")
        check_loaded_samples(runner.val_dataloader.dataset, Path(cfg.data_root), "val", "training")
        runner.register_hook(_store_mirror_hook()(store, mirror_prefix, inputs, resume and resume.point))
        runner.register_hook(tracking.TrackerHook(tracker), priority="LOW")
        runner.train()
        best = runner.message_hub.get_info(BEST_INFO_KEY)
        if best is None:
            raise RuntimeError(f"{experiment}: training ended without a validation (no best checkpoint)")
        work = Path(runner.work_dir)
        shutil.copyfile(_published_best(work, best["checkpoint"]), out / "best.pth")
        runner.cfg.dump(str(out / "config.py"))
        with open(out / "log.json", "w") as log_file:
            for part in _scalar_logs(work):
                log_file.write(part.read_text())
        classes = tuple(runner.train_dataloader.dataset.metainfo["classes"])
        val_metrics = {
            "experiment": experiment,
            "split": "val",
            "dataset_version": dataset_version,
            "checkpoint": best["checkpoint"],
            "best_epoch": best["epoch"],
            **metrics_from_flat(best["metrics"], classes),
            "epochs_trained": runner.epoch,
            "iterations": runner.iter,
            "max_epochs": cfg.train_cfg.max_epochs,
            "profile": inputs["profile"],
            "train_labels": labels.source,
            "pretrained": cfg.model.get("pretrained"),
        }
        (out / "val_metrics.json").write_text(json.dumps(val_metrics, indent=2) + "\n")
        tracker.upload_artifact("val_metrics", out / "val_metrics.json")
        return val_metrics

    val_metrics = stage.compute(out, inputs, body)  # the publish removes the work/ mirror too
    return {"status": "trained", "prefix": store.uri(stage.prefix), **val_metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment", required=True, choices=experiments.names(), help="experiment (a file under configs/)"
    )
    parser.add_argument("--run-id", required=True, help="pipeline run id")
    parser.add_argument("--dataset", required=True, help="dataset: local dir or s3://<bucket>/<prefix>")
    parser.add_argument(
        "--profile",
        default="full",
        choices=PROFILES,
        help="full: the study's settings; cpu: configs/profiles/cpu.py",
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="override the profile's epoch count")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="backbone weights (local file or s3:// key in the pipeline's bucket); default: from scratch",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides merged last, as mmseg's tools/train.py takes them "
        "(e.g. train_cfg.val_interval=1 model.decode_head.channels=32)",
    )
    add_recompute_argument(parser)


def main(args: argparse.Namespace) -> int:
    summary = train_experiment(
        args.experiment,
        args.run_id,
        args.dataset,
        args.profile,
        args.max_epochs,
        args.pretrained,
        cfg_options=overrides.parse_items(args.cfg_options),
        recompute=args.recompute,
    )
    print(json.dumps(summary, indent=2))
    return 0
