"""Promoted models in the bucket: immutable versions and one production pointer.

`python -m tasks models list` shows every version and the one production names;
`python -m tasks models rollback --to VERSION` moves production to another version (a rollback).

- `models/<version>/{model.pth, config.py, model_card.json}` is one model, published once (its
  `_SUCCESS` lists each file's sha256) and never changed or deleted; version =
  `<experiment>-<first 16 hex digits of the checkpoint's sha256>` (tasks.store.model_version).
- `models/production.json` is the pointer: the champion's version and checkpoint sha256, who promoted
  it, why, and the previous champion. It is one small object, so one PUT moves production at once,
  and every PUT is conditional (If-Match the ETag read before deciding; If-None-Match for the first
  one): when two promotions race, the second PUT fails and its caller decides again against the new
  champion (tasks.selection.promote). The pointer is written only after its version is complete and
  checked, so a crash anywhere leaves production as it was or naming a complete model.

Reading production checks what the pointer names (published, all three files, the checkpoint's
sha256 equal in pointer, marker and model card); anything else is a ProductionError, never "no
champion": a broken pointer must not let any winner through. Fix one with `rollback`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import store as st
from tasks.errors import InputError

log = logging.getLogger(__name__)

MODEL_FILES = ("model.pth", "config.py", "model_card.json")
POINTER_ATTEMPTS = 5  # conditional PUTs lost to other writers before giving up


class ProductionError(RuntimeError):
    """The production pointer names something that is not a complete, consistent model version."""


@dataclass(frozen=True)
class Production:
    """The production pointer as read (None: no champion yet), its ETag and the champion's card."""

    pointer: dict | None
    etag: str | None
    card: dict | None

    @property
    def version(self) -> str | None:
        return None if self.pointer is None else self.pointer["version"]


def version_card(store: st.Store, version: str, checkpoint_sha256: str | None = None) -> dict:
    """The model card of a complete version (ProductionError naming what is wrong otherwise)."""
    try:
        prefix = st.model_prefix(version)
    except InputError as err:
        raise ProductionError(str(err)) from None
    where = store.uri(f"{prefix}/")
    marker = store.marker(prefix)
    if marker is None:
        raise ProductionError(f"{where}: not a published model version (no {st.MARKER})")
    missing = [name for name in MODEL_FILES if name not in marker["files"]]
    if missing:
        raise ProductionError(f"{where}: published without {', '.join(missing)}")
    card = store.get_json(f"{prefix}/model_card.json")
    weights = marker["files"]["model.pth"]
    if card.get("checkpoint_sha256") != weights or checkpoint_sha256 not in (None, weights):
        raise ProductionError(
            f"{where}: model.pth has sha256 {weights}, its model card says {card.get('checkpoint_sha256')}"
            + ("" if checkpoint_sha256 is None else f" and the production pointer {checkpoint_sha256}")
        )
    return card


def read_production(store: st.Store) -> Production:
    """The current champion, checked (ProductionError when the pointer names no complete model)."""
    pointer, etag = store.get_json_with_etag(st.PRODUCTION_KEY)
    if pointer is None:
        return Production(None, None, None)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
        raise ProductionError(f"{store.uri(st.PRODUCTION_KEY)}: names no model version")
    try:
        card = version_card(store, pointer["version"], pointer.get("checkpoint_sha256"))
    except ProductionError as err:
        raise ProductionError(
            f"{store.uri(st.PRODUCTION_KEY)} names a broken model ({err}); "
            "point it at a complete version: python -m tasks models rollback --to VERSION"
        ) from None
    return Production(pointer, etag, card)


def publish_version(store: st.Store, card: dict, model: Path, config_text: str) -> str:
    """models/<version>/ for this card's checkpoint, written once; returns the version.

    A version already complete with the same weights is kept as it is (a retry after a crash, or a
    model promoted before): versions are immutable.
    """
    version = st.model_version(card["experiment"], card["checkpoint_sha256"])
    prefix = st.model_prefix(version)
    existing = store.marker(prefix)
    if existing is not None and existing["files"].get("model.pth") == card["checkpoint_sha256"]:
        log.info("model version %s already published", store.uri(f"{prefix}/"))
        return version
    with tempfile.TemporaryDirectory(dir=st.work_dir()) as tmp:
        out = Path(tmp)
        (out / "model.pth").write_bytes(model.read_bytes())
        if st.sha256_file(out / "model.pth") != card["checkpoint_sha256"]:
            raise ProductionError(f"{model}: not the checkpoint the model card names")
        (out / "config.py").write_text(config_text)
        (out / "model_card.json").write_text(json.dumps({**card, "version": version}, indent=2) + "\n")
        store.publish_once(out, prefix, inputs={"checkpoint_sha256": card["checkpoint_sha256"]})
    return version


def _summary(pointer: dict | None) -> dict | None:
    if pointer is None:
        return None
    keys = ("version", "run_id", "experiment", "test_mDice", "test_set_version", "promoted_at")
    return {key: pointer.get(key) for key in keys}


def move_production(store: st.Store, version: str, expected: Production, reason: str) -> bool:
    """Point production at a complete version if it still is `expected`; False if it moved meanwhile."""
    card = version_card(store, version)  # never point at anything incomplete
    pointer = {
        "version": version,
        "prefix": store.uri(f"{st.model_prefix(version)}/"),
        "checkpoint_sha256": card["checkpoint_sha256"],
        "run_id": card.get("run_id"),
        "experiment": card.get("experiment"),
        "test_mDice": card.get("test_metrics", {}).get("mDice"),
        "test_set_version": card.get("test_set_version"),
        "promoted_at": st.utc_now(),
        "reason": reason,
        "previous": _summary(expected.pointer),
        "write_id": uuid.uuid4().hex,  # recognises our own write after a retried PUT
    }
    if store.put_json_if(st.PRODUCTION_KEY, pointer, expected.etag):
        return True
    now, _ = store.get_json_with_etag(st.PRODUCTION_KEY)
    return isinstance(now, dict) and now.get("write_id") == pointer["write_id"]


def list_versions(store: st.Store) -> list[dict]:
    """Every published version (oldest promotion data first by version name) and production's mark."""
    pointer, _ = store.get_json_with_etag(st.PRODUCTION_KEY)
    current = pointer.get("version") if isinstance(pointer, dict) else None
    versions = []
    for key in store.list_keys(st.MODELS_PREFIX):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != st.MARKER:
            continue
        card = store.get_json(f"{st.MODELS_PREFIX}/{parts[1]}/model_card.json")
        versions.append(
            {
                "version": parts[1],
                "production": parts[1] == current,
                "run_id": card.get("run_id"),
                "experiment": card.get("experiment"),
                "test_mDice": card.get("test_metrics", {}).get("mDice"),
                "test_set_version": card.get("test_set_version"),
            }
        )
    return versions


def rollback(store: st.Store, version: str) -> dict:
    """Point production at an existing complete version (whatever it names now, broken included)."""
    version_card(store, version)
    for _ in range(POINTER_ATTEMPTS):
        pointer, etag = store.get_json_with_etag(st.PRODUCTION_KEY)
        current = Production(pointer if isinstance(pointer, dict) else None, etag, None)
        if move_production(store, version, current, f"rollback by hand to {version}"):
            return store.get_json(st.PRODUCTION_KEY)
    raise RuntimeError(f"{store.uri(st.PRODUCTION_KEY)} kept changing during {POINTER_ATTEMPTS} attempts")


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="every model version; which one production names")
    back = sub.add_parser("rollback", help="point production at another (complete) version")
    back.add_argument("--to", required=True, metavar="VERSION", help="a version listed by `models list`")


def main(args: argparse.Namespace) -> int:
    store = st.Store.from_env()
    result: Any
    if args.action == "list":
        result = list_versions(store)
    else:
        try:
            result = rollback(store, args.to)
        except ProductionError as err:  # the target is not a complete version: bad input
            raise InputError(f"--to {args.to}: {err}") from None
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
