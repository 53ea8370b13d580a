"""What every bench script shares: the repository root and the embedded S3 server module.

Bench scripts run as `python bench/<name>.py`, so this folder is on sys.path and `import _support` works.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def s3_module() -> ModuleType:
    """infra/s3_server.py, loaded from its file (infra/ is not a package)."""
    spec = importlib.util.spec_from_file_location("s3_server", ROOT / "infra" / "s3_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
