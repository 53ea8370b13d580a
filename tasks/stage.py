"""The one skeleton every stage (eda, relabel, train, evaluate) runs in: cache check, clean work dir,
tracking task, publish on success, cache entry.

A stage's **cache key** is the sha256 of everything that determines its outputs:
- `key`: the content versions of its input artifacts and its parameters, as the stage gives them (the
  dataset version, the relabeled masks' digest, the training outputs' digest, the resolved config's
  content: never a file name or a run's own prefix);
- the code version: the sha256 of the source of the stage's module and of every `tasks` module it
  imports, directly or not (`code_files`), plus the versions of the packages the run manifest records
  (torch, mmsegmentation, ...). A dirty tree counts, a git sha alone would not.

`runs/<id>/<stage>` published for the same inputs in this run is kept as it is (a retry or a re-run
of the run id). Else an entry `cache/<stage>/<key>.json` (tasks.store.cache_entry_key), written when
any earlier run published those outputs, names that run's prefix and the digest of its `_SUCCESS`
marker: while that marker is unchanged, every file it lists is copied server-side into this run's
prefix (CopyObject, each copy checked by the server's SHA-256 of its bytes) and this run's marker says
where they came from (`cache`). A missing or changed marker, or an object deleted or corrupted, makes
the entry unusable: the stage computes again and replaces the entry (a conditional PUT, so two runs
racing to fill one entry leave one valid entry). `recompute=True` (`--recompute`) skips both reuses.
Each stage's hit or miss is recorded in runs/<id>/manifest.json under `stages` (tasks.manifest).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from tasks import manifest
from tasks.store import Store, cache_entry_key, canonical, marker_key, stage_prefix, utc_now

log = logging.getLogger(__name__)

R = TypeVar("R")
PACKAGE_DIR = Path(__file__).resolve().parent
# For train and evaluate, stage name in the key layout -> name of the ClearML task
TASK_NAMES = {"eval": "evaluate"}
# Server-side copies of a reused output in flight at once (boto3's pool holds 10 connections)
COPY_THREADS = 8


# ---------------------------------------------------------------- the cache key


def _imported_tasks_modules(path: Path) -> set[str]:
    """`tasks.X` modules a source file imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tasks.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tasks":
                found |= {f"tasks.{alias.name}" for alias in node.names}
            elif node.module.startswith("tasks."):
                found.add(node.module)
    return found


def code_files(module: str) -> list[Path]:
    """The source files of `module` (e.g. tasks.train) and of every tasks module it imports, directly or
    not: the code a stage runs. Configs are not code here: a stage keys on the resolved config."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = PACKAGE_DIR / f"{name.removeprefix('tasks.')}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        todo += sorted(_imported_tasks_modules(path) - seen)
    return sorted(PACKAGE_DIR / f"{name.removeprefix('tasks.')}.py" for name in seen)


@cache
def code_version(module: str) -> str:
    """sha256 of the stage's source files (`code_files`) and the installed package versions."""
    digest = hashlib.sha256()
    for path in code_files(module):
        digest.update(f"{path.name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(manifest.package_versions(), sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(stage: str, experiment: str | None, key: dict, module: str) -> str:
    """The stage's cache key (module docstring): a sha256 hex digest."""
    content = {"stage": stage, "experiment": experiment, "key": key, "code": code_version(module)}
    return hashlib.sha256(json.dumps(canonical(content), sort_keys=True).encode()).hexdigest()


def marker_digest(marker: dict) -> str:
    return hashlib.sha256(json.dumps(canonical(marker), sort_keys=True).encode()).hexdigest()


def add_recompute_argument(parser: argparse.ArgumentParser) -> None:
    """--recompute (alias --no-cache): every stage's switch to compute again whatever is cached."""
    parser.add_argument(
        "--recompute",
        "--no-cache",
        dest="recompute",
        action="store_true",
        help="compute again even if this run or an earlier one published outputs for the same inputs",
    )


# ---------------------------------------------------------------- the skeleton


@dataclass
class Stage:
    """One stage of one run (and experiment) and what determines its outputs.

    inputs: what its `_SUCCESS` marker records (and `is_current` compares within the run);
    key: the run-independent content its cache key is made of (module docstring);
    module: the module whose code closure is its code version;
    relocate: for a file of a reused output that names its run (rel -> a function rewriting its
    bytes for this run, or None to copy it as it is).
    """

    store: Store
    run_id: str
    stage: str
    experiment: str | None
    inputs: dict
    key: dict
    module: str
    recompute: bool = False
    relocate: Callable[[str, str], Callable[[bytes], bytes] | None] | None = None
    hit: dict | None = field(default=None, init=False)
    # the ETag of the entry this stage found unusable: its own publish replaces that entry
    unusable: str | None = field(default=None, init=False)

    @property
    def prefix(self) -> str:
        return stage_prefix(self.run_id, self.stage, self.experiment)

    @property
    def name(self) -> str:
        return self.stage if self.experiment is None else f"{self.stage}/{self.experiment}"

    @property
    def cache_key(self) -> str:
        return cache_key(self.stage, self.experiment, self.key, self.module)

    @property
    def entry_key(self) -> str:
        return cache_entry_key(self.stage, self.cache_key)

    # ------------------------------------------------------------ reuse

    def reuse(self) -> dict | None:
        """The marker of outputs this run may keep (published by this run, or copied from another run's
        for the same cache key), or None: compute. Logs which, records cross-run hits in the manifest."""
        if self.recompute:
            log.info("%s: recompute requested: the cache is not read", self.name)
            return None
        uri = self.store.uri(self.prefix)
        if self.store.is_current(self.prefix, self.inputs):
            log.info("cached: %s already published for these inputs in this run (cached)", uri)
            return self.store.marker(self.prefix)
        entry, etag = self.store.get_json_with_etag(self.entry_key)
        if entry is None:
            log.info("%s: cache miss (key %s)", self.name, self.cache_key[:16])
            return None
        marker = self._copy(entry)
        if marker is None:
            self.unusable = etag
            return None
        self.hit = {"run_id": entry["run_id"], "prefix": entry["prefix"], "key": self.cache_key}
        log.info(
            "cached: %s reused from run %s (%s, key %s): %d files copied server-side (cached)",
            uri,
            entry["run_id"],
            self.store.uri(entry["prefix"]),
            self.cache_key[:16],
            len(marker["files"]),
        )
        manifest.record_stage(self.store, self.run_id, self.name, {"cache": "hit", **self.hit})
        return marker

    def _copy(self, entry: dict) -> dict | None:
        """Copy the entry's outputs into this run's prefix; the new marker, or None if unusable."""
        source = entry.get("prefix")
        marker = self.store.marker(source) if isinstance(source, str) else None
        if source == self.prefix or marker is None or marker_digest(marker) != entry.get("marker_sha256"):
            log.warning(
                "%s: cache entry %s names %s, which is no longer the output it recorded: recomputing",
                self.name,
                self.store.uri(self.entry_key),
                self.store.uri(str(source)),
            )
            return None
        own = marker_key(self.prefix)
        if self.store.exists(own):  # this run's earlier outputs (other inputs) stop being published
            self.store.delete_keys([own])
        # one request per file, each a round trip to the server: several at a time
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            copied = pool.map(
                lambda item: self._copy_file(source, entry["run_id"], *item), marker["files"].items()
            )
            files = dict(zip(marker["files"], copied, strict=True))
        if None in files.values():
            return None
        stale = [k for k in self.store.list_keys(self.prefix) if k[len(self.prefix) + 1 :] not in files]
        if stale:
            self.store.delete_keys(stale)
        cached_from = {"run_id": entry["run_id"], "prefix": source, "key": self.cache_key}
        content = {
            "files": files,
            "inputs": canonical(self.inputs),
            "published_at": utc_now(),
            "cache": cached_from,
        }
        self.store.put_json(own, content)
        return content

    def _copy_file(self, source: str, source_run: str, rel: str, digest: str) -> str | None:
        """One file of a reused output into this run's prefix: its sha256 there, or None (logged) when
        the cached object is missing or holds other bytes."""
        src, dst = f"{source}/{rel}", f"{self.prefix}/{rel}"
        rewrite = self.relocate(rel, source_run) if self.relocate else None
        if rewrite is None:
            if self.store.copy_verified(src, dst, digest):
                return digest
        else:
            data = self.store.get_bytes_unchecked(src) if self.store.exists(src) else None
            if data is not None and hashlib.sha256(data).hexdigest() == digest:
                relocated = rewrite(data)
                self.store.put_bytes(dst, relocated)
                return hashlib.sha256(relocated).hexdigest()
        log.warning("%s: cached object %s missing or corrupt: recomputing", self.name, src)
        return None

    # ------------------------------------------------------------ compute

    def compute(
        self,
        out: Path,
        params: dict,
        body: Callable[[Any], R],
        scratch: Iterable[Path] = (),
    ) -> R:
        """Run body(tracker) in a clean `out` (and clean scratch dirs) inside the stage's tracking task,
        then publish `out` (the marker last) and point the cache entry at it."""
        from tasks import tracking

        for folder in (out, *scratch):
            shutil.rmtree(folder, ignore_errors=True)  # a retry starts clean: nothing stale is published
        out.mkdir(parents=True)
        with tracking.open_task(
            self.run_id,
            TASK_NAMES.get(self.stage, self.stage),
            self.experiment,
            params=params,
            session_dir=out / "clearml",
        ) as tracker:
            result = body(tracker)
        marker = self.store.publish(out, self.prefix, self.inputs)
        self._record_entry(marker)
        manifest.record_stage(
            self.store,
            self.run_id,
            self.name,
            {"cache": "recomputed" if self.recompute else "miss", "key": self.cache_key},
        )
        return result

    def _record_entry(self, marker: dict) -> None:
        entry = {
            "run_id": self.run_id,
            "prefix": self.prefix,
            "marker_sha256": marker_digest(marker),
            "stage": self.name,
            "key": self.key,
            "code_version": code_version(self.module),
            "created_at": utc_now(),
        }
        for _ in range(self.store.retry.attempts):
            current, etag = self.store.get_json_with_etag(self.entry_key)
            if (
                current is not None
                and current.get("run_id") != self.run_id
                and etag != self.unusable
                and self._usable(current)
            ):
                log.info("%s: cache entry already filled by run %s; kept", self.name, current["run_id"])
                return
            if self.store.put_json_if(self.entry_key, entry, etag):
                log.info("%s: cache entry %s -> %s", self.name, self.store.uri(self.entry_key), self.prefix)
                return
        log.warning("%s: cache entry %s kept changing: not written", self.name, self.entry_key)

    def _usable(self, entry: dict) -> bool:
        """An entry (filled by another run meanwhile) whose marker still is the one it recorded, with
        every listed object present (their bytes are checked when a run copies them)."""
        source = entry.get("prefix")
        marker = self.store.marker(source) if isinstance(source, str) else None
        if marker is None or marker_digest(marker) != entry.get("marker_sha256"):
            return False
        present = set(self.store.list_keys(source))
        return all(f"{source}/{rel}" in present for rel in marker["files"])
