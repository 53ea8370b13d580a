"""A dataset as the stages read it: a local folder or an s3:// prefix, present both locally and in the
bucket (`materialize_dataset`), and the version validate pinned for a run (`pin_dataset`,
`pinned_dataset`). The dataset module owns what a dataset is and its version; the store owns S3 and
the key layout; this module joins them (so neither imports the other).
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from tasks.dataset import content_hash, dataset_files, validate_dataset
from tasks.errors import InputError
from tasks.store import (
    ChecksumMismatch,
    Store,
    canonical,
    dataset_prefix,
    error_code,
    local_files,
    manifest_key,
    parse_s3_uri,
    work_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetRef:
    root: Path
    name: str
    version: str
    uri: str


def _sanitize_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")[:128]
    return cleaned or "dataset"


def _dataset_name(prefix: str) -> str:
    """datasets/<name>/<anything> -> name; any other prefix -> its last segment, sanitized."""
    parts = prefix.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "datasets" else _sanitize_name(parts[-1])


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file beside path: parallel stages on one worker share one dataset copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _listing_problems(store: Store, objects: list[dict]) -> list[str]:
    """What makes a prefix's objects no set of files: zero-byte "folder" objects (`images/train/`, what
    the S3 console's "Create folder" writes) and keys that are both a file and a folder."""
    keys = {obj["Key"] for obj in objects}
    problems = [
        f"{store.uri(key)}: a folder object (key ending in '/'), not a file: delete it "
        f"(aws s3api delete-object --bucket {store.bucket} --key {key})"
        for key in sorted(keys)
        if key.endswith("/")
    ]
    for key in sorted(keys):
        parents = [key[:i] for i, char in enumerate(key) if char == "/"]
        problems += [f"{store.uri(p)}: both a file and the folder of {key}" for p in parents if p in keys]
    return problems


def _download_dataset(uri: str, store: Store) -> DatasetRef:
    """An s3:// dataset prefix as a local copy in work_dir()/datasets/<bucket>/<prefix> (reused while
    the remote marker, or the remote listing for unpublished prefixes, is unchanged)."""
    prefix = parse_s3_uri(uri, store.bucket)
    local = work_dir() / "datasets" / store.bucket / prefix
    record_path = local.with_name(local.name + ".source.json")
    with _locked(local):
        content = store.marker(prefix)
        if content is not None:
            source = {"marker": content}
        else:  # a prefix a person uploaded without our marker: key, size and ETag detect changes only
            objects = store.list_objects(prefix)
            if not objects:
                raise InputError(f"{uri}: no objects under this prefix")
            if problems := _listing_problems(store, objects):
                raise InputError(problems)
            source = {"listing": sorted([o["Key"], o["Size"], o["ETag"]] for o in objects)}
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
        if local.is_dir() and recorded == canonical(source):
            log.info("dataset %s cached in %s", uri, local)
        else:
            record_path.unlink(missing_ok=True)
            if content is not None:
                content = store.fetch_marked(prefix, local, wait_s=0)  # skips files whose sha256 matches
                source, wanted = {"marker": content}, set(content["files"])
            else:
                wanted = {p.relative_to(local).as_posix() for p in store.download_prefix(prefix, local)}
            # files an older version had and this one does not: a stale copy must not mix in
            for rel, path in list(local_files(local)):
                if rel not in wanted:
                    path.unlink()
            record_path.write_text(json.dumps(source, sort_keys=True))
        version = content_hash(local)
    return DatasetRef(root=local, name=_dataset_name(prefix), version=version, uri=store.uri(prefix))


def _publish_dataset(root: Path, name: str, version: str, store: Store) -> str:
    """Publish a validated dataset's own files (tasks.dataset.dataset_files: what its version covers,
    never a `.env` or notes beside them) once to datasets/<name>/<version>/; the prefix's URI."""
    prefix = dataset_prefix(name, version)
    if store.marker(prefix) is not None:  # content-addressed: a published version never changes
        log.info("dataset %s version %s already in %s (cached)", name, version, store.uri(prefix))
        return store.uri(prefix)
    files = dataset_files(root)
    others = sorted(rel for rel, _ in local_files(root) if rel not in set(files))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        log.info("not uploaded (not dataset files): %s", shown)
    # immutable: a conditional marker, so two validations of one version never unpublish each other
    store.publish_once(root, prefix, inputs={"dataset_version": version}, only=files)
    return store.uri(prefix)


def materialize_dataset(uri: str, store: Store | None = None, run_id: str | None = None) -> DatasetRef:
    """A dataset given as a local dir or an s3:// prefix, both present locally and in the bucket.

    Local dir: version = content hash, its dataset files published once to datasets/<name>/<version>/
    (a second call with the same content uploads nothing); root stays the local dir.
    s3:// prefix: downloaded into work_dir()/datasets/<prefix> (see _download_dataset); root is the
    local copy.
    run_id of a run that validate checked (runs/<id>/manifest.json records `dataset`): the stage
    reads the version validate pinned instead (`pinned_dataset`), whatever uri holds now.
    """
    store = store or Store.from_env()
    if run_id is not None and (pin := validated_dataset(store, run_id)) is not None:
        return pinned_dataset(uri, pin, store, run_id)
    if uri.startswith("s3://"):
        return _download_dataset(uri, store)
    root = Path(uri).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{uri}: dataset directory does not exist")
    name, version = _sanitize_name(root.name), content_hash(root)
    if store.marker(dataset_prefix(name, version)) is None:
        # Any stage may be the first to see a dataset: never publish one that fails validation.
        validate_dataset(root)
    return DatasetRef(root=root, name=name, version=version, uri=_publish_dataset(root, name, version, store))


def dataset_source(uri: str, store: Store) -> str:
    """How a --dataset value is recorded and compared: an absolute path or s3://<bucket>/<prefix>."""
    if uri.startswith("s3://"):
        return store.uri(parse_s3_uri(uri, store.bucket))
    return str(Path(uri).expanduser().resolve())


def pin_dataset(uri: str, ref: DatasetRef, store: Store) -> dict:
    """What validate records for the stages after it (the manifest's `dataset`): the immutable copy
    datasets/<name>/<version>/ of the files it validated (published from ref.root unless that version
    is there already) and where they came from. A sync into the source prefix during the run
    changes nothing the run reads."""
    pinned = _publish_dataset(ref.root, ref.name, ref.version, store)
    return {"name": ref.name, "version": ref.version, "uri": pinned, "source": dataset_source(uri, store)}


def validated_dataset(store: Store, run_id: str) -> dict | None:
    """The dataset validate recorded for a run (`pin_dataset`), or None if validate did not run."""
    key = manifest_key(run_id)
    if not store.exists(key):
        return None
    pin = store.get_json(key).get("dataset") or {}
    return pin if pin.get("uri") and pin.get("version") else None


def pinned_dataset(uri: str, pin: dict, store: Store, run_id: str) -> DatasetRef:
    """The dataset version a run's validate checked, read from its pinned copy.

    InputError (exit 2) if uri is another dataset than the one validate checked, or if the pinned
    copy no longer holds exactly the validated content (an object rewritten or deleted).
    """
    given = dataset_source(uri, store)
    # a manifest written before pins had no source: its uri is what validate checked
    if "source" in pin and given not in (pin["uri"], pin["source"]):
        raise InputError(
            f"--dataset {uri}: run {run_id} validated {pin.get('source') or pin['uri']} (version "
            f"{pin['version']}); a run reads one dataset: validate this one under a new run id"
        )
    try:
        ref = _download_dataset(pin["uri"], store)
    except (ChecksumMismatch, ClientError) as err:  # an object of the pinned copy rewritten or deleted
        if isinstance(err, ClientError) and error_code(err) not in ("404", "NoSuchKey", "NotFound"):
            raise
        raise InputError(
            f"{pin['uri']}: {err}: the dataset changed after validate checked it in run {run_id}"
        ) from err
    if ref.version != pin["version"]:
        raise InputError(
            f"{pin['uri']}: dataset version is now {ref.version}, validate checked {pin['version']} "
            f"in run {run_id}: the data changed under the run"
        )
    if given != pin["uri"]:
        log.info("run %s reads %s: the version of %s that validate checked", run_id, pin["uri"], uri)
    return DatasetRef(root=ref.root, name=pin.get("name", ref.name), version=ref.version, uri=pin["uri"])
