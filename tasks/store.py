"""The artifact store: the ONLY module that knows the key layout and talks to S3.

boto3 reads the endpoint and credentials from the standard environment variables, so the embedded
moto server, MinIO and AWS S3 run the same code. Integrity is checked with SHA-256: every object
carries its sha256 in user metadata (and S3 verifies each uploaded part with ChecksumAlgorithm=SHA256);
every download is hashed and compared. Multipart ETags are never trusted for integrity.

Dataset copies live in tasks.materialize, user weights in tasks.weights, the run manifest in
tasks.manifest, the cross-run cache index in tasks.stage (its keys are laid out here).

A stage publishes a prefix atomically: the files first, `<prefix>/_SUCCESS` (JSON listing every file
with its sha256) last. Readers (`fetch`, `is_current`) only see a prefix that has its marker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)

from tasks.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUCKET = "segmentation"
MARKER = "_SUCCESS"
MODELS_PREFIX = "models"
CACHE_PREFIX = "cache"  # the cross-run cache index: cache/<stage>/<key>.json (tasks.stage)
# The production pointer: one small JSON object naming the champion's models/<version>/, written last
# with a conditional PUT (tasks.models). Before versions existed production was the prefix
# models/production/; nothing reads that layout any more.
PRODUCTION_KEY = f"{MODELS_PREFIX}/production.json"
# Answers of a conditional PUT whose condition did not hold: another writer got there first.
CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
STAGES_WITHOUT_EXPERIMENT = ("eda", "relabel")
STAGES_WITH_EXPERIMENT = ("train", "eval")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_META = "sha256"  # user metadata key (x-amz-meta-sha256) holding the hex digest of the object
MB = 1024 * 1024
# S3 error codes worth retrying the whole operation for: server-side hiccups, and NoSuchUpload (a
# multipart upload the server forgot, e.g. after a restart: starting over is the only way forward).
RETRYABLE_CODES = {
    "NoSuchUpload",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "500",
    "502",
    "503",
    "504",
}


class ChecksumMismatch(Exception):
    """A transferred object's sha256 differs from the expected one (retried, then raised)."""


# ---------------------------------------------------------------- key layout (all of it lives here)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise InputError(
            f"invalid run id {run_id!r}: use 1-128 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return run_id


def _check_name(kind: str, name: str) -> str:
    # Names become one key segment: same rule as run ids (no '/', no '..').
    if not isinstance(name, str) or not RUN_ID_PATTERN.match(name) or name in (".", ".."):
        raise InputError(f"invalid {kind} {name!r}: use letters, digits, '.', '_', '-' (max 128)")
    return name


def dataset_prefix(name: str, version: str) -> str:
    return f"datasets/{_check_name('dataset name', name)}/{_check_name('dataset version', version)}"


def run_prefix(run_id: str) -> str:
    return f"runs/{check_run_id(run_id)}"


def stage_prefix(run_id: str, stage: str, experiment: str | None = None) -> str:
    """runs/<id>/eda | runs/<id>/relabel | runs/<id>/train/<exp> | runs/<id>/eval/<exp>."""
    if stage in STAGES_WITHOUT_EXPERIMENT:
        if experiment is not None:
            raise ValueError(f"stage {stage!r} takes no experiment (got {experiment!r})")
        return f"{run_prefix(run_id)}/{stage}"
    if stage in STAGES_WITH_EXPERIMENT:
        if experiment is None:
            raise ValueError(f"stage {stage!r} needs an experiment")
        return f"{run_prefix(run_id)}/{stage}/{_check_name('experiment', experiment)}"
    valid = STAGES_WITHOUT_EXPERIMENT + STAGES_WITH_EXPERIMENT
    raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(valid)}")


def winner_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}/winner.json"


def report_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}/report.md"


def review_key(run_id: str) -> str:
    """The bad-mask list a person's review exported (tasks/review.py), in the study's format."""
    return f"{run_prefix(run_id)}/review/bad_mask_paths.json"


def manifest_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}/manifest.json"


def clearml_prefix(run_id: str) -> str:
    """Where an online ClearML server stores a run's models and artifacts (its output_uri)."""
    return f"{run_prefix(run_id)}/clearml"


def model_version(experiment: str, checkpoint_sha256: str) -> str:
    """A promoted model's version: its experiment and checkpoint digest (same weights, same version)."""
    if not re.fullmatch(r"[0-9a-f]{64}", checkpoint_sha256 or ""):
        raise ValueError(f"not a sha256 hex digest: {checkpoint_sha256!r}")
    return f"{_check_name('experiment', experiment)}-{checkpoint_sha256[:16]}"


def model_prefix(version: str) -> str:
    """models/<version>: one model, written once (model.pth, config.py, model_card.json, _SUCCESS)."""
    if version == PRODUCTION_KEY.rpartition("/")[2]:
        raise InputError(f"invalid model version {version!r}")
    return f"{MODELS_PREFIX}/{_check_name('model version', version)}"


def cache_entry_key(stage: str, key: str) -> str:
    """cache/<stage>/<key>.json: which run published the outputs of a stage with this cache key."""
    if not re.fullmatch(r"[0-9a-f]{64}", key or ""):
        raise ValueError(f"not a cache key (sha256 hex digest): {key!r}")
    return f"{CACHE_PREFIX}/{_check_name('stage', stage)}/{key}.json"


def marker_key(prefix: str) -> str:
    return f"{_folder(prefix)}{MARKER}"


def work_dir() -> Path:
    """Local scratch/cache root: $SEGPIPE_WORK_DIR, default ~/.cache/segpipe (created)."""
    root = Path(os.environ.get("SEGPIPE_WORK_DIR") or "~/.cache/segpipe").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def bucket_name() -> str:
    return os.environ.get("SEGPIPE_BUCKET") or DEFAULT_BUCKET


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _folder(prefix: str) -> str:
    """'a/b' or 'a/b/' -> 'a/b/' ('' stays ''): list and delete by folder, never by string prefix."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _relative_key(prefix: str, key: str) -> str:
    rel = key[len(_folder(prefix)) :]
    parts = PurePosixPath(rel).parts
    # A key like 'p/../../etc' must never become a path outside the target directory.
    if not rel or any(part in ("..", ".") for part in parts) or rel.startswith("/"):
        raise InputError(f"refusing unsafe object key {key!r} under {prefix!r}")
    return rel


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MB), b""):
            digest.update(block)
    return digest.hexdigest()


def local_files(local_dir: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            yield path.relative_to(local_dir).as_posix(), path


def _selected_files(local_dir: Path, only: list[str] | None) -> dict[str, Path]:
    """relative path -> file: `only` (paths relative to local_dir) or, if None, every file under it."""
    if only is None:
        return dict(local_files(local_dir))
    return {rel: local_dir / rel for rel in sorted(only)}


# ---------------------------------------------------------------- retries


def error_code(err: BaseException) -> str | None:
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        return str(error.get("Code") or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def _is_connection_error(err: BaseException) -> bool:
    return isinstance(err, ConnectionError | HTTPClientError | IncompleteReadError | ResponseStreamingError)


def _unwrap(err: BaseException) -> BaseException:
    # boto3 wraps the real failure: S3UploadFailedError keeps it as __context__, RetriesExceededError
    # as last_exception.
    if isinstance(err, S3UploadFailedError) and err.__context__ is not None:
        return _unwrap(err.__context__)
    if isinstance(err, RetriesExceededError) and err.last_exception is not None:
        return _unwrap(err.last_exception)
    return err


def _retryable(err: BaseException, after_connection_error: bool) -> bool:
    cause = _unwrap(err)
    if isinstance(cause, ChecksumMismatch) or _is_connection_error(cause):
        return True
    code = error_code(cause)
    # A server that just came back (embedded moto restarts empty) may not have its bucket yet: wait
    # for whoever owns the bucket to recreate it; the store itself never creates buckets implicitly.
    return code in RETRYABLE_CODES or (code == "NoSuchBucket" and after_connection_error)


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


class Store:
    """One bucket of an S3 API server (moto, MinIO, AWS), addressed by keys."""

    def __init__(self, client: Any, bucket: str, retry: RetryPolicy | None = None):
        self.client = client
        self.bucket = bucket
        self.retry = retry or RetryPolicy()
        # Multipart above 16 MB in 8 MB parts; each part carries its own SHA-256 checked by the server.
        self.transfer = TransferConfig(
            multipart_threshold=16 * MB, multipart_chunksize=8 * MB, max_concurrency=4, use_threads=True
        )

    @classmethod
    def from_env(cls) -> Store:
        """Client from the standard AWS_* variables; bucket from SEGPIPE_BUCKET (default segmentation)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
        config = Config(
            # botocore retries single requests; `_retrying` below retries whole-file operations.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
            # MinIO and moto behind a plain host:port need path-style addressing.
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return cls(client, bucket_name())

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (infra setup only: no other method creates buckets)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            region = self.client.meta.region_name
            # AWS wants the region spelled out everywhere but us-east-1; MinIO and moto accept it.
            request: dict[str, Any] = {"Bucket": self.bucket}
            if region not in (None, "us-east-1"):
                request["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self.client.create_bucket(**request)
            log.info("created bucket %s", self.bucket)

    def _retrying(self, what: str, operation: Callable[[], T], retry_mismatch: bool = True) -> T:
        """Run a whole operation again after transient failures, with exponential backoff."""
        policy = self.retry
        saw_connection_error = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return operation()
            except Exception as err:
                saw_connection_error |= _is_connection_error(_unwrap(err))
                final = not _retryable(err, saw_connection_error) or (
                    isinstance(err, ChecksumMismatch) and not retry_mismatch
                )
                if attempt == policy.attempts or final:
                    raise
                delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1))
                log.warning(
                    "%s failed (%s: %s); retry %d/%d in %.1fs",
                    what,
                    type(_unwrap(err)).__name__,
                    _unwrap(err),
                    attempt,
                    policy.attempts - 1,
                    delay,
                )
                time.sleep(delay)

    # ------------------------------------------------------------ objects

    def upload_file(self, local: Path, key: str) -> None:
        self._upload_file(Path(local), key)

    def _upload_file(self, local: Path, key: str) -> str:
        if not local.is_file():
            raise InputError(f"{local}: not a file, cannot upload it to {self.uri(key)}")
        digest = sha256_file(local)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_META: digest}}

        def upload() -> None:
            self.client.upload_file(str(local), self.bucket, key, ExtraArgs=extra, Config=self.transfer)

        self._retrying(f"upload {local} -> {self.uri(key)}", upload)
        return digest

    def download_file(self, key: str, local: Path) -> Path:
        return self._download_file(key, Path(local), expected_sha256=None)

    def _download_file(
        self, key: str, local: Path, expected_sha256: str | None, retry_mismatch: bool = True
    ) -> Path:
        """Download to a temporary name, verify sha256, then rename (no half-written files).

        retry_mismatch=False: a mismatch against a marker's digest is for `fetch` to judge (the
        stage may have been re-published), so it is raised at once instead of downloaded again.
        """
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part")

        def download() -> None:
            expected = expected_sha256 or self._recorded_sha256(key)
            self.client.download_file(self.bucket, key, str(tmp), Config=self.transfer)
            if expected is not None and (actual := sha256_file(tmp)) != expected:
                raise ChecksumMismatch(f"{self.uri(key)}: sha256 {actual} != expected {expected}")
            tmp.replace(local)

        try:
            self._retrying(f"download {self.uri(key)} -> {local}", download, retry_mismatch)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def _recorded_sha256(self, key: str) -> str | None:
        """The sha256 an object was uploaded with: our metadata, else S3's full-object SHA-256."""
        head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        recorded = head.get("Metadata", {}).get(SHA256_META)
        if recorded:
            return recorded
        server = head.get("ChecksumSHA256")
        # A multipart object's SHA-256 is a checksum of part checksums (ETag "...-N"), not the object's.
        multipart = "-" in head.get("ETag", "") or head.get("ChecksumType") == "COMPOSITE"
        if server and not multipart and "-" not in server:
            return base64.b64decode(server).hex()
        log.debug("%s has no sha256 to verify against", self.uri(key))
        return None

    def put_bytes(self, key: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        self._retrying(
            f"put {self.uri(key)}",
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ChecksumAlgorithm="SHA256",
                Metadata={SHA256_META: digest},
            ),
        )

    def get_json_with_etag(self, key: str) -> tuple[Any, str | None]:
        """(content, ETag) of a JSON object, or (None, None) when there is none (for put_json_if)."""

        def get() -> tuple[Any, str | None]:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as err:
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None, None
                raise
            data = response["Body"].read()
            expected = response.get("Metadata", {}).get(SHA256_META)
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise ChecksumMismatch(f"{self.uri(key)}: content does not match its sha256")
            return json.loads(data), response["ETag"]

        return self._retrying(f"get {self.uri(key)}", get)

    def put_json_if(self, key: str, obj: Any, etag: str | None) -> bool:
        """Write obj only while the object still has `etag` (None: only while there is no object).

        A conditional PUT (If-Match / If-None-Match), atomic on the server: False when another writer
        changed the object first. A retry after a lost answer may see its own earlier write as the
        change: callers put something of their own in obj to recognise it.
        """
        data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=data,
                    ChecksumAlgorithm="SHA256",
                    Metadata={SHA256_META: hashlib.sha256(data).hexdigest()},
                    **condition,
                )
            except ClientError as err:
                if error_code(err) in CONFLICT_CODES:
                    return False
                raise
            return True

        return self._retrying(f"conditional put {self.uri(key)}", put)

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            data = response["Body"].read()
            expected = response.get("Metadata", {}).get(SHA256_META)
            if expected and hashlib.sha256(data).hexdigest() != expected:
                raise ChecksumMismatch(f"{self.uri(key)}: content does not match its sha256")
            return data

        return self._retrying(f"get {self.uri(key)}", get)

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_text(key))

    def exists(self, key: str) -> bool:
        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as err:
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True

        return self._retrying(f"head {self.uri(key)}", head)

    def list_objects(self, prefix: str) -> list[dict]:
        def listing() -> list[dict]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=_folder(prefix)
            )
            return [obj for page in pages for obj in page.get("Contents", [])]

        return self._retrying(f"list {self.uri(_folder(prefix))}", listing)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under the folder `prefix` ('runs/a' lists runs/a/..., never runs/ab/...), sorted."""
        return sorted(obj["Key"] for obj in self.list_objects(prefix))

    def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = self._retrying(
                f"delete {len(batch)} keys in {self.uri()}",
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            if response.get("Errors"):
                raise RuntimeError(f"could not delete from {self.uri()}: {response['Errors']}")

    # ------------------------------------------------------------ prefixes

    def upload_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Upload every file under local_dir to prefix/<relative path>; returns the keys written."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise InputError(f"{local_dir}: not a directory, cannot upload it to {self.uri(prefix)}")
        keys = []
        for rel, path in local_files(local_dir):
            key = _folder(prefix) + rel
            self._upload_file(path, key)
            keys.append(key)
        return keys

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
        """Download every object under the folder prefix into local_dir (sha256-verified)."""
        local_dir = Path(local_dir)
        return [
            self._download_file(key, local_dir / _relative_key(prefix, key), expected_sha256=None)
            for key in self.list_keys(prefix)
        ]

    # ------------------------------------------------------------ atomic publish

    def publish(
        self, local_dir: Path, prefix: str, inputs: dict | None = None, only: list[str] | None = None
    ) -> dict:
        """Publish local_dir under prefix; `_SUCCESS` goes last, so readers never see a partial stage.

        only: the files to publish (paths relative to local_dir); default every file under it.
        A re-publish first removes the old marker (the stage is unpublished while it changes), then
        overwrites the same keys, deletes keys the new outputs no longer have, and writes the marker.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise InputError(f"{local_dir}: not a directory, cannot publish it to {self.uri(prefix)}")
        files = _selected_files(local_dir, only)
        if MARKER in files:
            raise InputError(f"{local_dir / MARKER}: the name {MARKER} is reserved for the publish marker")
        marker = marker_key(prefix)
        if self.exists(marker):
            self.delete_keys([marker])
        digests = {rel: self._upload_file(path, _folder(prefix) + rel) for rel, path in files.items()}
        wanted = {_folder(prefix) + rel for rel in files}
        stale = [key for key in self.list_keys(prefix) if key not in wanted and key != marker]
        if stale:
            log.info("removing %d stale keys under %s", len(stale), self.uri(prefix))
            self.delete_keys(stale)
        content = {"files": digests, "inputs": canonical(inputs), "published_at": utc_now()}
        self.put_json(marker, content)
        log.info("published %d files to %s", len(digests), self.uri(_folder(prefix)))
        return content

    def publish_once(
        self, local_dir: Path, prefix: str, inputs: dict | None = None, only: list[str] | None = None
    ) -> dict:
        """Publish an immutable prefix: never deletes or changes one already published.

        The files (`only` as in publish) go up, then the marker with a conditional PUT (only if there
        is none). A prefix already published with the same files (a retry, or another writer of the
        same content) is left as it is; one with other files is an error (immutable means never
        overwritten).
        """
        files = _selected_files(Path(local_dir), only)
        digests = {rel: sha256_file(path) for rel, path in files.items()}
        existing = self.marker(prefix)
        if existing is None:
            for rel, path in files.items():
                self._upload_file(path, _folder(prefix) + rel)
            content = {"files": digests, "inputs": canonical(inputs), "published_at": utc_now()}
            if self.put_json_if(marker_key(prefix), content, None):
                log.info("published %d files to %s (immutable)", len(digests), self.uri(_folder(prefix)))
                return content
            existing = self.marker(prefix)  # another writer published it meanwhile
        if existing is None or existing["files"] != digests:
            raise RuntimeError(f"{self.uri(_folder(prefix))} is already published with other files")
        return existing

    def copy_verified(self, source: str, target: str, sha256: str) -> bool:
        """Server-side copy (CopyObject, metadata kept) of source to target, checked by the server's
        own SHA-256 of the copied bytes: True when target now holds exactly `sha256`; False (nothing
        left at target) when source is missing or holds other bytes. Objects up to 5 GB (CopyObject)."""

        def copy() -> str | None:
            try:
                response = self.client.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    ChecksumAlgorithm="SHA256",
                    MetadataDirective="COPY",
                )
            except ClientError as err:
                if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            return response.get("CopyObjectResult", {}).get("ChecksumSHA256")

        server = self._retrying(f"copy {self.uri(source)} -> {self.uri(target)}", copy)
        if server is None and not self.exists(target):
            return False
        if server is not None and "-" not in server:
            actual = base64.b64decode(server).hex()
        else:  # a server that does not checksum copies: read the copy back and hash it
            actual = hashlib.sha256(self.get_bytes_unchecked(target)).hexdigest()
        if actual != sha256:
            log.warning("%s: sha256 %s, expected %s: not reused", self.uri(source), actual, sha256)
            self.delete_keys([target])
            return False
        return True

    def get_bytes_unchecked(self, key: str) -> bytes:
        """An object's bytes as stored, not compared with its metadata (callers check them)."""
        return self._retrying(
            f"get {self.uri(key)}",
            lambda: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(),
        )

    def marker(self, prefix: str) -> dict | None:
        """The `_SUCCESS` JSON of a published prefix, or None."""
        try:
            return self.get_json(marker_key(prefix))
        except ClientError as err:
            if error_code(err) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def is_current(self, prefix: str, inputs: dict) -> bool:
        """True when prefix is published, with these inputs, and every file it lists is there."""
        content = self.marker(prefix)
        if content is None or content.get("inputs") != canonical(inputs):
            return False
        present = set(self.list_keys(prefix))
        return all(_folder(prefix) + rel in present for rel in content["files"])

    def fetch(self, prefix: str, local_dir: Path, wait_s: float = 0) -> Path:
        """Download a published prefix (waiting up to wait_s for its marker), verifying every sha256.

        Files already present locally with the right sha256 are not downloaded again. If the stage is
        re-published while we download, we start over with the new marker (never a mix of both).
        """
        self.fetch_marked(prefix, Path(local_dir), wait_s)
        return Path(local_dir)

    def fetch_marked(self, prefix: str, local_dir: Path, wait_s: float) -> dict:
        """fetch(), returning the marker whose files are now in local_dir."""
        deadline = time.monotonic() + wait_s
        for _ in range(self.retry.attempts):
            content = self._wait_for_marker(prefix, deadline)
            try:
                for rel, digest in content["files"].items():
                    target = local_dir / _relative_key(prefix, _folder(prefix) + rel)
                    if not (target.is_file() and sha256_file(target) == digest):
                        self._download_file(_folder(prefix) + rel, target, digest, retry_mismatch=False)
            except (ChecksumMismatch, ClientError) as err:
                if self.marker(prefix) == content:  # not a re-publish: corrupt or missing object
                    raise
                log.info("%s changed while downloading (%s); starting over", self.uri(prefix), err)
                continue
            if self.marker(prefix) == content:
                return content
            log.info("%s was re-published while downloading; starting over", self.uri(prefix))
        raise RuntimeError(f"{self.uri(prefix)} kept changing during {self.retry.attempts} downloads")

    def fetch_file(self, prefix: str, rel: str, local: Path) -> Path:
        """One file of a published prefix, checked against the sha256 its marker lists (InputError
        when the prefix is not published or its marker does not list rel)."""
        content = self._wait_for_marker(prefix, time.monotonic())
        if rel not in content["files"]:
            raise InputError(f"{self.uri(prefix)}: published without {rel}")
        return self._download_file(_folder(prefix) + rel, Path(local), content["files"][rel])

    def _wait_for_marker(self, prefix: str, deadline: float) -> dict:
        while (content := self.marker(prefix)) is None:
            if time.monotonic() >= deadline:
                raise InputError(
                    f"stage {_folder(prefix).rstrip('/')} has not published outputs "
                    f"(no {self.uri(marker_key(prefix))})"
                )
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return content


def canonical(obj: Any) -> Any:
    """What obj looks like after a JSON round trip (tuples -> lists), so comparisons are fair."""
    return json.loads(json.dumps(obj, sort_keys=True))


# ---------------------------------------------------------------- locations


def parse_s3_uri(uri: str, bucket: str) -> str:
    """s3://<bucket>/<prefix> -> prefix; refuses other buckets and '..' segments (InputError)."""
    if not uri.startswith("s3://"):
        raise InputError(f"{uri}: not an s3:// URI")
    uri_bucket, _, prefix = uri[len("s3://") :].partition("/")
    if uri_bucket != bucket:
        raise InputError(
            f"{uri}: bucket {uri_bucket!r} is not the pipeline's bucket {bucket!r} (SEGPIPE_BUCKET)"
        )
    segments = [s for s in prefix.split("/") if s]
    if any(s in ("..", ".") for s in segments):
        raise InputError(f"{uri}: '.' or '..' segments are not allowed in a dataset URI")
    if not segments:
        raise InputError(f"{uri}: no prefix after the bucket name")
    return "/".join(segments)


WEIGHTS_PREFIX = "weights"


def weights_key(filename: str) -> str:
    """Where users put weight files in the bucket: weights/<filename>."""
    return f"{WEIGHTS_PREFIX}/{filename}"
