"""No sample is dropped silently: what validate counts is what training and evaluation load.

The issue's measurement: a dataset whose images mix .jpg, .jpeg, .png and upper-case suffixes
(masks .png and .PNG) validated 24 train and 10 test images while mmseg's dataset loaded 15 and 6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tasks.dataset import SPLITS, list_pairs, validate_dataset
from tasks.store import Store, stage_prefix
from tasks.synth import generate

# image suffix per position in a split (cycled): a real user's mix of JPEG spellings and cases
IMAGE_SUFFIXES_SEEN = (".jpg", ".jpeg", ".png", ".JPG", ".jpeg", ".PNG", ".jpg", ".JPEG")


def mixed_suffix_dataset(out: Path, upper_masks: bool = True) -> Path:
    """24/4/10 generated samples rewritten with the suffix mix above; every third mask .PNG if asked."""
    root = generate(out, seed=3, n_train=24, n_val=4, n_test=10, size=32)
    for split in SPLITS:
        for index, (image, mask) in enumerate(list_pairs(root, split)):
            suffix = IMAGE_SUFFIXES_SEEN[index % len(IMAGE_SUFFIXES_SEEN)]
            if suffix.lower() in (".jpg", ".jpeg"):
                Image.open(image).convert("RGB").save(image.with_suffix(suffix), format="JPEG", quality=95)
                image.unlink()
            else:
                image.rename(image.with_suffix(suffix))
            if upper_masks and index % 3 == 2:
                mask.rename(mask.with_suffix(".PNG"))
    return root


def _loaded(root: Path, split: str) -> list[tuple[Path, Path]]:
    """The (image, mask) files mmseg's dataset of the experiment configs loads for a split."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    from tasks.train import load_experiment_config

    init_default_scope("mmseg")
    cfg = load_experiment_config("h1", "full", dataset_root=root)
    dataset = DATASETS.build(cfg[f"{split}_dataloader"].dataset)
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    return [(Path(info["img_path"]), Path(info["seg_map_path"])) for info in infos]


def test_every_validated_sample_is_loaded_for_training_and_evaluation(tmp_path: Path) -> None:
    root = mixed_suffix_dataset(tmp_path / "mixed")
    summary = validate_dataset(root)
    assert summary["splits"]["train"]["images"] == 24 and summary["splits"]["test"]["images"] == 10
    for split in SPLITS:
        loaded = _loaded(root, split)
        assert len(loaded) == summary["splits"][split]["images"], split
        assert loaded == list_pairs(root, split)
    suffixes = {image.suffix for image, _ in _loaded(root, "train")}
    assert suffixes == set(IMAGE_SUFFIXES_SEEN)


@pytest.mark.parametrize("split", ["train", "test"])
def test_loaded_counts_match_the_issue_measurement(tmp_path: Path, split: str) -> None:
    """24 train / 10 test validated: all of them loaded (the old dataset class loaded 15 and 6)."""
    root = mixed_suffix_dataset(tmp_path / "mixed", upper_masks=False)
    validated = validate_dataset(root)["splits"][split]["images"]
    assert (split, len(_loaded(root, split))) == (split, validated)


# ---------------------------------------------------------------- mixed image sizes

# (width, height) per position in a split (cycled): square, landscape, portrait, larger and smaller
# than the crop, odd sizes
MIXED_SIZES = ((64, 64), (96, 56), (45, 70), (150, 150), (33, 47))


def mixed_size_dataset(out: Path, n_train: int = 10, n_val: int = 5, n_test: int = 5) -> Path:
    """A generated dataset whose samples are resized to MIXED_SIZES (masks by nearest neighbour)."""
    root = generate(out, seed=5, n_train=n_train, n_val=n_val, n_test=n_test, size=64)
    for split in SPLITS:
        for index, (image, mask) in enumerate(list_pairs(root, split)):
            size = MIXED_SIZES[index % len(MIXED_SIZES)]
            Image.open(image).resize(size, Image.Resampling.BILINEAR).save(image)
            Image.open(mask).resize(size, Image.Resampling.NEAREST).save(mask)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["h1", "h2", "exp1", "exp2"])
def test_mixed_image_sizes_train_and_evaluate(s3_env: dict, tmp_path: Path, experiment: str) -> None:
    from tasks.evaluate import evaluate_experiment
    from tasks.train import train_experiment

    root = mixed_size_dataset(tmp_path / "sizes")
    counts = validate_dataset(root)["splits"]
    trained = train_experiment(
        experiment, "sizes", str(root), "cpu", max_epochs=1, cfg_options={"train_cfg.val_interval": 1}
    )
    assert trained["status"] == "trained" and trained["best_epoch"] == 1
    # validation ran in training (val batches of mixed sizes); evaluation on test as the DAG runs it
    evaluated = evaluate_experiment(experiment, "sizes", ["test"], str(root), n_panels=1)
    assert evaluated["status"] == "evaluated"
    prefix = stage_prefix("sizes", "eval", experiment)
    metrics = Store.from_env().get_json(f"{prefix}/test_metrics.json")
    per_image = Store.from_env().get_json(f"{prefix}/test_per_image.json")
    # every image, each at its own size (IoUMetric compares prediction and mask pixel by pixel)
    assert metrics["samples"] == counts["test"]["images"] == len(per_image)
    assert sorted(per_image) == [image.stem for image, _ in list_pairs(root, "test")]
    assert 0 <= metrics["mDice"] <= 100


@pytest.mark.slow
def test_a_dataset_class_that_drops_samples_stops_training_and_evaluation(
    s3_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old drift put back (the mmseg dataset skipping .jpeg): exit 2 naming the samples, nothing
    published, before any epoch or any metric."""
    from tasks.errors import InputError
    from tasks.evaluate import evaluate_experiment
    from tasks.mmseg_setup import StudyDataset
    from tasks.train import train_experiment

    root = mixed_suffix_dataset(tmp_path / "mixed", upper_masks=False)
    jpeg = [image for image, _ in list_pairs(root, "test") if image.suffix.lower() == ".jpeg"]
    train_experiment("h1", "drift", str(root), "cpu", max_epochs=1, cfg_options={"train_cfg.val_interval": 1})
    store = Store.from_env()
    before = store.list_keys("runs")

    real = StudyDataset.load_data_list
    monkeypatch.setattr(
        StudyDataset,
        "load_data_list",
        lambda self: [info for info in real(self) if not info["img_path"].lower().endswith(".jpeg")],
    )
    with pytest.raises(InputError) as caught:
        evaluate_experiment("h1", "drift", ["test"], str(root))
    assert caught.value.problems[0].startswith(f"evaluation: 6 test samples loaded, 10 validated in {root}")
    assert caught.value.problems[1:] == [
        f"images/test/{image.name}: validated but not loaded by evaluation (test split)" for image in jpeg
    ]
    with pytest.raises(InputError, match=r"training: 15 train samples loaded, 24 validated"):
        train_experiment("h2", "drift", str(root), "cpu", max_epochs=1)
    assert store.list_keys("runs") == before  # neither evaluation nor the second training published
