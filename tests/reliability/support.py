"""Helpers of the reliability suite: stage processes one can watch, pause and kill; bucket states.

Faults are real: `moto_server` processes are stopped and started, stage processes get SIGKILL or
SIGSTOP/SIGCONT. Nothing here stands in for a stage, boto3, ClearML or an Airflow operator.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.store import Store

# Fake credentials, made at run time: the secret test greps every log and artifact of the pipeline run
# for them, and values that no source file holds can only get there through the environment.
WORKER_S3_KEY = "FAKEWORKERKEY0RELIAB"
WORKER_S3_SECRET = f"worker-s3-secret-{uuid.uuid4().hex}"
CONN_S3_KEY = "FAKECONNKEY0RELIAB"
CONN_S3_SECRET = f"conn-s3-secret-{uuid.uuid4().hex}"
CLEARML_ACCESS = "fake-clearml-access-2c7d"
CLEARML_SECRET = f"clearml-secret-{uuid.uuid4().hex}"
SECRETS = (WORKER_S3_SECRET, CONN_S3_SECRET, CLEARML_SECRET)
PIPELINE_EXPERIMENTS = ("h1", "exp2")
CLEARML_DOWN_EXPERIMENT = "h1"  # trains with ClearML online settings pointing at a closed port


def offline_env(home: Path) -> dict[str, str]:
    """tests/conftest.py's _offline_env settings, for processes that session fixtures start."""
    return {
        "HOME": str(home),
        "CLEARML_OFFLINE_MODE": "1",
        "YOLO_OFFLINE": "1",
        "SEGPIPE_WORK_DIR": str(home / "work"),
        "MPLCONFIGDIR": str(home / "mpl"),
        "TORCH_HOME": str(home / "torch"),
        "YOLO_CONFIG_DIR": str(home / "yolo"),
        "CLEARML_CACHE_DIR": str(home / "clearml"),
    }


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bucket_state(store: Store) -> dict[str, str]:
    """Every key of the bucket with its ETag: equal states mean nothing was added, lost or rewritten."""
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {obj["Key"]: obj["ETag"] for page in pages for obj in page.get("Contents", [])}


def bucket_objects(store: Store) -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in bucket_state(store)}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def members(name: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of a file and, for zip archives (ClearML sessions, torch checkpoints), of every
    member, recursively: a secret must not hide in a compressed member."""
    yield name, data
    if depth < 3 and data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield from members(f"{name}!{member}", archive.read(member), depth + 1)


def json_without(data: bytes, *keys: str) -> Any:
    """A JSON document without some (timestamp) keys, at any depth."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in keys}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(json.loads(data))


class StageProcess:
    """`python -m tasks ARGS` in its own process group, its output read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasks", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # a signal to its group reaches the whole stage
        )
        self.lines: list[str] = []
        self._done = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        """The first output line matching pattern; fails if the stage exits or times out first."""
        regex, seen = re.compile(pattern), 0
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._done or remaining <= 0:
                    tail = "\n".join(self.lines[-40:])
                    state = f"exited {self.proc.wait()}" if self._done else f"no match in {timeout}s"
                    raise AssertionError(f"{self.args[0]}: {state} before /{pattern}/; last lines:\n{tail}")
                self._changed.wait(remaining)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def stop(self) -> None:
        """Kill this stage's process group if it still runs (cleanup after a failed test)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class PipelineRun:
    """What two runs of the DAG's stage commands (same Airflow run id) left behind."""

    run_id: str
    xcoms: dict[tuple[str, str], Any]  # what the plan tasks pushed
    rendered: list[dict[str, Any]]  # the local operators' rendered template fields
    stage_env: dict[str, str]  # what the local runner hands the stages (credentials included)
    logs: dict[str, dict[str, str]] = field(default_factory=dict)  # pass -> task -> its log
    train_times: dict[str, tuple[float, float]] = field(default_factory=dict)  # exp -> (start, end)
    state: dict[str, dict[str, str]] = field(default_factory=dict)  # pass -> key -> ETag
    documents: dict[str, dict[str, bytes]] = field(default_factory=dict)  # pass -> run-level docs
    objects: dict[str, bytes] = field(default_factory=dict)  # the bucket after both passes
    local_files: list[Path] = field(default_factory=list)  # what the stages wrote on the worker
