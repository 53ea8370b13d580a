"""EDA statistics on crafted masks with known areas, the suspicious-mask scorer, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from clearml_session import read_session
from conftest import subprocess_env
from PIL import Image

from tasks import eda
from tasks.store import Store, stage_prefix

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(root: Path, split_masks: dict[str, dict[str, np.ndarray]]) -> Path:
    """A dataset in the study's layout: a grey image beside every given mask."""
    for split, named in split_masks.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, mask in named.items():
            Image.fromarray(np.full((*mask.shape, 3), 128, np.uint8)).save(
                root / "images" / split / f"{stem}.png"
            )
            Image.fromarray(mask).save(root / "labels" / split / f"{stem}.png")
    return root


def crafted_masks() -> dict[str, dict[str, np.ndarray]]:
    a = np.zeros((100, 100), np.uint8)
    a[10:30, 10:30] = 1  # cat 400 px
    a[50:52, 50:55] = 1  # cat 10 px (tiny)
    a[60:90, 60:90] = 2  # dog 900 px
    b = np.zeros((100, 100), np.uint8)
    b[0:20, 0:10] = 1  # cat 200 px
    b[95:100, 0:100] = 255  # 500 px ignore
    c = np.zeros((100, 100), np.uint8)  # background only
    v = np.zeros((100, 100), np.uint8)
    v[40:60, 40:60] = 2  # dog 400 px
    return {"train": {"a": a, "b": b, "c": c}, "val": {"v": v}, "test": {"t": v.copy()}}


def test_split_statistics_match_known_areas(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", crafted_masks())
    report = eda.run_eda(root, tmp_path / "out", tiny_area=100)
    train = report["splits"]["train"]
    assert train["images"] == 3
    labelled = 3 * 100 * 100 - 500
    assert train["pixel_share"]["cat"] == pytest.approx(610 / labelled)
    assert train["pixel_share"]["dog"] == pytest.approx(900 / labelled)
    assert train["pixel_share"]["background"] == pytest.approx((labelled - 1510) / labelled)
    assert train["ignore_share"] == pytest.approx(500 / 30000)
    assert train["image_share"] == {
        "background": 1.0,
        "cat": pytest.approx(2 / 3),
        "dog": pytest.approx(1 / 3),
    }
    cat = train["object_areas"]["cat"]
    assert cat["count"] == 3 and cat["min"] == 10 and cat["max"] == 400 and cat["median"] == 200
    assert cat["p25"] == pytest.approx(np.percentile([10, 200, 400], 25))
    assert cat["std"] == pytest.approx(np.std([10, 200, 400]))
    assert train["object_areas"]["dog"]["count"] == 1 and train["object_areas"]["dog"]["median"] == 900
    assert train["tiny_components"] == {
        "threshold_px": 100,
        "per_class": {"cat": 1, "dog": 0},
        "masks_with_tiny": 1,
    }
    assert report["splits"]["val"]["object_areas"]["dog"]["median"] == 400
    assert report["splits"]["val"]["object_areas"]["cat"]["count"] == 0
    # Only train masks are scored; the mask with the tiny component comes first.
    assert [r["mask"] for r in report["suspicious"]][0] == "labels/train/a.png"
    assert {r["mask"] for r in report["suspicious"]} == {f"labels/train/{s}.png" for s in "abc"}
    for name in report["plots"]:
        with Image.open(tmp_path / "out" / name) as plot:
            assert plot.width > 100 and plot.height > 100
    assert json.loads((tmp_path / "out" / "report.json").read_text())["splits"]["train"]["images"] == 3


def test_tiny_area_is_configurable(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", crafted_masks())
    report = eda.run_eda(root, tmp_path / "out", tiny_area=5)
    assert report["splits"]["train"]["tiny_components"]["per_class"] == {"cat": 0, "dog": 0}


def blob(size: int = 256) -> np.ndarray:
    """A clean, smooth object (ellipse) of ~5000 px."""
    yy, xx = np.mgrid[:size, :size]
    return (((xx - 128) / 50.0) ** 2 + ((yy - 128) / 32.0) ** 2) <= 1


def test_scorer_ranks_each_defect_kind_above_clean_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clean: dict[str, np.ndarray] = {}
    for i in range(12):  # clean, smooth masks of slightly varying position
        m = np.zeros((256, 256), np.uint8)
        m[np.roll(blob(), int(rng.integers(-20, 20)), axis=1)] = 1 + i % 2
        clean[f"clean{i:02d}"] = m
    speckled = clean["clean00"].copy()
    speckled[10:14, 10:14] = speckled[240:243, 200:204] = 1  # two stray speckles far from the cat
    grid = cv2.resize(clean["clean01"], (256 // 12, 256 // 12), interpolation=cv2.INTER_NEAREST)
    blocky = cv2.resize(grid, (256, 256), interpolation=cv2.INTER_NEAREST)  # coarse-grid annotation
    jagged = clean["clean02"].copy()
    edge = jagged.astype(bool) & ~np.roll(jagged.astype(bool), 1, axis=0)
    for y, x in zip(*np.nonzero(edge), strict=True):  # 1-px teeth along the upper outline
        if x % 4 < 2:
            jagged[max(y - 6, 0) : y, x] = jagged[y, x]
    holed = clean["clean03"].copy()
    holed[125:131, 120:130] = 0
    sliver = clean["clean04"].copy()
    sliver[0:2, 100:180] = 1
    shrunk = np.zeros((256, 256), np.uint8)
    shrunk[120:135, 120:135] = 1  # a partial object: far below the class's typical area
    defects = {"speckled": speckled, "blocky": blocky, "jagged": jagged, "holed": holed, "sliver": sliver}
    root = write_dataset(tmp_path / "ds", {"train": {**clean, **defects, "shrunk": shrunk}})
    scored = {r["mask"].split("/")[-1][:-4]: r for r in eda.score_dataset(root, tiny_area=100)}
    worst_clean = max(r["score"] for name, r in scored.items() if name.startswith("clean"))
    assert worst_clean < eda.SCORE_THRESHOLD
    for name in [*defects, "shrunk"]:
        assert scored[name]["score"] > worst_clean, (name, scored[name])
    for name in ("speckled", "blocky", "shrunk"):  # one strong signal alone flags a mask
        assert scored[name]["score"] >= eda.SCORE_THRESHOLD, (name, scored[name])
    assert scored["speckled"]["signals"]["tiny_stray"] == 2
    assert scored["blocky"]["evidence"]["blocky"] == 1.0
    assert scored["jagged"]["evidence"]["rough"] > 0
    assert scored["holed"]["signals"]["holes"] == 1
    assert scored["sliver"]["signals"]["border"] == 1
    assert scored["shrunk"]["evidence"]["area"] == 1.0


def test_cli_publishes_report_and_is_cached(
    tmp_path: Path, tiny_dataset: Path, s3_env: dict[str, str]
) -> None:
    cmd = [sys.executable, "-m", "tasks", "eda", "--run-id", "r1", "--dataset", str(tiny_dataset)]
    first = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    st = Store.from_env()
    prefix = stage_prefix("r1", "eda")
    marker = st.marker(prefix)
    [session] = [f for f in marker["files"] if f.startswith("clearml/")]
    assert set(marker["files"]) == {
        "report.json",
        "class_shares.png",
        "object_areas.png",
        "suspicious_masks.png",
        session,
    }
    assert session.startswith("clearml/offline-") and session.endswith(".zip")
    report = st.get_json(f"{prefix}/report.json")
    assert report["splits"]["train"]["images"] == 16 and report["dataset"]["version"]
    scores = [r["score"] for r in report["suspicious"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 16

    # The published ClearML session: task `eda`, its params, the statistics, the plots, report.json.
    session_zip = tmp_path / "session.zip"
    session_zip.write_bytes(st.get_bytes(f"{prefix}/{session}"))
    events, task = read_session(session_zip)
    assert task["name"] == "eda"
    params = task["hyperparams"]["params"]
    assert params["dataset_version"]["value"] == report["dataset"]["version"]
    assert params["scorer/tiny_area"]["value"] == "100"
    scalars = {
        (e["metric"], e["variant"]): e["value"] for e in events if e["type"] == "training_stats_scalar"
    }
    for cls in eda.CLASSES:
        share = report["splits"]["train"]["pixel_share"][cls]
        assert scalars[("train pixel share", cls)] == pytest.approx(share)
    cat_areas = report["splits"]["val"]["object_areas"]["cat"]
    assert scalars[("val cat object area (px)", "median")] == pytest.approx(cat_areas["median"])
    assert scalars[("suspicious train masks", "flagged")] == report["flagged"]
    images = [e for e in events if e["type"] == "training_debug_image"]
    assert sorted(e["variant"] for e in images) == ["class_shares", "object_areas", "suspicious_masks"]
    with zipfile.ZipFile(session_zip) as zf:
        stored = [name for name in zf.namelist() if name.startswith("data/")]
    assert any(name.endswith("report.json") for name in stored)
    assert sum(name.endswith(".png") for name in stored) == 3

    second = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "cached" in second.stderr
    assert "ClearML" not in second.stderr  # a cached stage opens no task
    assert st.marker(prefix) == marker


def test_cli_rejects_bad_tiny_area(s3_env: dict[str, str], tiny_dataset: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tasks",
        "eda",
        "--run-id",
        "r1",
        "--dataset",
        str(tiny_dataset),
        "--tiny-area",
        "0",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tiny-area" in result.stderr
