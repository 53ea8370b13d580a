"""Relabel: the YOLO + SAM2 path with weightless models, morphology, the merge rule, inputs, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from clearml_session import read_session
from conftest import subprocess_env

from tasks import cli, eda, relabel
from tasks.dataset import list_pairs, read_image, read_mask
from tasks.store import Store, stage_prefix

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection attempt or name lookup off loopback fails (and is recorded)."""
    attempts: list[object] = []
    connect = socket.socket.connect
    getaddrinfo = socket.getaddrinfo

    def guarded_lookup(host: object, *args: object, **kwargs: object) -> object:
        if host not in (*LOOPBACK, None):
            attempts.append(host)
            raise OSError(f"test: name lookup of {host} blocked")
        return getaddrinfo(host, *args, **kwargs)

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOOPBACK and self.family != socket.AF_UNIX:
            attempts.append(address)
            raise OSError(f"test: network access to {address} blocked")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    return attempts


class InjectedDetector:
    """The real (untrained) YOLO runs first; where it finds nothing, the boxes of the clean truth are
    given instead, so the SAM2 part runs on real prompts."""

    def __init__(self, yolo: relabel.YoloDetector, boxes: dict[bytes, list[relabel.Detection]]):
        self.yolo, self.boxes = yolo, boxes
        self.yolo_found = 0
        self.injected = 0

    def __call__(self, image: np.ndarray) -> list[relabel.Detection]:
        found = self.yolo(image)
        self.yolo_found += len(found)
        if found:
            return found
        given = self.boxes[hashlib.sha256(image.tobytes()).digest()]
        self.injected += len(given)
        return given


def truth_boxes(clean: np.ndarray) -> list[relabel.Detection]:
    boxes = []
    for c in eda.FOREGROUND:
        ys, xs = np.nonzero(clean == c)
        if ys.size:
            boxes.append(relabel.Detection((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), c, 0.9))
    return boxes


def test_yolo_sam2_on_two_images_with_weightless_models(
    tmp_path: Path, tiny_dataset: Path, no_network: list[object]
) -> None:
    import torch

    with pytest.raises(OSError, match="blocked"):  # the guard itself works
        socket.create_connection(("example.com", 443), timeout=1)
    no_network.clear()
    torch.manual_seed(0)  # the untrained SAM2 starts from random weights: keep them the same each run
    pairs = list_pairs(tiny_dataset, "train")
    with_animals = [
        (i, m) for i, m in pairs if (read_mask(tiny_dataset / "labels_clean/train" / m.name) > 0).any()
    ]
    chosen = with_animals[:2]
    boxes = {}
    for image_path, mask_path in chosen:
        digest = hashlib.sha256(read_image(image_path).tobytes()).digest()
        boxes[digest] = truth_boxes(read_mask(tiny_dataset / "labels_clean/train" / mask_path.name))
    detector = InjectedDetector(relabel.YoloDetector("yolov8n.yaml", "cpu"), boxes)
    segmenter = relabel.Sam2Segmenter("configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu")
    repair = relabel.YoloSam2Repair(detector, segmenter, tiny_area=10)
    bad = {eda.mask_key("train", m) for _, m in chosen}

    result = relabel.relabel_train(tiny_dataset, tmp_path, bad, repair, tiny_area=10)

    assert detector.yolo_found == 0 and detector.injected == sum(len(b) for b in boxes.values()) > 0
    assert repair.detections == detector.injected
    out_dir = tmp_path / "labels_sam2" / "train"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(m.name for _, m in pairs)
    for _, mask_path in pairs:
        written = out_dir / mask_path.name
        if eda.mask_key("train", mask_path) in bad:
            new = read_mask(written)  # validates: one channel, values in {0, 1, 2, 255}
            assert new.shape == read_mask(mask_path).shape
            assert set(np.unique(new).tolist()) <= {0, 1, 2, 255}
        else:
            assert written.read_bytes() == mask_path.read_bytes()
    assert result["repaired"] == 2 and {m["mask"] for m in result["masks"]} == bad
    assert set(result["object_area_change"]["all"]) == {"cat", "dog"}
    assert no_network == []


def test_merge_rule() -> None:
    original = np.zeros((60, 60), np.uint8)
    original[5:25, 5:25] = 1  # cat A: SAM2 covers part of it with cat
    original[5:15, 40:55] = 1  # cat B: no detection: kept
    original[35:55, 5:25] = 2  # dog C: covered mostly by a new CAT mask: a conflict, its rest is dropped
    original[57:60, 30:40] = 255  # ignore, uncovered: kept
    original[40:42, 40:42] = 1  # a 4 px speckle: dropped
    new_cat_a = np.zeros_like(original, bool)
    new_cat_a[8:28, 8:28] = True
    new_cat_c = np.zeros_like(original, bool)
    new_cat_c[35:55, 5:20] = True
    out = relabel.merge_masks(original, [(new_cat_a, 1), (new_cat_c, 1)], tiny_area=10)
    assert (out[8:28, 8:28] == 1).all() and (out[5:8, 5:25] == 1).all()  # new + uncovered agreeing part
    assert (out[5:15, 40:55] == 1).all()
    assert (out[35:55, 5:20] == 1).all() and (out[35:55, 20:25] == 0).all()
    assert (out[57:60, 30:40] == 255).all()
    assert (out[40:42, 40:42] == 0).all()
    # Overlapping new masks: the most confident (painted last) wins.
    first = np.zeros_like(original, bool)
    first[0:30, 0:30] = True
    out = relabel.merge_masks(np.zeros_like(original), [(first, 2), (new_cat_a, 1)], tiny_area=10)
    assert (out[8:28, 8:28] == 1).all() and out[0, 0] == 2


def speckled_jagged_mask() -> tuple[np.ndarray, np.ndarray]:
    """A crafted mask (with its clean truth): a blocky-outlined cat, stray speckles, a small hole."""
    yy, xx = np.mgrid[:128, :128]
    truth = np.zeros((128, 128), np.uint8)
    truth[((xx - 64) / 40.0) ** 2 + ((yy - 64) / 28.0) ** 2 <= 1] = 1
    coarse = truth[::8, ::8]
    mask = np.kron(coarse, np.ones((8, 8), np.uint8))  # the cat drawn on an 8 px grid
    mask[60:63, 60:63] = 0  # a 9 px hole
    mask[5:8, 5:8] = 1  # speckles
    mask[120:122, 100:103] = 2
    return mask, truth


def test_morphology_removes_speckles_and_smooths_contours() -> None:
    mask, truth = speckled_jagged_mask()
    out = relabel.morphology_repair(mask, tiny_area=100)
    geom_before = eda.mask_signals(relabel.masks.mask_geometry(mask, eda.FOREGROUND, 100), 100)
    geom_after = eda.mask_signals(relabel.masks.mask_geometry(out, eda.FOREGROUND, 100), 100)
    assert geom_before.tiny_stray == 2 and geom_after.tiny_stray == 0
    assert geom_before.holes == 1 and geom_after.holes == 0
    assert geom_before.blocky > 0.9 and geom_after.blocky < 0.5
    iou_before = ((mask == 1) & (truth == 1)).sum() / ((mask == 1) | (truth == 1)).sum()
    iou_after = ((out == 1) & (truth == 1)).sum() / ((out == 1) | (truth == 1)).sum()
    assert iou_after > iou_before
    assert set(np.unique(out).tolist()) == {0, 1}


def run_cli(*args: str, stage: str = "relabel") -> subprocess.CompletedProcess:
    """A stage that gets as far as tracking runs in its own process, as in production: ClearML
    holds one task per process, and a task closed in this test process would skew later ones."""
    return subprocess.run(
        [sys.executable, "-m", "tasks", stage, *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_morphology_publishes_full_train_copy_and_never_touches_val_test(
    tmp_path: Path, tiny_dataset: Path, s3_env: dict[str, str]
) -> None:
    before = tree_digest(tiny_dataset)
    args = ["--run-id", "r1", "--dataset", str(tiny_dataset), "--strategy", "morphology"]
    args += ["--bad-masks", str(tiny_dataset / "defects.json"), "--tiny-area", "10"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert tree_digest(tiny_dataset) == before  # the dataset itself (val and test included) is untouched

    st = Store.from_env()
    prefix = stage_prefix("r1", "relabel")
    marker = st.marker(prefix)
    files = set(marker["files"])
    train = list_pairs(tiny_dataset, "train")
    [session] = [f for f in files if f.startswith("clearml/")]
    assert session.startswith("clearml/offline-") and session.endswith(".zip")
    assert files == {"report.json", session} | {f"labels_sam2/train/{m.name}" for _, m in train}
    report = st.get_json(f"{prefix}/report.json")
    given = json.loads((tiny_dataset / "defects.json").read_text())
    assert report["strategy"] == "morphology" and report["strategy_requested"] == "morphology"
    assert "cannot restore missing objects" in report["limits"]
    assert report["bad_masks"]["given"]["masks"] == sorted(given)
    assert set(given) <= set(report["bad_masks"]["union"])
    assert report["bad_masks"]["scored"]["source"].startswith("computed")  # no EDA published for r1
    assert {m["mask"] for m in report["masks"]} == set(report["bad_masks"]["union"])
    assert set(report["object_area_change"]["bad"]) == {"cat", "dog"}
    for _, mask_path in train:
        body = st.get_bytes(f"{prefix}/labels_sam2/train/{mask_path.name}")
        if eda.mask_key("train", mask_path) not in report["bad_masks"]["union"]:
            assert body == mask_path.read_bytes()
    assert not any("val" in f or "test" in f for f in files)

    # The published ClearML session: task `relabel`, the strategy used, the counts, area changes.
    session_zip = tmp_path / "session.zip"
    session_zip.write_bytes(st.get_bytes(f"{prefix}/{session}"))
    events, task = read_session(session_zip)
    assert task["name"] == "relabel"
    params = task["hyperparams"]["params"]
    assert params["strategy"]["value"] == "morphology" and params["tiny_area"]["value"] == "10"
    assert params["bad_masks/union"]["value"] == str(len(report["bad_masks"]["union"]))
    scalars = {
        (e["metric"], e["variant"]): e["value"] for e in events if e["type"] == "training_stats_scalar"
    }
    assert scalars[("masks", "relabeled")] == report["repaired"] == len(report["bad_masks"]["union"])
    assert scalars[("masks", "changed")] == report["changed"]
    cat = report["object_area_change"]["bad"]["cat"]["all"]
    assert scalars[("median object area px (bad masks)", "cat (all) before")] == cat["median_before"]
    if cat["median_change_pct"] is not None:
        assert scalars[("median object area change % (bad masks)", "cat (all)")] == cat["median_change_pct"]
    previews = [e for e in events if e["type"] == "training_debug_image"]
    assert 0 < len(previews) <= 4 and report["changed"] > 0
    with zipfile.ZipFile(session_zip) as zf:
        assert any(n.startswith("data/") and n.endswith("report.json") for n in zf.namelist())

    second = run_cli(*args)
    assert second.returncode == 0 and "cached" in second.stderr
    assert "ClearML" not in second.stderr  # a cached stage opens no task
    assert st.marker(prefix) == marker


def test_uses_published_eda_scores_and_auto_falls_back_without_weights(
    tiny_dataset: Path, s3_env: dict[str, str]
) -> None:
    scored = run_cli("--run-id", "r2", "--dataset", str(tiny_dataset), stage="eda")
    assert scored.returncode == 0, scored.stderr[-3000:]
    args = ["--run-id", "r2", "--dataset", str(tiny_dataset), "--strategy", "auto", "--score-threshold", "0"]
    relabeled = run_cli(*args)
    assert relabeled.returncode == 0, relabeled.stderr[-3000:]
    st = Store.from_env()
    report = st.get_json(f"{stage_prefix('r2', 'relabel')}/report.json")
    assert report["strategy"] == "morphology" and report["strategy_requested"] == "auto"
    assert "yolov8x.pt" in report["strategy_reason"]
    assert report["bad_masks"]["scored"]["source"] == st.uri(f"{stage_prefix('r2', 'eda')}/report.json")
    # Threshold 0 flags every train mask: all are repaired, none copied.
    assert len(report["bad_masks"]["scored"]["masks"]) == len(list_pairs(tiny_dataset, "train"))
    assert report["repaired"] == len(list_pairs(tiny_dataset, "train"))


def test_bad_mask_list_naming_missing_files_exits_2(
    tmp_path: Path, tiny_dataset: Path, s3_env: dict[str, str]
) -> None:
    listing = tmp_path / "bad_mask_paths.json"
    existing = json.loads((tiny_dataset / "defects.json").read_text())[0]
    listing.write_text(
        json.dumps([existing, "labels/train/nope_1.png", "/content/data/labels/train/nope_2.png"])
    )
    result = run_cli(
        "--run-id",
        "r3",
        "--dataset",
        str(tiny_dataset),
        "--strategy",
        "morphology",
        "--bad-masks",
        str(listing),
    )
    assert result.returncode == 2
    assert "labels/train/nope_1.png" in result.stderr and "nope_2.png" in result.stderr
    assert existing not in result.stderr
    listing.write_text(json.dumps(["labels/val/x.png"]))
    code = cli.main(
        ["relabel", "--run-id", "r3", "--dataset", str(tiny_dataset), "--bad-masks", str(listing)]
    )
    assert code == 2


def test_missing_weights_name_the_file_and_where_to_put_it(
    tiny_dataset: Path, s3_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["relabel", "--run-id", "r4", "--dataset", str(tiny_dataset), "--strategy", "yolo_sam2"])
    assert code == 2
    err = capsys.readouterr().err
    bucket = s3_env["SEGPIPE_BUCKET"]
    assert f"s3://{bucket}/weights/yolov8x.pt" in err and "--yolo-weights" in err
    assert f"s3://{bucket}/weights/sam2.1_hiera_large.pt" in err and "--sam2-checkpoint" in err
    code = cli.main(
        ["relabel", "--run-id", "r4", "--dataset", str(tiny_dataset), "--strategy", "yolo_sam2",
         "--yolo-weights", "/nonexistent/yolov8x.pt", "--sam2-config", "configs/nope.yaml"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "/nonexistent/yolov8x.pt" in err and "configs/nope.yaml" in err
    assert not Store.from_env().exists(f"{stage_prefix('r4', 'relabel')}/_SUCCESS")


def test_ultralytics_is_kept_offline() -> None:
    relabel.prepare_ultralytics_offline()
    from ultralytics import settings
    from ultralytics.utils.checks import check_font

    assert settings["sync"] is False and os.environ["YOLO_OFFLINE"] == "1"
    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    assert font.read_bytes()[:4] == b"\x00\x01\x00\x00"  # a TrueType font
    assert Path(check_font("Arial.ttf")) == font  # what ultralytics' plotting would otherwise download


def test_ultralytics_leaves_pil_image_open_alone(tmp_path: Path) -> None:
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_bytes(b"not an image")
    code = f"""
from PIL import Image, UnidentifiedImageError
pil_open = Image.open
from tasks import relabel
relabel.prepare_ultralytics_offline()
from ultralytics import YOLO  # the rest of what the relabel stage imports
assert Image.open is pil_open, Image.open
try:
    Image.open({str(not_an_image)!r})
except UnidentifiedImageError:
    print("refused by PIL")
"""
    # a fresh interpreter: this one may have imported ultralytics already
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "refused by PIL" in result.stdout, result.stderr[-3000:]
