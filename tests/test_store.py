"""tasks.store against a real S3 API server process (moto_server on 127.0.0.1, see conftest)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from tasks import store as st
from tasks.dataset import content_hash, dataset_files
from tasks.errors import InputError
from tasks.manifest import update_manifest
from tasks.materialize import materialize_dataset
from tasks.store import ChecksumMismatch, RetryPolicy, Store, weights_key
from tasks.weights import fetch_weights

MB = 1024 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def count_calls(store: Store, *operations: str) -> dict[str, int]:
    """Count the S3 requests a store's client really sends (boto3 event hooks, no mocking)."""
    counts = dict.fromkeys(operations, 0)

    def seen(event_name: str, **_kwargs) -> None:
        counts[event_name.split(".")[-1]] += 1

    for operation in operations:
        store.client.meta.events.register(f"before-call.s3.{operation}", seen)
    return counts


@pytest.fixture()
def store(s3_env: dict[str, str]) -> Store:
    return Store.from_env()


def test_key_layout() -> None:
    assert st.dataset_prefix("synth", "0123abcd") == "datasets/synth/0123abcd"
    assert st.run_prefix("r1") == "runs/r1"
    assert st.stage_prefix("r1", "eda") == "runs/r1/eda"
    assert st.stage_prefix("r1", "relabel") == "runs/r1/relabel"
    assert st.stage_prefix("r1", "train", "h1") == "runs/r1/train/h1"
    assert st.stage_prefix("r1", "eval", "exp2") == "runs/r1/eval/exp2"
    assert st.winner_key("r1") == "runs/r1/winner.json"
    assert st.report_key("r1") == "runs/r1/report.md"
    assert st.manifest_key("r1") == "runs/r1/manifest.json"
    assert st.PRODUCTION_KEY == "models/production.json"
    sha = "ab" * 32
    assert st.model_version("h1", sha) == "h1-" + "ab" * 8
    assert st.model_prefix(st.model_version("h1", sha)) == "models/h1-" + "ab" * 8
    with pytest.raises(ValueError, match="needs an experiment"):
        st.stage_prefix("r1", "train")
    with pytest.raises(ValueError, match="unknown stage"):
        st.stage_prefix("r1", "deploy")
    assert st.check_run_id("manual__2026-11-25T10.00_x") == "manual__2026-11-25T10.00_x"
    for bad in ("", "../x", "a/b", "-x", "x" * 129, "a b"):
        with pytest.raises(InputError, match="invalid run id"):
            st.check_run_id(bad)


def test_50mb_round_trip_verifies_sha256(store: Store, tmp_path: Path) -> None:
    source = random_file(tmp_path / "big.bin", 50 * MB)
    started = time.perf_counter()
    store.upload_file(source, "blobs/big.bin")
    back = store.download_file("blobs/big.bin", tmp_path / "back" / "big.bin")
    print(f"50 MB round trip: {time.perf_counter() - started:.2f}s")
    assert sha256(back) == sha256(source)
    head = store.client.head_object(Bucket=store.bucket, Key="blobs/big.bin", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == sha256(source)
    assert head["ChecksumSHA256"]  # every part was sent with its SHA-256 and checked by the server
    assert head["ETag"].strip('"').endswith(f"-{50 // 8 + 1}")  # multipart: the ETag is no file digest
    assert not list(back.parent.glob(".*.part"))


def test_download_detects_corrupt_object(store: Store, tmp_path: Path) -> None:
    # An object whose bytes do not match the sha256 it carries, as after corruption at rest.
    store.client.put_object(
        Bucket=store.bucket, Key="bad.bin", Body=b"tampered", Metadata={"sha256": "0" * 64}
    )
    store.retry = RetryPolicy(attempts=2, backoff_s=0.01)
    with pytest.raises(ChecksumMismatch, match="bad.bin"):
        store.download_file("bad.bin", tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


def test_text_json_exists_and_folder_listing(store: Store) -> None:
    store.put_json("runs/a/x.json", {"b": [1, 2]})
    store.put_text("runs/a/sub/y.md", "# hi\n")
    store.put_text("runs/ab/z.txt", "other run")
    assert store.get_json("runs/a/x.json") == {"b": [1, 2]}
    assert store.get_text("runs/a/sub/y.md") == "# hi\n"
    assert store.exists("runs/a/x.json") and not store.exists("runs/a/missing")
    # 'runs/a' is a folder: runs/ab/ is not under it
    assert store.list_keys("runs/a") == ["runs/a/sub/y.md", "runs/a/x.json"]
    assert store.list_keys("runs/a/") == store.list_keys("runs/a")
    assert store.list_keys("") == ["runs/a/sub/y.md", "runs/a/x.json", "runs/ab/z.txt"]


def test_upload_dir_and_download_prefix(store: Store, tmp_path: Path) -> None:
    files = {"a.txt": b"a", "deep/er/b.bin": os.urandom(1000), "c.json": b"{}"}
    src = make_tree(tmp_path / "src", files)
    keys = store.upload_dir(src, "datasets/x/1")
    assert keys == ["datasets/x/1/a.txt", "datasets/x/1/c.json", "datasets/x/1/deep/er/b.bin"]
    paths = store.download_prefix("datasets/x/1", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data


def test_publish_writes_marker_last(store: Store, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "out", {f"f{i}.bin": os.urandom(2000) for i in range(8)})
    src = make_tree(src, {"big.bin": os.urandom(20 * MB)})  # multipart as well
    prefix = st.stage_prefix("r1", "eda")
    reader = Store.from_env()  # a second client, as another stage would have
    with pytest.raises(InputError, match="stage runs/r1/eda has not published outputs"):
        reader.fetch(prefix, tmp_path / "early")
    observed: list[tuple[str, bool]] = []

    def check(params: dict, **_kwargs) -> None:
        # Runs before every upload request the publisher sends: the marker must be absent until
        # every file is there, and the marker must be the last object written.
        if params["Key"] == st.marker_key(prefix):
            present = set(reader.list_keys(prefix))
            observed.append(("marker", all(f"{prefix}/{rel}" in present for rel in (*files, "big.bin"))))
        else:
            observed.append((params["Key"], reader.marker(prefix) is None))

    files = [f"f{i}.bin" for i in range(8)]
    for operation in ("PutObject", "CreateMultipartUpload"):
        store.client.meta.events.register(f"before-parameter-build.s3.{operation}", check)
    marker = store.publish(src, prefix, inputs={"dataset_version": "v1"})
    assert observed[-1] == ("marker", True)
    assert len(observed) == 10 and all(ok for _, ok in observed)
    assert marker["files"] == {rel: sha256(src / rel) for rel in (*files, "big.bin")}
    assert reader.marker(prefix) == marker
    out = reader.fetch(prefix, tmp_path / "in")
    assert all(sha256(out / rel) == digest for rel, digest in marker["files"].items())


def test_reader_never_sees_a_partial_stage(store: Store, tmp_path: Path) -> None:
    prefix = st.stage_prefix("r1", "train", "h1")
    versions = [
        make_tree(tmp_path / f"v{n}", {f"part{i}.bin": os.urandom(300_000) for i in range(12)})
        for n in (1, 2)
    ]
    expected = [{rel: sha256(v / rel) for rel in (f"part{i}.bin" for i in range(12))} for v in versions]
    done = threading.Event()
    seen: list[dict] = []
    errors: list[BaseException] = []

    def poll() -> None:
        reader = Store.from_env()
        while not done.is_set():
            target = tmp_path / "reader" / str(len(seen))
            try:
                out = reader.fetch(prefix, target)
            except InputError:
                continue  # not published (yet, or re-publishing): the only other allowed answer
            except BaseException as err:  # a partial or mixed stage would land here
                errors.append(err)
                return
            seen.append({p.name: sha256(p) for p in out.iterdir()})

    reader_thread = threading.Thread(target=poll)
    reader_thread.start()
    try:
        for version, _digests in zip(versions, expected, strict=True):
            store.publish(version, prefix, inputs={"v": version.name})
        time.sleep(0.5)  # let the reader see the final state too
    finally:
        done.set()
        reader_thread.join()
    assert not errors
    assert seen and all(snapshot in expected for snapshot in seen)
    assert seen[-1] == expected[1]


def test_republish_is_idempotent_and_removes_stale_keys(store: Store, tmp_path: Path) -> None:
    prefix = st.stage_prefix("r2", "eval", "h2")
    src = make_tree(tmp_path / "out", {"test_metrics.json": b"{}", "panels/a.png": b"png-a", "old.txt": b"x"})
    first = store.publish(src, prefix, inputs={"k": 1})
    keys = store.list_keys(prefix)
    second = store.publish(src, prefix, inputs={"k": 1})
    assert store.list_keys(prefix) == keys  # same keys, nothing appended
    assert second["files"] == first["files"]
    assert store.is_current(prefix, {"k": 1}) and not store.is_current(prefix, {"k": 2})

    (src / "old.txt").unlink()
    (src / "panels" / "b.png").write_bytes(b"png-b")
    third = store.publish(src, prefix, inputs={"k": 2})
    assert store.list_keys(prefix) == [
        f"{prefix}/_SUCCESS",
        f"{prefix}/panels/a.png",
        f"{prefix}/panels/b.png",
        f"{prefix}/test_metrics.json",
    ]
    assert sorted(third["files"]) == ["panels/a.png", "panels/b.png", "test_metrics.json"]
    assert store.is_current(prefix, {"k": 2})
    # a listed file gone (someone deleted it): no longer current, and fetch says which
    store.delete_keys([f"{prefix}/panels/b.png"])
    assert not store.is_current(prefix, {"k": 2})
    with pytest.raises(Exception, match="b.png|404|Not Found"):
        store.fetch(prefix, tmp_path / "broken")


def test_publish_refuses_reserved_name_and_missing_dir(store: Store, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "out", {"_SUCCESS": b"{}"})
    with pytest.raises(InputError, match="_SUCCESS"):
        store.publish(src, "runs/r3/eda")
    with pytest.raises(InputError, match="not a directory"):
        store.publish(tmp_path / "missing", "runs/r3/eda")


def test_fetch_waits_for_the_marker(store: Store, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "out", {"report.json": b'{"ok": true}'})
    publisher = threading.Timer(1.0, store.publish, args=(src, "runs/r4/eda"))
    publisher.start()
    try:
        out = store.fetch("runs/r4/eda", tmp_path / "in", wait_s=30)
    finally:
        publisher.join()
    assert (out / "report.json").read_bytes() == b'{"ok": true}'


def test_upload_survives_a_server_restart(s3_server, s3_env, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="tasks.store")
    store = Store.from_env()
    store.transfer = TransferConfig(multipart_threshold=8 * MB, multipart_chunksize=8 * MB, max_concurrency=1)
    source = random_file(tmp_path / "big.bin", 48 * MB)
    parts_sent = threading.Event()
    server_down = threading.Event()
    uploaded = 0

    def after_part(**_kwargs) -> None:
        nonlocal uploaded
        uploaded += 1
        if uploaded == 2:  # two parts are in; hold the upload until the server is gone
            parts_sent.set()
            server_down.wait(timeout=30)

    store.client.meta.events.register("after-call.s3.UploadPart", after_part)
    result: list[BaseException | None] = []

    def upload() -> None:
        try:
            store.upload_file(source, "blobs/restart.bin")
            result.append(None)
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=upload)
    thread.start()
    assert parts_sent.wait(timeout=60)
    s3_server.stop()  # the upload is mid-way: its multipart upload dies with the server
    server_down.set()
    time.sleep(1.0)  # the client now hits a closed port and backs off
    s3_server.start()
    s3_server.create_bucket(store.bucket)  # what infra/s3_server.py does on start
    thread.join(timeout=120)
    assert result == [None]
    assert any("retry" in record.getMessage() for record in caplog.records)
    back = store.download_file("blobs/restart.bin", tmp_path / "back.bin")
    assert sha256(back) == sha256(source)


def test_store_never_creates_buckets(s3_env, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGPIPE_BUCKET", "no-such-bucket-here")
    store = Store.from_env()
    with pytest.raises(Exception, match="NoSuchBucket"):
        store.upload_file(random_file(tmp_path / "f", 10), "x")
    store.ensure_bucket()  # the explicit way (infra)
    store.upload_file(tmp_path / "f", "x")
    assert store.exists("x")


def test_materialize_local_dataset_uploads_once(store: Store, tiny_dataset: Path) -> None:
    ref = materialize_dataset(str(tiny_dataset), store)
    version = content_hash(tiny_dataset)
    assert (ref.root, ref.name, ref.version) == (tiny_dataset.resolve(), "synth", version)
    assert ref.uri == f"s3://{store.bucket}/datasets/synth/{version}"
    marker = store.marker(f"datasets/synth/{version}")
    # the dataset's own files, what its version covers; not synth's provenance file beside them
    assert sorted(marker["files"]) == dataset_files(tiny_dataset)
    assert "synth.json" not in marker["files"] and (tiny_dataset / "synth.json").is_file()
    uploads = count_calls(store, "PutObject", "CreateMultipartUpload", "UploadPart")
    assert materialize_dataset(str(tiny_dataset), store) == ref
    assert uploads == {"PutObject": 0, "CreateMultipartUpload": 0, "UploadPart": 0}


def test_materialize_s3_dataset_downloads_identical_copy(store: Store, tiny_dataset: Path) -> None:
    ref = materialize_dataset(str(tiny_dataset), store)
    remote = materialize_dataset(ref.uri, store)
    assert remote.root.is_relative_to(st.work_dir())
    assert (remote.name, remote.version, remote.uri) == (ref.name, ref.version, ref.uri)
    assert dataset_files(remote.root) == dataset_files(tiny_dataset)
    for rel in dataset_files(tiny_dataset):
        assert sha256(remote.root / rel) == sha256(tiny_dataset / rel)
    downloads = count_calls(store, "GetObject")
    assert materialize_dataset(ref.uri, store) == remote  # cached: only the marker is read
    assert downloads == {"GetObject": 1}


def test_materialize_unpublished_s3_prefix(store: Store, tiny_dataset: Path, tmp_path: Path) -> None:
    # A dataset a person copied into the bucket by hand (no _SUCCESS marker)
    copy = shutil.copytree(tiny_dataset, tmp_path / "pets")
    store.upload_dir(copy, "incoming/pets")
    uri = f"s3://{store.bucket}/incoming/pets/"
    ref = materialize_dataset(uri, store)
    assert (ref.name, ref.version) == ("pets", content_hash(tiny_dataset))
    assert sha256(ref.root / "defects.json") == sha256(tiny_dataset / "defects.json")
    # the prefix changes (a file removed): the listing differs, the local copy follows it
    store.delete_keys(["incoming/pets/defects.json"])
    again = materialize_dataset(uri, store)
    assert again.root == ref.root and not (again.root / "defects.json").exists()
    assert (again.root / "labels" / "train").is_dir()


def test_materialize_refuses_bad_uris(store: Store, tmp_path: Path) -> None:
    for uri, problem in [
        ("s3://someone-elses-bucket/datasets/x", "is not the pipeline's bucket"),
        (f"s3://{store.bucket}/datasets/../runs/r1", "'..' segments"),
        (f"s3://{store.bucket}/", "no prefix"),
        (f"s3://{store.bucket}/nothing/here", "no objects"),
        (str(tmp_path / "missing"), "does not exist"),
    ]:
        with pytest.raises(InputError, match=problem) as err:
            materialize_dataset(uri, store)
        assert uri in str(err.value)


def test_update_manifest_merges(store: Store, monkeypatch) -> None:
    monkeypatch.setenv("SEGPIPE_GIT_SHA", "abc123")
    first = update_manifest(store, "r5", params={"max_epochs": 2}, dataset={"version": "v1"})
    assert first["git_sha"] == "abc123" and first["run_id"] == "r5"
    assert first["packages"]["boto3"] and "torch" in first["packages"]
    second = update_manifest(store, "r5", params={"gate": 0.75}, ended_at="2026-11-25T12:00:00+00:00")
    assert second["params"] == {"max_epochs": 2, "gate": 0.75}
    assert second["started_at"] == first["started_at"] and second["dataset"] == {"version": "v1"}
    assert store.get_json(st.manifest_key("r5")) == second
    assert not any("secret" in key.lower() or "key_id" in key.lower() for key in second)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in store.get_text(st.manifest_key("r5"))


def test_weights_resolve_from_baked_dir_flag_or_bucket(
    tmp_path: Path, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    st = Store.from_env()
    with pytest.raises(InputError, match=r"weights/yolov8x\.pt not found.*upload yolov8x\.pt"):
        fetch_weights(st, None, "yolov8x.pt", "--yolo-weights")
    st.put_bytes(weights_key("yolov8x.pt"), b"from the bucket")
    local, source = fetch_weights(st, None, "yolov8x.pt", "--yolo-weights")
    assert local.read_bytes() == b"from the bucket" and source == st.uri("weights/yolov8x.pt")
    baked = tmp_path / "baked"
    baked.mkdir()
    (baked / "yolov8x.pt").write_bytes(b"baked into the image")
    monkeypatch.setenv("SEGPIPE_WEIGHTS_DIR", str(baked))
    assert fetch_weights(st, None, "yolov8x.pt", "--yolo-weights")[0] == baked / "yolov8x.pt"
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"x")
    assert fetch_weights(st, str(mine), "yolov8x.pt", "--yolo-weights")[0] == mine
    with pytest.raises(InputError, match="--yolo-weights /nonexistent.pt: weights file not found"):
        fetch_weights(st, "/nonexistent.pt", "yolov8x.pt", "--yolo-weights")
