"""The pinned environment: one source of truth for versions, and the two sides kept apart."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            name = re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")
            pins[name] = match.group(2)
    return pins


LOCK = _pins(REQUIREMENTS / "constraints.txt")


@pytest.mark.parametrize("name", ["torch.txt", "tasks.txt", "airflow.txt", "dev.txt", "sam2.txt"])
def test_every_pin_matches_the_lock(name: str) -> None:
    for package, version in _pins(REQUIREMENTS / name).items():
        assert LOCK.get(package) == version, (
            f"{name}: {package}=={version} but constraints.txt has {LOCK.get(package)}"
        )


def test_installed_versions_match_the_lock() -> None:
    mismatched = {}
    for package, version in LOCK.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            mismatched[package] = (version, None)
            continue
        if installed != version:
            mismatched[package] = (version, installed)
    assert not mismatched, f"locked vs installed: {mismatched}"


def test_local_mmcv_is_the_pinned_version_without_ops() -> None:
    """Locally mmcv is mmcv-lite of the pinned version (see infra/install_env.sh)."""
    pinned = _pins(REQUIREMENTS / "mmcv.txt")["mmcv"]
    import mmcv

    assert mmcv.__version__ == pinned
    assert metadata.version("mmcv-lite") == pinned


def _imported_after(code: str, full: bool = False) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return set(out.split()) if full else {m.split(".")[0] for m in out.split()}


def test_task_side_never_imports_airflow() -> None:
    modules = _imported_after(
        "from tasks import cli, dataset, synth, store, tracking, eda, relabel, train, evaluate, selection"
    )
    assert "airflow" not in modules


def test_airflow_side_never_imports_torch() -> None:
    code = (
        "import importlib.util, sys\n"
        "sys.path.insert(0, 'dags')  # Airflow puts the DAGs folder on sys.path\n"
        "spec = importlib.util.spec_from_file_location('dag', 'dags/segmentation_pipeline.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))"
    )
    modules = _imported_after(code)
    assert "airflow" in modules
    assert not modules & {"torch", "mmseg", "mmengine", "mmcv", "ultralytics", "sam2"}
    # of tasks/, only the experiment catalogue, which reads configs/*.py with `ast` (never runs them),
    # and the rule of what a person may set (tasks.overrides), both standard library only
    assert {m for m in _imported_after(code, full=True) if m.startswith("tasks")} == {
        "tasks",
        "tasks.errors",
        "tasks.experiments",
        "tasks.overrides",
    }
