"""`python -m tasks`: one command line, a subcommand per stage, each with --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.cli import STAGES


def test_top_level_help_lists_every_stage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasks", "--help"], capture_output=True, text=True, check=True
    )
    for step in STAGES:
        assert step in out.stdout


@pytest.mark.parametrize("step", sorted(STAGES))
def test_each_stage_has_help(step: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tasks", step, "--help"], capture_output=True, text=True, check=True
    )
    assert f"python -m tasks {step}" in out.stdout


def test_unknown_step_is_refused() -> None:
    proc = subprocess.run([sys.executable, "-m", "tasks", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
