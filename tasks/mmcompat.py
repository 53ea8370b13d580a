"""The two fixes the OpenMMLab stack needs on this torch, owned here and applied by `apply()`.

1. mmcv without compiled ops. Locally mmcv is the pure-Python `mmcv-lite` wheel of the pinned
   version (see infra/install_env.sh: the full build takes ~38 min on 2 cores). mmseg 1.2.2 imports
   `mmcv.ops` unguarded in four modules (utils/mask_classification.py, models/utils/point_sample.py,
   models/losses/focal_loss.py, models/decode_heads/san_head.py), so `import mmseg.models` fails
   although neither study model calls an mmcv op. When `mmcv._ext` is missing we register a
   `mmcv.ops` module whose every op raises a clear error when used; with the full mmcv (the GPU
   trainer image) nothing is replaced.
2. torch >= 2.6 loads with `weights_only=True` by default, which refuses mmengine's own checkpoints:
   they pickle mmengine's HistoryBuffer and numpy values (allow-listing them would need
   `builtins.getattr`, which defeats the check). Nothing is ever unpickled in full here, whoever
   wrote the file: every checkpoint mmengine saves is written in plain form (`to_plain`: each
   HistoryBuffer and numpy value becomes tensors, numbers and a marker), and mmengine's local-file
   loader is re-registered to load with `weights_only=True` only and turn the markers back
   (`from_plain`). A checkpoint is then data: loading one from the store, a forged one included,
   runs no code. The loader also drops `meta.config`, which mmengine's resume would execute as a
   Python config.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_APPLIED = False


class MissingMmcvOpError(RuntimeError):
    """An mmcv op was used in an environment whose mmcv has no compiled ops."""


def _missing_op(name: str) -> type:
    def _refuse(*_args, **_kwargs):
        raise MissingMmcvOpError(
            f"mmcv.ops.{name} needs mmcv built with its compiled ops; this environment has mmcv-lite "
            "(infra/install_env.sh). Run this model in the trainer image built with its compiled "
            "ops: MMCV_FLAVOUR=ops bash infra/build_images.sh (images/trainer/Dockerfile)."
        )

    # A class, not a function: mmseg both calls ops and subclasses op modules.
    return type(name, (), {"__init__": _refuse, "__module__": "mmcv.ops"})


class _OpsPlaceholder(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)


def has_compiled_ops() -> bool:
    return importlib.util.find_spec("mmcv._ext") is not None


_HISTORY = "__segpipe_history_buffer__"  # {_HISTORY: {max_length, log_history, count_history}}
_ARRAY = "__segpipe_ndarray__"  # {_ARRAY: tensor}


def to_plain(obj: Any) -> Any:
    """A checkpoint (or part) with only what torch's weights_only loader accepts."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, HistoryBuffer):
        log_history, count_history = obj.data
        return {
            _HISTORY: {
                "max_length": obj.max_length,
                "log_history": torch.from_numpy(np.array(log_history)),
                "count_history": torch.from_numpy(np.array(count_history)),
            }
        }
    if isinstance(obj, np.ndarray):
        return {_ARRAY: torch.from_numpy(obj.copy())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):  # OrderedDict stays one (weights_only accepts it)
        return type(obj)((key, to_plain(value)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(value) for value in obj)
    return obj


def from_plain(obj: Any) -> Any:
    """Undo `to_plain`: HistoryBuffers and numpy arrays back where mmengine expects them."""
    if isinstance(obj, dict):
        if set(obj) == {_HISTORY}:
            from mmengine.logging import HistoryBuffer

            data = obj[_HISTORY]
            return HistoryBuffer(
                data["log_history"].numpy(), data["count_history"].numpy(), int(data["max_length"])
            )
        if set(obj) == {_ARRAY}:
            return obj[_ARRAY].numpy()
        return type(obj)((key, from_plain(value)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(from_plain(value) for value in obj)
    return obj


def load_checkpoint_file(filename: str, map_location=None) -> dict:
    """mmengine's local checkpoint loader: weights_only=True for every file, whoever wrote it."""
    path = Path(filename).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{filename} can not be found.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError, depending on the content
        raise ValueError(
            f"{filename}: not a plain weights checkpoint (torch refused it with weights_only=True: "
            f"{str(err).splitlines()[0]})"
        ) from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("meta"), dict):
        checkpoint["meta"].pop("config", None)  # Runner.resume would run it as a Python config
    return from_plain(checkpoint)


def _save_plain(save: Callable) -> Callable:
    @functools.wraps(save)
    def save_checkpoint(checkpoint: dict, filename: str, *args: Any, **kwargs: Any) -> None:
        return save(to_plain(checkpoint), filename, *args, **kwargs)

    return save_checkpoint


def apply() -> None:
    """Idempotent; call before importing mmseg models or building a Runner."""
    global _APPLIED
    if _APPLIED:
        return
    if "mmcv.ops" not in sys.modules and not has_compiled_ops():
        sys.modules["mmcv.ops"] = _OpsPlaceholder("mmcv.ops", "mmcv ops placeholder (see tasks.mmcompat)")
    import mmengine.runner
    import mmengine.runner.checkpoint
    import mmengine.runner.runner

    mmengine.runner.checkpoint.CheckpointLoader.register_scheme(prefixes="", force=True)(load_checkpoint_file)
    # Runner.save_checkpoint and CheckpointHook's published copies call it by these names
    plain = _save_plain(mmengine.runner.checkpoint.save_checkpoint)
    for module in (mmengine.runner.checkpoint, mmengine.runner, mmengine.runner.runner):
        module.save_checkpoint = plain
    _APPLIED = True
