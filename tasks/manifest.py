"""The run manifest runs/<id>/manifest.json: what a run used (git sha, params, dataset, package
versions, start/end) and, per stage, whether its outputs came from the cross-run cache."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.store import Store, canonical, manifest_key, utc_now

# Recorded in the run manifest when installed (mmcv or mmcv-lite, whichever the image has).
PACKAGES = (
    "torch",
    "mmsegmentation",
    "mmengine",
    "mmcv",
    "mmcv-lite",
    "ultralytics",
    "sam2",
    "clearml",
    "boto3",
)


def git_sha() -> str:
    if sha := os.environ.get("SEGPIPE_GIT_SHA"):
        return sha
    repo = Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _merge(old: dict, new: dict) -> dict:
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def update_manifest(store: Store, run_id: str, **fields: Any) -> dict:
    """Merge fields into runs/<id>/manifest.json (dicts merge key by key) and return the result.

    The first write records started_at, the git sha; every write adds the writer's package
    versions. Read-modify-write: only one stage at a time may call it (validate, then select).
    """
    key = manifest_key(run_id)
    current = store.get_json(key) if store.exists(key) else {}
    base = {"run_id": run_id, "git_sha": git_sha(), "started_at": utc_now()}
    manifest = _merge({**base, **current}, {"packages": package_versions(), **canonical(fields)})
    manifest["updated_at"] = utc_now()
    store.put_json(key, manifest)
    return manifest


def record_stage(store: Store, run_id: str, stage: str, info: dict) -> None:
    """Record under `stages.<stage>` of the manifest whether a stage's outputs came from the cache
    (and from which run) or were computed. Stages of one run finish at the same time (parallel
    trainings), so each write is a conditional PUT on the manifest read, retried when another won."""
    key = manifest_key(run_id)
    for _ in range(store.retry.attempts * 4):
        current, etag = store.get_json_with_etag(key)
        current = current or {"run_id": run_id, "git_sha": git_sha(), "started_at": utc_now()}
        stages = {**current.get("stages", {}), stage: {**canonical(info), "at": utc_now()}}
        if store.put_json_if(key, {**current, "stages": stages}, etag):
            return
    raise RuntimeError(f"{store.uri(key)} kept changing: stage {stage} not recorded")
