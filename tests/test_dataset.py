"""tasks.dataset: every bad-input kind built on the fly, the colour policy, the version, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import cli, store
from tasks.dataset import (
    content_hash,
    dataset_versions,
    list_pairs,
    read_image,
    read_mask,
    split_version,
    validate_dataset,
)
from tasks.errors import InputError

SPLITS = ("train", "val", "test")


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the generated tiny dataset."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))


def first(root: Path, split: str = "train") -> tuple[Path, Path]:
    return list_pairs(root, split)[0]


def run_validate(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["validate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_valid_dataset_prints_counts_and_version(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_validate(capsys, str(dataset))
    assert rc == 0
    summary = json.loads(out)
    assert summary["splits"] == {
        "train": {"images": 16, "masks": 16},
        "val": {"images": 8, "masks": 8},
        "test": {"images": 8, "masks": 8},
    }
    assert summary["version"] == content_hash(dataset)
    assert len(summary["version"]) == 16
    assert summary["split_versions"] == {split: split_version(dataset, split) for split in SPLITS}
    assert len(set(summary["split_versions"].values())) == 3
    assert all(len(v) == 16 for v in summary["split_versions"].values())
    assert summary["converted"] == []


# Each case breaks the dataset in one way and returns (path relative to root, words of the message).
def corrupt_image(root: Path) -> tuple[str, str]:
    image, _ = first(root)
    image.write_bytes(b"this is not an image at all" * 10)
    return f"images/train/{image.name}", "corrupt"


def truncated_png(root: Path) -> tuple[str, str]:
    image, _ = first(root)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return f"images/train/{image.name}", "truncated"


def png_without_iend(root: Path) -> tuple[str, str]:
    # All pixel data present, only the final chunk cut off: PIL alone decodes it without complaint.
    image, _ = first(root)
    image.write_bytes(image.read_bytes()[:-12])
    return f"images/train/{image.name}", "IEND"


def truncated_jpeg(root: Path) -> tuple[str, str]:
    image, _ = first(root)
    jpeg = image.with_suffix(".jpg")
    Image.open(image).save(jpeg, quality=90)
    image.unlink()
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: int(len(data) * 0.7)])
    return f"images/train/{jpeg.name}", "truncated"


def truncated_mask(root: Path) -> tuple[str, str]:
    _, mask = first(root, "val")
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    return f"labels/val/{mask.name}", "truncated"


def image_without_mask(root: Path) -> tuple[str, str]:
    image, mask = first(root)
    mask.unlink()
    return f"images/train/{image.name}", "without mask"


def mask_without_image(root: Path) -> tuple[str, str]:
    image, mask = first(root, "test")
    image.unlink()
    return f"labels/test/{mask.name}", "without image"


def size_mismatch(root: Path) -> tuple[str, str]:
    _, mask = first(root)
    Image.fromarray(read_mask(mask)[:, :-5]).save(mask)
    return f"labels/train/{mask.name}", "differs"


def multichannel_mask(root: Path) -> tuple[str, str]:
    _, mask = first(root)
    Image.fromarray(np.repeat(read_mask(mask)[..., None], 3, axis=2)).save(mask)
    return f"labels/train/{mask.name}", "3 channels"


def bad_label_values(root: Path) -> tuple[str, str]:
    _, mask = first(root)
    values = read_mask(mask).copy()
    values[:3, :3] = 7
    Image.fromarray(values).save(mask)
    return f"labels/train/{mask.name}", "label values 7"


def empty_split(root: Path) -> tuple[str, str]:
    for path in (root / "images" / "test").iterdir():
        path.unlink()
    for path in (root / "labels" / "test").iterdir():
        path.unlink()
    return "images/test", "empty"


def missing_split(root: Path) -> tuple[str, str]:
    shutil.rmtree(root / "images" / "val")
    shutil.rmtree(root / "labels" / "val")
    return "labels/val", "missing"


def jpeg_mask(root: Path) -> tuple[str, str]:
    _, mask = first(root)
    mask.rename(mask.with_suffix(".jpg"))
    return f"labels/train/{mask.with_suffix('.jpg').name}", "unexpected file type"


def sixteen_bit_image(root: Path) -> tuple[str, str]:
    image, _ = first(root)
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(image)
    return f"images/train/{image.name}", "refused"


def partial_relabel(root: Path) -> tuple[str, str]:
    # labels_sam2/train replaces labels/train in training: a subset would silently drop samples.
    shutil.copytree(root / "labels" / "train", root / "labels_sam2" / "train")
    image, mask = first(root)
    (root / "labels_sam2" / "train" / mask.name).unlink()
    return f"images/train/{image.name}", "without mask (labels_sam2/train"


BAD_INPUTS = [
    corrupt_image,
    truncated_png,
    png_without_iend,
    truncated_jpeg,
    truncated_mask,
    image_without_mask,
    mask_without_image,
    size_mismatch,
    multichannel_mask,
    bad_label_values,
    empty_split,
    missing_split,
    jpeg_mask,
    sixteen_bit_image,
    partial_relabel,
]


@pytest.mark.parametrize("break_it", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_file(break_it, dataset: Path, capsys: pytest.CaptureFixture) -> None:
    rel, words = break_it(dataset)
    rc, out, err = run_validate(capsys, str(dataset))
    assert rc == 2, err
    assert out == ""  # no summary for a bad dataset
    lines = error_lines(err)
    assert any(line.startswith(f"error: {rel}") and words in line for line in lines), lines


def test_every_problem_is_reported(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [corrupt_image, mask_without_image, bad_label_values, missing_split]
    # corrupt_image and bad_label_values both take the first train pair: give them different ones.
    pairs = list_pairs(dataset, "train")
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(pairs[1][1])
    expected = [case(dataset) for case in cases[:2]] + [(f"labels/train/{pairs[1][1].name}", "9")]
    expected.append(missing_split(dataset))
    rc, _, err = run_validate(capsys, str(dataset))
    assert rc == 2
    lines = error_lines(err)
    for rel, words in expected:
        assert any(rel in line and words in line for line in lines), (rel, lines)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_grayscale_palette_and_alpha_images_are_converted_and_listed(
    mode: str, dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    image, _ = first(dataset)
    rgb = read_image(image)
    Image.fromarray(rgb).convert(mode).save(image)
    rc, out, _ = run_validate(capsys, str(dataset))
    assert rc == 0
    assert json.loads(out)["converted"] == [{"file": f"images/train/{image.name}", "mode": mode, "to": "RGB"}]
    loaded = read_image(image)
    assert loaded.shape == rgb.shape and loaded.dtype == np.uint8
    if mode == "RGBA":  # alpha dropped, colours untouched (what cv2's IMREAD_COLOR does)
        np.testing.assert_array_equal(loaded, rgb)
    if mode in ("L", "LA"):
        assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_readers_name_the_file(dataset: Path) -> None:
    image, mask = first(dataset)
    image.write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=image.name):
        read_image(image)
    Image.fromarray(np.zeros((8, 8, 2), np.uint8)[..., 0]).convert("LA").save(mask)
    with pytest.raises(InputError, match=f"{mask.name}: mask has 2 channels"):
        read_mask(mask)


def test_list_pairs_matches_stems_and_refuses_gaps(dataset: Path) -> None:
    pairs = list_pairs(dataset, "val")
    assert len(pairs) == 8
    assert [i.stem for i, _ in pairs] == [m.stem for _, m in pairs] == sorted(i.stem for i, _ in pairs)
    pairs[3][1].unlink()
    with pytest.raises(InputError, match=pairs[3][0].name):
        list_pairs(dataset, "val")


def test_relabeled_copy_is_validated_and_counted(dataset: Path) -> None:
    shutil.copytree(dataset / "labels" / "train", dataset / "labels_sam2" / "train")
    summary = validate_dataset(dataset)
    assert summary["splits"]["train"]["masks_sam2"] == 16
    _, mask = first(dataset)
    values = read_mask(dataset / "labels_sam2" / "train" / mask.name).copy()
    values[0, 0] = 3
    Image.fromarray(values).save(dataset / "labels_sam2" / "train" / mask.name)
    with pytest.raises(InputError, match=f"labels_sam2/train/{mask.name}: label values 3"):
        validate_dataset(dataset)


def test_version_is_content_not_location(dataset: Path, tmp_path: Path) -> None:
    version = content_hash(dataset)
    moved = Path(shutil.copytree(dataset, tmp_path / "elsewhere" / "other-name"))
    assert content_hash(moved) == version
    (moved / "README.txt").write_text("notes beside the data do not change what trains")
    assert content_hash(moved) == version
    defects = json.loads((moved / "defects.json").read_text())
    (moved / "defects.json").write_text(json.dumps(defects[:-1]))  # the given bad-mask list is an input
    assert content_hash(moved) != version
    shutil.copy(dataset / "defects.json", moved / "defects.json")
    _, mask = first(moved, "test")
    values = read_mask(mask).copy()
    values[0, 0] = 255 if values[0, 0] != 255 else 0
    Image.fromarray(values).save(mask)
    assert content_hash(moved) != version


def test_split_versions_change_only_for_the_changed_split(dataset: Path, tmp_path: Path) -> None:
    version, splits = dataset_versions(dataset)
    assert (version, splits) == (content_hash(dataset), {s: split_version(dataset, s) for s in SPLITS})

    grown = Path(shutil.copytree(dataset, tmp_path / "grown"))
    image, mask = first(grown)
    shutil.copy(image, image.with_name(f"added{image.suffix}"))  # one more train sample
    shutil.copy(mask, mask.with_name("added.png"))
    grown_version, grown_splits = dataset_versions(grown)
    assert grown_version != version and grown_splits["train"] != splits["train"]
    assert (grown_splits["val"], grown_splits["test"]) == (splits["val"], splits["test"])
    assert grown_splits["test"] == split_version(grown, "test")

    # files outside images/ and labels/ change the dataset version only
    defects = json.loads((grown / "defects.json").read_text())
    (grown / "defects.json").write_text(json.dumps(defects[:-1]))
    next((grown / "labels_clean" / "train").iterdir()).unlink()
    assert content_hash(grown) != grown_version and dataset_versions(grown)[1] == grown_splits

    _, test_mask = first(grown, "test")
    values = read_mask(test_mask).copy()
    values[0, 0] = 255 if values[0, 0] != 255 else 0
    Image.fromarray(values).save(test_mask)
    relabeled_version, relabeled_splits = dataset_versions(grown)
    assert relabeled_splits["test"] != grown_splits["test"] and relabeled_version != content_hash(dataset)
    assert (relabeled_splits["train"], relabeled_splits["val"]) == (grown_splits["train"], splits["val"])


def test_cli_refuses_params_without_run_id_and_bad_json(dataset: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_validate(capsys, str(dataset), "--params-json", '{"a": 1}')
    assert rc == 2 and "--params-json needs --run-id" in err
    rc, _, err = run_validate(capsys, str(dataset), "--run-id", "r1", "--params-json", "{not json")
    assert rc == 2 and "--params-json: not valid JSON" in err
    rc, _, err = run_validate(capsys, str(dataset / "nope"))
    assert rc == 2 and "nope: dataset directory not found" in err


def test_run_id_uploads_once_and_records_the_manifest(
    dataset: Path, s3_env: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    params = {"experiments": ["h1", "exp2"], "gate": 0.75}
    rc, out, err = run_validate(
        capsys, str(dataset), "--run-id", "run-1", "--params-json", json.dumps(params)
    )
    assert rc == 0, err
    summary = json.loads(out)
    s3 = store.Store.from_env()
    manifest = s3.get_json(store.manifest_key("run-1"))
    assert manifest["params"] == params
    assert manifest["dataset"]["version"] == summary["version"] == content_hash(dataset)
    assert manifest["dataset"]["splits"] == summary["splits"]
    assert manifest["dataset"]["split_versions"] == summary["split_versions"]
    assert manifest["started_at"]
    prefix = store.dataset_prefix("ds", summary["version"])
    assert summary["uri"] == s3.uri(prefix)
    assert s3.marker(prefix) is not None

    # The uploaded copy validates from its s3:// URI with the same version (and no run id needed).
    rc, out, err = run_validate(capsys, summary["uri"])
    assert rc == 0, err
    assert json.loads(out)["version"] == summary["version"]
    assert json.loads(out)["split_versions"] == summary["split_versions"]


def test_invalid_dataset_is_not_uploaded(
    dataset: Path, s3_env: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    rel, _ = image_without_mask(dataset)
    rc, _, err = run_validate(capsys, str(dataset), "--run-id", "run-2")
    assert rc == 2 and rel in err
    s3 = store.Store.from_env()
    assert s3.list_keys("datasets") == []
    assert not s3.exists(store.manifest_key("run-2"))
