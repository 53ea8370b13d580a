"""Reading a ClearML offline session zip in tests (no torch import: stage tests use it too)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def read_session(session_zip: Path) -> tuple[list[dict], dict]:
    """A ClearML offline session zip: its events (metrics.jsonl) and task.json."""
    with zipfile.ZipFile(session_zip) as zf:
        events = [
            event
            for line in zf.read("metrics.jsonl").decode().splitlines()
            if line.strip()
            for event in (json.loads(line) if line.lstrip().startswith("[") else [json.loads(line)])
        ]
        task = json.loads(zf.read("task.json"))
    return events, task
