"""User-supplied weight files (YOLOv8, SAM2, pretrained backbones): a local path, an s3:// URI in the
pipeline's bucket, a file baked into an image, or the bucket's weights/<filename> (store.weights_key)."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.errors import InputError
from tasks.store import Store, parse_s3_uri, weights_key, work_dir


def fetch_weights(store: Store, spec: str | None, filename: str, flag: str) -> tuple[Path, str]:
    """A user-supplied weights file as a local path, and where it came from.

    `spec` is a local path or an s3:// URI in the pipeline's bucket. Without one: the file baked into
    an image ($SEGPIPE_WEIGHTS_DIR/<filename>, see images/relabel), else s3://<bucket>/weights/<filename>.
    A missing file is an InputError that says where to put it.
    """
    default_key = weights_key(filename)
    target = store.uri(default_key)
    hint = (
        f"upload {filename} to {target} (e.g. `aws s3 cp {filename} {target}`) "
        f"or pass {flag} with a local path or an s3:// URI in bucket {store.bucket}"
    )
    baked = Path(os.environ.get("SEGPIPE_WEIGHTS_DIR") or "/nonexistent") / filename
    if spec is None and baked.is_file():
        return baked, str(baked)
    if spec is not None and not spec.startswith("s3://"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"{flag} {spec}: weights file not found; {hint}")
        return path.resolve(), str(path.resolve())
    key = default_key if spec is None else parse_s3_uri(spec, store.bucket)
    if not store.exists(key):
        raise InputError(f"{flag}: weights file {store.uri(key)} not found; {hint}")
    # Weights are immutable by convention (a new file gets a new key): download once per key.
    local = work_dir() / "weights" / store.bucket / key
    if not local.is_file():
        store.download_file(key, local)
    return local, store.uri(key)
