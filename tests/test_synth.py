"""tasks.synth: determinism, fairness (not solvable by colour, study-like shares), injected defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks import cli, synth
from tasks.dataset import CLASSES, SPLITS, content_hash, list_pairs, read_image, read_mask, validate_dataset

SEED = 11


@pytest.fixture(scope="module")
def moderate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough for stable statistics, small enough to stay fast: 128 px, 60/20/20."""
    return synth.generate(
        tmp_path_factory.mktemp("moderate") / "ds", seed=SEED, n_train=60, n_val=20, n_test=20, size=128
    )


def load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = list_pairs(root, split)
    return np.stack([read_image(i) for i, _ in pairs]), np.stack([read_mask(m) for _, m in pairs])


def dice_per_class(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array(
        [
            2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum())
            for c in range(len(CLASSES))
        ]
    )


def test_same_seed_same_version_other_seed_other_version(tmp_path: Path) -> None:
    sizes = {"n_train": 6, "n_val": 3, "n_test": 3, "size": 64}
    first = synth.generate(tmp_path / "a", seed=3, **sizes)
    again = synth.generate(tmp_path / "b", seed=3, **sizes)
    other = synth.generate(tmp_path / "c", seed=4, **sizes)
    assert content_hash(first) == content_hash(again)
    assert content_hash(first) != content_hash(other)
    # A seed fixes each sample, whatever the other splits' sizes.
    more_train = synth.generate(tmp_path / "d", seed=3, **{**sizes, "n_train": 9})
    for split in ("val", "test"):
        assert [p.read_bytes() for p in sorted((first / "images" / split).iterdir())] == [
            p.read_bytes() for p in sorted((more_train / "images" / split).iterdir())
        ]


def test_layout_is_valid_and_study_like(moderate: Path) -> None:
    summary = validate_dataset(moderate)
    assert {s: c["images"] for s, c in summary["splits"].items()} == {"train": 60, "val": 20, "test": 20}
    assert summary["converted"] == []
    stems = [image.stem for split in SPLITS for image, _ in list_pairs(moderate, split)]
    assert len(set(stems)) == len(stems)
    assert all(
        len(s) == 17 and s[12] == "_" and s.replace("_", "").isdigit() for s in stems
    )  # 000000070714_6320
    assert json.loads((moderate / "synth.json").read_text())["seed"] == SEED


def test_class_shares_and_presence_near_the_study(moderate: Path) -> None:
    masks = np.concatenate([load(moderate, split)[1] for split in SPLITS])
    shares = np.bincount(masks.ravel(), minlength=3)[:3] / masks.size
    # Study: background 89.7-90.6%, cat 5.3-6.6%, dog 4.1-4.2%.
    assert 0.85 <= shares[0] <= 0.95, shares
    assert 0.02 <= shares[1] <= 0.09, shares
    assert 0.02 <= shares[2] <= 0.08, shares
    present = np.stack([(masks == c).any(axis=(1, 2)) for c in (1, 2)])
    assert 0.3 <= present[0].mean() <= 0.7 and 0.3 <= present[1].mean() <= 0.7, present.mean(axis=1)
    assert (present[0] & present[1]).any() and (~present[0] & ~present[1]).any()


def test_not_solvable_by_colour(moderate: Path) -> None:
    """Nearest class centroid in RGB, fit on train, scored on test: mean Dice stays below 0.6."""
    images, masks = load(moderate, "train")
    pixels, labels = images.reshape(-1, 3).astype(np.float64), masks.ravel()
    centroids = np.stack([pixels[labels == c].mean(axis=0) for c in range(len(CLASSES))])
    images, truth = load(moderate, "test")
    test_pixels = images.reshape(-1, 3).astype(np.float64)
    pred = ((test_pixels[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
    dice = dice_per_class(pred, truth.ravel())
    assert dice.mean() < 0.6, dice


def test_defects_listed_exist_and_differ_from_clean_truth(moderate: Path) -> None:
    defects = json.loads((moderate / "defects.json").read_text())
    assert len(defects) == round(60 * 23 / 200) == len(set(defects))
    assert all(d.startswith("labels/train/") and (moderate / d).is_file() for d in defects)
    for _, mask in list_pairs(moderate, "train"):
        clean = read_mask(moderate / "labels_clean" / "train" / mask.name)
        listed = f"labels/train/{mask.name}" in defects
        assert listed != np.array_equal(read_mask(mask), clean), mask.name


def test_val_and_test_masks_are_the_clean_truth(moderate: Path) -> None:
    # Re-draw every val/test sample from its seed: the written mask is exactly the clean rendering.
    jobs = synth._jobs(moderate, SEED, {"train": 60, "val": 20, "test": 20}, 128)
    checked = 0
    for job in jobs:
        split = SPLITS[job.split_index]
        if split == "train":
            continue
        clean = synth._sample(synth._rng(job), job.size, job.classes).mask
        np.testing.assert_array_equal(read_mask(moderate / "labels" / split / f"{job.stem}.png"), clean)
        checked += 1
    assert checked == 40


def test_small_train_split_still_gets_one_defect(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "ds", seed=0, n_train=2, n_val=1, n_test=1, size=64)
    assert len(json.loads((root / "defects.json").read_text())) == 1


def test_cli_regenerates_its_own_output_and_refuses_other_dirs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "synth"
    args = [
        "synth",
        "--out",
        str(out),
        "--seed",
        "5",
        "--train",
        "4",
        "--val",
        "2",
        "--test",
        "2",
        "--size",
        "64",
    ]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["version"] == content_hash(out) and first["defects"] == 1
    assert cli.main(args) == 0  # a previous synth output is replaced, same bytes
    assert json.loads(capsys.readouterr().out)["version"] == first["version"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"keep me")
    assert cli.main(["synth", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert f"error: {foreign}: not empty" in err and "holiday.jpg" in err
    assert (foreign / "holiday.jpg").read_bytes() == b"keep me"
    assert cli.main(["synth", "--out", str(tmp_path / "tiny"), "--size", "8"]) == 2
    assert "--size 8" in capsys.readouterr().err
