"""A run reads exactly the dataset validate checked, uploads only the dataset's own files, and the
inputs that used to crash (exit 1, retried) are refused with exit 2 naming the file.

Real parts: the S3 server process (tests/conftest.py), the stages' own CLI, files on disk with the
names a user's machine gives them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tasks import cli
from tasks.dataset import content_hash, dataset_files, list_pairs
from tasks.materialize import materialize_dataset
from tasks.store import MARKER, Store, manifest_key, stage_prefix, work_dir

LATEST = "datasets/pets/latest"


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _forget_local_copies() -> None:
    """A fresh worker: nothing cached from earlier stages."""
    shutil.rmtree(work_dir() / "datasets", ignore_errors=True)


@pytest.fixture()
def latest(s3_env: dict, tiny_dataset: Path) -> str:
    """The tiny dataset synced by hand (no marker) into s3://<bucket>/datasets/pets/latest/."""
    store = Store.from_env()
    for rel in dataset_files(tiny_dataset):
        store.upload_file(tiny_dataset / rel, f"{LATEST}/{rel}")
    return store.uri(LATEST)


def test_a_sync_into_latest_during_the_run_changes_nothing_the_run_reads(
    latest: str, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = Store.from_env()
    rc, out, err = _cli(capsys, "validate", latest, "--run-id", "pinned")
    assert rc == 0, err
    validated = json.loads(out)["version"]
    pin = store.get_json(manifest_key("pinned"))["dataset"]
    assert pin["version"] == validated == content_hash(tiny_dataset)
    assert pin["uri"] == store.uri(f"datasets/pets/{validated}") == json.loads(out)["uri"]
    assert pin["source"] == latest
    assert store.marker(f"datasets/pets/{validated}") is not None  # the immutable copy

    # A sync into latest while the run goes on: a mask replaced, a sample added, one removed.
    (image, mask), (other_image, other_mask) = list_pairs(tiny_dataset, "train")[:2]
    store.upload_file(other_mask, f"{LATEST}/labels/train/{mask.name}")
    store.upload_file(other_image, f"{LATEST}/images/train/new_sample.png")
    store.upload_file(other_mask, f"{LATEST}/labels/train/new_sample.png")
    store.delete_keys([f"{LATEST}/images/test/{list_pairs(tiny_dataset, 'test')[0][0].name}"])
    _forget_local_copies()
    assert materialize_dataset(latest, store).version != validated  # latest did change

    rc, _, err = _cli(capsys, "eda", "--run-id", "pinned", "--dataset", latest)
    assert rc == 0, err
    assert store.marker(stage_prefix("pinned", "eda"))["inputs"]["dataset_version"] == validated
    ref = materialize_dataset(latest, store, run_id="pinned")
    assert (ref.version, ref.uri) == (validated, pin["uri"])
    assert (ref.root / "labels" / "train" / mask.name).read_bytes() == mask.read_bytes()
    assert not (ref.root / "images" / "train" / "new_sample.png").exists()


def test_data_changed_under_the_run_exits_2(
    latest: str, tiny_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    store = Store.from_env()
    rc, out, err = _cli(capsys, "validate", latest, "--run-id", "tampered")
    assert rc == 0, err
    pinned = json.loads(out)["uri"].removeprefix(f"s3://{store.bucket}/")
    _, mask = list_pairs(tiny_dataset, "val")[0]
    _, other = list_pairs(tiny_dataset, "val")[1]

    # 1. the worker's local copy changed after validate: its content hash no longer matches
    ref = materialize_dataset(latest, store, run_id="tampered")
    (ref.root / "labels" / "val" / mask.name).write_bytes(other.read_bytes())
    rc, _, err = _cli(capsys, "eda", "--run-id", "tampered", "--dataset", latest)
    assert rc == 2
    assert f"error: s3://{store.bucket}/{pinned}: dataset version is now " in err
    assert "the data changed under the run" in err

    # 2. an object of the pinned copy rewritten in the bucket: its sha256 is not the marker's
    _forget_local_copies()
    store.upload_file(other, f"{pinned}/labels/val/{mask.name}")
    rc, _, err = _cli(capsys, "eda", "--run-id", "tampered", "--dataset", latest)
    assert rc == 2
    assert f"labels/val/{mask.name}" in err and "changed after validate checked it" in err
    assert not store.exists(f"{stage_prefix('tampered', 'eda')}/{MARKER}")


def test_a_stage_given_another_dataset_than_validate_checked_exits_2(
    latest: str, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc, _, err = _cli(capsys, "validate", latest, "--run-id", "one-dataset")
    assert rc == 0, err
    other = shutil.copytree(tiny_dataset, tmp_path / "other")
    rc, _, err = _cli(capsys, "eda", "--run-id", "one-dataset", "--dataset", str(other))
    assert rc == 2
    assert f"--dataset {other}: run one-dataset validated {latest}" in err


def test_a_local_dataset_uploads_only_its_own_files(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue: a `.env` beside images/ landed in the bucket."""
    root = Path(shutil.copytree(tiny_dataset, tmp_path / "pets"))
    (root / ".env").write_text("AWS_SECRET_ACCESS_KEY=do-not-upload\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("relabel the dogs\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    rc, out, err = _cli(capsys, "validate", str(root), "--run-id", "upload")
    assert rc == 0, err
    store = Store.from_env()
    prefix = json.loads(out)["uri"].removeprefix(f"s3://{store.bucket}/")
    uploaded = [key.removeprefix(f"{prefix}/") for key in store.list_keys(prefix)]
    assert sorted(uploaded) == sorted([*dataset_files(root), MARKER])
    assert not [key for key in store.list_keys("") if ".env" in key or "notes/" in key or ".git" in key]
    assert json.loads(out)["version"] == content_hash(tiny_dataset)  # the version never covered them


def test_a_zero_byte_folder_object_exits_2_naming_it(latest: str, capsys: pytest.CaptureFixture) -> None:
    """What the S3 console's "Create folder" writes: `images/train/`, zero bytes."""
    store = Store.from_env()
    store.put_bytes(f"{LATEST}/images/train/", b"")
    rc, _, err = _cli(capsys, "validate", latest)
    assert rc == 2
    assert f"error: {latest}/images/train/: a folder object (key ending in '/'), not a file" in err


def test_file_names_that_are_not_utf8_exit_2_naming_them(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A complete sample named in Latin-1 (caf\\xe9), as an old camera or a Windows share writes it."""
    root = Path(shutil.copytree(tiny_dataset, tmp_path / "latin1"))
    image, mask = list_pairs(root, "train")[0]
    name = os.fsdecode(b"caf\xe9.png")
    image.rename(image.with_name(name))
    mask.rename(mask.with_name(name))
    extra = root / "labels_clean" / "train" / os.fsdecode(b"\xff\xfe.png")
    shutil.copyfile(mask.with_name(name), extra)
    rc, _, err = _cli(capsys, "validate", str(root), "--run-id", "latin1")
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "error: images/train/caf\\xe9.png: file name is not valid UTF-8" in err
    assert "error: labels/train/caf\\xe9.png: file name is not valid UTF-8" in err
    assert all("UTF-8" in line for line in lines), lines
    assert Store.from_env().list_keys("") == []  # nothing uploaded, no manifest
    # the other hashed folders are checked as well (labels_clean/ is no split folder)
    image.with_name(name).rename(image)
    mask.with_name(name).rename(mask)
    rc, _, err = _cli(capsys, "validate", str(root))
    assert rc == 2 and "error: labels_clean/train/\\xff\\xfe.png: file name is not valid UTF-8" in err


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"[" * 200_000, "JSON nested too deeply"), (b'["labels/train/caf\xe9.png"]', "not UTF-8 text")],
)
def test_bad_mask_lists_that_crashed_exit_2(
    s3_env: dict,
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    content: bytes,
    problem: str,
) -> None:
    bad = tmp_path / "bad_mask_paths.json"
    bad.write_bytes(content)
    rc, _, err = _cli(
        capsys,
        "relabel",
        "--run-id",
        "badlist",
        "--dataset",
        str(tiny_dataset),
        "--strategy",
        "morphology",
        "--bad-masks",
        str(bad),
    )
    assert rc == 2
    assert f"error: --bad-masks {bad}: {problem}" in err
    assert Store.from_env().list_keys(stage_prefix("badlist", "relabel")) == []
