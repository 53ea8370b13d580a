"""The two fixes the OpenMMLab stack needs on this torch, owned here and applied by `apply()`.

1. mmcv without compiled ops. Locally mmcv is the pure-Python `mmcv-lite` wheel of the pinned
   version (see infra/install_env.sh: the full build takes ~38 min on 2 cores). mmseg 1.2.2 imports
   `mmcv.ops` unguarded in four modules (utils/mask_classification.py, models/utils/point_sample.py,
   models/losses/focal_loss.py, models/decode_heads/san_head.py), so `import mmseg.models` fails
   although neither study model calls an mmcv op. When `mmcv._ext` is missing we register a
   `mmcv.ops` module whose every op raises a clear error when used; with the full mmcv (the GPU
   trainer image) nothing is replaced.
2. torch >= 2.6 loads with `weights_only=True` by default, which refuses mmengine's own checkpoints
   (they pickle mmengine's HistoryBuffer and message hub). Allow-listing would need
   `builtins.getattr`, which defeats the check, so we re-register mmengine's local-file loader:
   it tries `weights_only=True` first and falls back to a full load only for files under a
   directory the pipeline itself wrote (`trust_checkpoints_under`). User-supplied weights
   (pretrained backbones) are never unpickled in full.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

_TRUSTED_DIRS: set[Path] = set()
_APPLIED = False


class MissingMmcvOpError(RuntimeError):
    """An mmcv op was used in an environment whose mmcv has no compiled ops."""


def _missing_op(name: str) -> type:
    def _refuse(*_args, **_kwargs):
        raise MissingMmcvOpError(
            f"mmcv.ops.{name} needs mmcv built with its compiled ops; this environment has mmcv-lite "
            "(infra/install_env.sh). Run this model in the trainer image (images/trainer), which "
            "builds mmcv with MMCV_WITH_OPS=1."
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


def trust_checkpoints_under(directory: str | Path) -> None:
    """Checkpoints under `directory` were written by this pipeline: allow their full unpickling."""
    _TRUSTED_DIRS.add(Path(directory).resolve())


def _is_trusted(filename: str) -> bool:
    path = Path(filename).expanduser().resolve()
    return any(path.is_relative_to(d) for d in _TRUSTED_DIRS)


def load_checkpoint_file(filename: str, map_location=None) -> dict:
    """mmengine's local checkpoint loader, with torch's safe loading kept for foreign files."""
    path = Path(filename).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{filename} can not be found.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError, depending on the content
        if not _is_trusted(filename):
            raise ValueError(
                f"{filename}: not a plain weights checkpoint (torch refused it with weights_only=True: "
                f"{str(err).splitlines()[0]})"
            ) from err
        return torch.load(path, map_location=map_location, weights_only=False)


def apply() -> None:
    """Idempotent; call before importing mmseg models or building a Runner."""
    global _APPLIED
    if _APPLIED:
        return
    if "mmcv.ops" not in sys.modules and not has_compiled_ops():
        sys.modules["mmcv.ops"] = _OpsPlaceholder("mmcv.ops", "mmcv ops placeholder (see tasks.mmcompat)")
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", force=True)(load_checkpoint_file)
    _APPLIED = True
