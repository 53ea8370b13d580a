"""Mask geometry on crafted masks whose areas, holes and shapes are known by construction."""

from __future__ import annotations

import cv2
import numpy as np

from tasks import masks


def disk(size: int = 128, centre: tuple[int, int] = (64, 64), radius: int = 30) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    cv2.circle(out, centre, radius, 1, -1)
    return out.astype(bool)


def jagged_disk(size: int = 128, radius: int = 30, amplitude: int = 4, seed: int = 0) -> np.ndarray:
    """A disk whose radius jumps by up to +-amplitude px every few degrees (a jagged annotation)."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    radii = radius + rng.integers(-amplitude, amplitude + 1, angles.size)
    pts = np.stack([size / 2 + radii * np.cos(angles), size / 2 + radii * np.sin(angles)], 1)
    out = np.zeros((size, size), np.uint8)
    cv2.fillPoly(out, [np.round(pts).astype(np.int32)], 1)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_components_areas_and_remove_small() -> None:
    binary = np.zeros((40, 40), bool)
    binary[2:12, 2:12] = True  # 100 px
    binary[20:23, 20:23] = True  # 9 px
    binary[30, 30] = binary[31, 31] = True  # diagonal neighbours: one 8-connected component of 2 px
    comp = masks.components(binary)
    assert sorted(comp.areas.tolist()) == [2, 9, 100]
    kept = masks.remove_small(binary, 10)
    assert kept.sum() == 100 and kept[2:12, 2:12].all()


def test_holes_count_and_area_ignore_edge_regions() -> None:
    binary = np.zeros((50, 50), bool)
    binary[10:40, 10:40] = True
    binary[15:20, 15:20] = False  # hole 1: 25 px
    binary[30:33, 30:34] = False  # hole 2: 12 px
    binary[0:5, 20:25] = True  # a block on the edge encloses nothing
    hole_pixels, count = masks.holes(binary)
    assert count == 2 and hole_pixels.sum() == 37
    assert masks.contours_and_holes(binary)[1] == 2  # the border-following count agrees
    open_notch = binary.copy()
    open_notch[25, 0:16] = False  # a slit from the edge into the object: not a hole
    assert masks.holes(open_notch)[1] == 2 and masks.contours_and_holes(open_notch)[1] == 2


def test_roughness_separates_clean_from_jagged_contours() -> None:
    clean = masks.contour_roughness(masks.outer_contours(disk())[0])
    jagged = masks.contour_roughness(masks.outer_contours(jagged_disk())[0])
    assert 0 < clean < 0.1  # the staircase of a digital circle only
    assert jagged > 3 * clean
    tiny_contour = masks.outer_contours(disk(radius=1))[0]
    assert np.isnan(masks.contour_roughness(tiny_contour))


def blocky_disk(size: int = 128, radius: int = 30, block: int = 8) -> np.ndarray:
    """A disk annotated on a coarse grid: a staircase outline."""
    small = cv2.resize(
        disk(size, radius=radius).astype(np.float32), (size // block, size // block), cv2.INTER_AREA
    )
    return np.kron(small > 0.5, np.ones((block, block), bool))


def repair(binary: np.ndarray) -> np.ndarray:
    return masks.repair_binary(binary, min_area=100, blocky_from=0.65, rough_from=0.35)


def test_blockiness_and_staircase_step() -> None:
    assert masks.blockiness(masks.outer_contours(disk())[0]) < 0.4
    staircase = masks.outer_contours(blocky_disk())[0]
    assert masks.blockiness(staircase) > 0.9
    assert 6 <= masks.staircase_step(staircase) <= 16  # 8 px stairs (runs count steps, ends included)


def test_straightness_tells_a_clicked_polygon_from_a_smooth_outline() -> None:
    yy, xx = np.mgrid[:256, :256]
    ellipse = (((xx - 128) / 100.0) ** 2 + ((yy - 128) / 70.0) ** 2) <= 1  # big, smooth: long fit edges
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False) + 0.2
    clicks = np.stack([128 + 100 * np.cos(angles), 128 + 70 * np.sin(angles)], 1).round().astype(np.int32)
    polygon = np.zeros((256, 256), np.uint8)
    cv2.fillPoly(polygon, [clicks], 1)  # the same object outlined with 8 clicks
    assert masks.straightness(masks.outer_contours(ellipse)[0]) < 0.4
    assert masks.straightness(masks.outer_contours(polygon.astype(bool))[0]) > 0.9


def test_repair_smooths_jagged_and_blocky_outlines() -> None:
    truth = disk()
    for damaged in (jagged_disk(), blocky_disk()):
        repaired = repair(damaged)
        assert iou(repaired, truth) > iou(damaged, truth)
        contour_after = masks.outer_contours(repaired)[0]
        contour_before = masks.outer_contours(damaged)[0]
        assert masks.contour_roughness(contour_after) < masks.contour_roughness(contour_before)
        assert masks.blockiness(contour_after) < 0.5
        assert abs(int(repaired.sum()) - int(damaged.sum())) < 0.03 * damaged.sum()  # area kept
    # A clean outline is left pixel-exact; small holes are filled, big ones (occluders) kept.
    holed = truth.copy()
    holed[60:64, 60:64] = False
    holed[40:52, 55:70] = False
    repaired = repair(holed)
    assert repaired[60:64, 60:64].all() and not repaired[40:52, 55:70].any()
    elsewhere = np.ones_like(holed)
    elsewhere[60:64, 60:64] = False
    assert np.array_equal(repaired[elsewhere], holed[elsewhere])


def test_border_slivers() -> None:
    labels = np.zeros((30, 30), np.int32)
    labels[0:2, 5:20] = 1  # strip along the top edge: sliver
    labels[0:10, 22:28] = 2  # touches the edge but reaches inside: an object cut by the frame
    labels[10:12, 10:15] = 3  # thin but not on the edge
    assert masks.border_slivers(labels, 3).tolist() == [True, False, False]


def test_drop_small_gives_speckles_their_surroundings_label() -> None:
    mask = np.zeros((60, 60), np.uint8)
    mask[10:40, 10:40] = 1  # cat
    mask[20:23, 20:23] = 2  # dog speckle inside the cat -> cat
    mask[50:52, 50:52] = 1  # cat speckle in the open -> background
    mask[5:6, 50:58] = 255  # ignore stays
    out = masks.drop_small(mask, (1, 2), 100)
    assert (out[10:40, 10:40] == 1).all()
    assert (out[50:52, 50:52] == 0).all()
    assert (out[5:6, 50:58] == 255).all()
    assert (out == 2).sum() == 0


def test_repair_label_map_keeps_classes_apart_and_ignore() -> None:
    mask = np.zeros((128, 128), np.uint8)
    mask[jagged_disk()] = 1
    mask[100:120, 5:30] = 2
    mask[0:3, 60:70] = 255
    out = masks.repair_label_map(mask, (1, 2), min_area=100, blocky_from=0.65, rough_from=0.35)
    assert set(np.unique(out).tolist()) <= {0, 1, 2, 255}
    assert (out[0:3, 60:70] == 255).all()
    assert iou(out == 1, disk()) > iou(mask == 1, disk())
    assert iou(out == 2, mask == 2) > 0.9


def test_mask_geometry_pixel_counts_and_per_class_objects() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[5:15, 5:15] = 1  # 100 px
    mask[30:32, 30:35] = 1  # 10 px, tiny
    mask[40:60, 40:60] = 2  # 400 px, with a 4 px hole
    mask[45:47, 45:47] = 0
    geom = masks.mask_geometry(mask, (1, 2), min_area=50)
    assert geom.pixel_counts[1] == 110 and geom.pixel_counts[2] == 396 and geom.pixel_counts.sum() == 64 * 64
    assert sorted(geom.classes[1].areas.tolist()) == [10, 100]
    assert geom.classes[2].hole_count == 1
    assert np.isnan(geom.classes[1].roughness[geom.classes[1].areas == 10]).all()
