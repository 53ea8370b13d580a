"""predict: the promoted (or a named) model segments new images exactly as evaluate does; bad images
exit 2 naming them while the others are still written; local folders and s3 prefixes both ways."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import cli, predict
from tasks import store as st
from tasks.errors import InputError

# Trainings with the learning rate at 0: one epoch of a model that learned nothing still predicts all
# three classes in varied shapes (a 1-epoch training at the CPU profile's rate predicts background
# everywhere, which any two code paths would agree on).
UNTRAINED = ["--cfg-options", "optim_wrapper.optimizer.lr=0.0"]


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((folder / "masks").glob("*.png"))}


def _evaluated_masks(run_id: str, experiment: str, dataset: Path, scratch: Path) -> dict[str, np.ndarray]:
    """The masks evaluate computes for the test split (its own function, on the published training)."""
    from tasks.evaluate import run_split
    from tasks.train import fetch_training_outputs

    trained = fetch_training_outputs(st.Store.from_env(), run_id, experiment, scratch / "train")
    _, metric, _, _ = run_split(trained.config, trained.checkpoint, dataset, "test", scratch / "runner")
    return {sample.stem: sample.pred for sample in metric.samples}


def _bad_and_odd_images(folder: Path, good: Path) -> None:
    """Next to copies of good test images: other sizes and modes that must work, and bad files."""
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8), "L").save(folder / "gray_90x70.jpeg")
    Image.fromarray(rng.integers(0, 255, (100, 40, 3), dtype=np.uint8)).convert("P").save(folder / "pal.PNG")
    (folder / "nested").mkdir()
    shutil.copy(good, folder / "nested" / "copy.png")
    data = (folder / "nested" / "copy.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.full((20, 20), 4000, dtype=np.uint16)).save(folder / "sixteen_bit.png")
    (folder / "notes.txt").write_text("not an image\n")


@pytest.mark.slow
def test_predict_gives_evaluates_masks_and_names_bad_images(
    s3_env: dict, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dataset = str(tiny_dataset)
    assert cli.main(["validate", dataset, "--run-id", "p1"]) == 0
    for experiment in ("exp2", "exp2_tta"):  # one without and one with test-time augmentation
        args = ["--experiment", experiment, "--run-id", "p1"]
        assert (
            cli.main(
                ["train", *args, "--dataset", dataset, "--profile", "cpu", "--max-epochs", "1", *UNTRAINED]
            )
            == 0
        )
        assert cli.main(["evaluate", *args, "--panels", "0"]) == 0
    assert cli.main(["select", "--run-id", "p1", "--gate", "0", "--experiments", "exp2,exp2_tta"]) == 0
    winner = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["winner"]
    other = "exp2" if winner == "exp2_tta" else "exp2_tta"
    test_images = tiny_dataset / "images" / "test"

    # the promoted model, batches of 3 (the 8 test images make batches of 3, 3, 2): evaluate's masks
    out = tmp_path / "production"
    assert cli.main(["predict", "--images", str(test_images), "--out", str(out), "--batch-size", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["model"]["experiment"] == winner and printed["written"] == 8 and printed["failed"] == {}
    predicted, evaluated = _masks(out), _evaluated_masks("p1", winner, tiny_dataset, tmp_path / "eval")
    assert predicted.keys() == evaluated.keys() and len(predicted) == 8
    for stem, mask in predicted.items():
        assert mask.dtype == np.uint8 and np.array_equal(mask, evaluated[stem]), stem
    assert len({int(v) for mask in predicted.values() for v in np.unique(mask)}) == 3  # not a trivial model
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"]["source"].startswith(f"s3://{s3_env['SEGPIPE_BUCKET']}/models/")
    assert (
        summary["model"]["checkpoint_sha256"]
        == st.Store.from_env().marker(st.stage_prefix("p1", "train", winner))["files"]["best.pth"]
    )

    # RUN_ID/EXP, from and to s3, with odd and bad inputs: exit 2 naming each bad file, the rest written
    incoming = tmp_path / "incoming"
    shutil.copytree(test_images, incoming)
    _bad_and_odd_images(incoming, next(test_images.iterdir()))
    store = st.Store.from_env()
    store.upload_dir(incoming, "incoming/batch-1")
    bucket = s3_env["SEGPIPE_BUCKET"]
    images_uri, out_uri = f"s3://{bucket}/incoming/batch-1", f"s3://{bucket}/predictions/batch-1"
    args = ["predict", "--model", f"p1/{other}", "--images", images_uri, "--out", out_uri, "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for name, why in {
        "truncated.png": "corrupt or truncated image",
        "sixteen_bit.png": "I;16 image (high bit depth) is refused",
        "notes.txt": "not an image",
    }.items():
        assert f"error: {images_uri}/{name}: {why}" in err, err
    assert err.count("error: ") == 3
    published = store.fetch("predictions/batch-1", tmp_path / "published")  # marker written, sha256-checked
    summary = json.loads((published / "predictions.json").read_text())
    assert summary["written"] == 11 and set(summary["failed"]) == {
        "truncated.png",
        "sixteen_bit.png",
        "notes.txt",
    }
    assert Image.open(published / "masks" / "gray_90x70.png").size == (90, 70)  # any size, any mode
    assert Image.open(published / "masks" / "pal.png").size == (40, 100)
    assert Image.open(published / "masks" / "nested" / "copy.png").mode == "L"
    assert Image.open(published / "overlays" / "pal.png").mode == "RGB"
    predicted, evaluated = _masks(published), _evaluated_masks("p1", other, tiny_dataset, tmp_path / "eval2")
    for stem, mask in evaluated.items():
        assert np.array_equal(predicted[stem], mask), stem

    # an s3 --out that holds anything but an earlier predict output is refused before any work
    assert (
        cli.main(
            ["predict", "--model", f"p1/{other}", "--images", images_uri, "--out", f"s3://{bucket}/runs/p1"]
        )
        == 2
    )
    assert "holds other objects" in capsys.readouterr().err


def test_model_spec_and_input_listing(tmp_path: Path) -> None:
    assert predict.parse_model_spec("production") == ("production", None)
    assert predict.parse_model_spec("run-1/h1") == ("run", "run-1/h1")
    assert predict.parse_model_spec("h1-0123456789abcdef") == ("version", "h1-0123456789abcdef")
    for bad, message in (
        ("run-1/h9", "unknown experiment 'h9'"),
        ("a/b/c", "expected production"),
        ("", "expected"),
    ):
        with pytest.raises(InputError, match=message):
            predict.parse_model_spec(bad)

    for name in ("a.png", "b.JPG", "c.jpeg", "a.jpg", "sub/d.png", "readme.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = predict.collect_images(tmp_path)
    assert sorted(found.images) == ["a.jpg", "b.JPG", "c.jpeg", "sub/d.png"]
    assert found.refused == {
        "a.png": "same output name a.png as a.jpg",
        "readme.md": "not an image (.jpg/.jpeg/.png)",
    }
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files to segment"):
        predict.collect_images(tmp_path / "empty")


def test_pipeline_without_annotations_keeps_every_view() -> None:
    pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": (256, 256)},
        {"type": "LoadAnnotations"},
        {
            "type": "TestTimeAug",
            "transforms": [
                [{"type": "RandomFlip", "prob": 0.0}],
                [{"type": "LoadAnnotations"}],
                [{"type": "PackSegInputs"}],
            ],
        },
    ]
    assert predict._without_annotations(pipeline) == [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": (256, 256)},
        {
            "type": "TestTimeAug",
            "transforms": [[{"type": "RandomFlip", "prob": 0.0}], [{"type": "PackSegInputs"}]],
        },
    ]


def test_overlay_colours_only_the_classes() -> None:
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 2], [0, 0, 1]], dtype=np.uint8)
    palette = [[0, 0, 0], [200, 0, 0], [0, 0, 200]]
    out = predict.overlay(image, mask, palette)
    assert out[0, 0].tolist() == [100, 100, 100] and out[1, 1].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [150, 50, 50] and out[0, 2].tolist() == [50, 50, 150]
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, format="PNG")
    assert buffer.tell() > 0
