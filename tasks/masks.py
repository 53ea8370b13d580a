"""Mask geometry shared by EDA (which measures masks) and relabel (which repairs them).

Conventions: objects are 8-connected and background/holes 4-connected (the consistent pair of digital
topology, so a diagonal gap never both separates two objects and lets a hole leak out). Contours are
OpenCV's traced boundary pixel centres; "smoothing" is a circular Gaussian over the contour's points.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

# Gaussian sigma (in contour points, ~1 px each) of the reference smooth contour: wide enough to erase
# jags of a few pixels, narrow enough to keep ears, paws and tails of a 256x256 object.
CONTOUR_SIGMA = 3.0
# A staircase is a run of at least this many steps along one pixel axis: a smooth outline of radius R
# runs straight only near its 4 extremes (~sqrt(2R) px), a blocky one (drawn on a coarse grid, or a
# low-resolution mask upscaled) almost everywhere.
BLOCK_RUN = 5
# A hasty polygon (a few clicks) is made of long straight edges. Its polygon fit (POLY_TOLERANCE px)
# finds them as edges of STRAIGHT_EDGE px or more along which the outline stays on the chord; the fit
# of a smooth curve has long edges too (~2*sqrt(2*R*tolerance) px), but the curve bulges off them.
POLY_TOLERANCE = 2.5
STRAIGHT_EDGE = 12
MAX_BULGE = 0.35
# An object is a border sliver when it touches the image edge and no pixel of it is farther than this
# from the edge: a strip along the frame, not an object cut by it.
BORDER_BAND = 3


@dataclass(frozen=True)
class Components:
    labels: np.ndarray  # int32 HxW: 0 outside objects, k for the k-th component
    areas: np.ndarray  # int64 (n,): area of component k at index k-1


@dataclass(frozen=True)
class ClassGeometry:
    """Geometry of one class in one mask; per-object arrays are aligned with component labels 1..n."""

    areas: np.ndarray  # int64 (n,) object areas in px
    roughness: np.ndarray  # float64 (n,) contour length / smoothed contour length - 1; NaN when not measured
    blockiness: np.ndarray  # float64 (n,) share of the contour in axis-parallel runs; NaN when not measured
    straightness: np.ndarray  # float64 (n,) share of the contour on long straight edges; NaN idem
    isolation: (
        np.ndarray
    )  # float64 (n,) px to the nearest measured object of the class (0 for those, inf if none)
    border_sliver: np.ndarray  # bool (n,)
    hole_count: int  # regions the objects enclose


@dataclass(frozen=True)
class MaskGeometry:
    shape: tuple[int, int]
    pixel_counts: np.ndarray  # int64 (256,): pixels per label value
    classes: dict[int, ClassGeometry]  # foreground class id -> geometry


def components(binary: np.ndarray) -> Components:
    """8-connected components of a boolean/0-1 image."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return Components(labels=labels, areas=stats[1:, cv2.CC_STAT_AREA].astype(np.int64))


def remove_small(binary: np.ndarray, min_area: int) -> np.ndarray:
    """Boolean image without the components smaller than min_area."""
    comp = components(binary)
    keep = np.concatenate([[False], comp.areas >= min_area])
    return keep[comp.labels]


def holes(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """Pixels outside the object that it encloses (4-connected regions of the rest not reaching the
    image edge) as a boolean image, and how many such regions there are."""
    n, labels = cv2.connectedComponents((~binary.astype(bool)).astype(np.uint8), connectivity=4)
    enclosed = np.ones(n, bool)
    enclosed[0] = False  # label 0 is the object itself
    enclosed[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    return enclosed[labels], int(enclosed.sum())


def outer_contours(binary: np.ndarray) -> list[np.ndarray]:
    """Outer boundary of every 8-connected component as an (N, 2) int array of (x, y) pixel centres."""
    return contours_and_holes(binary)[0]


def contours_and_holes(binary: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Outer boundaries of all components (islands inside holes included) and the number of holes,
    from one border-following pass (Suzuki: 8-connected objects, 4-connected holes, as `holes`)."""
    found, hierarchy = cv2.findContours(binary.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not found:
        return [], 0
    is_hole = hierarchy[0][:, 3] >= 0  # a parent means an inner (hole) border
    return [c.reshape(-1, 2) for c, hole in zip(found, is_hole, strict=True) if not hole], int(is_hole.sum())


def smooth_contour(points: np.ndarray, sigma: float = CONTOUR_SIGMA) -> np.ndarray:
    """A closed contour low-pass filtered along its length (float (N, 2))."""
    return ndimage.gaussian_filter1d(points.astype(np.float64), sigma, axis=0, mode="wrap")


def closed_length(points: np.ndarray) -> float:
    return float(np.hypot(*(np.roll(points, -1, axis=0) - points).T).sum())


def contour_roughness(points: np.ndarray, sigma: float = CONTOUR_SIGMA) -> float:
    """Relative excess length of a contour over its smoothed self: ~0.05 for a clean pixel outline
    (staircase), growing with jags. NaN for contours too short to smooth meaningfully."""
    if len(points) < 6 * sigma:
        return float("nan")
    smooth_len = closed_length(smooth_contour(points, sigma))
    return closed_length(points) / smooth_len - 1.0 if smooth_len > 0 else float("nan")


def axis_runs(points: np.ndarray) -> np.ndarray:
    """Lengths (in steps) of the straight horizontal and vertical runs of a closed contour."""
    steps = np.roll(points, -1, axis=0) - points
    runs = []
    for along in (steps[:, 1] == 0, steps[:, 0] == 0):  # horizontal steps, vertical steps
        if along.all():
            return np.array([len(points)])
        # Rotate so the sequence starts outside a run, then measure runs from their edges.
        seq = np.roll(along, -int(np.argmin(along))).astype(np.int8)
        edges = np.diff(np.concatenate([[0], seq, [0]]))
        runs.append(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    return np.concatenate(runs)


def blockiness(points: np.ndarray, min_run: int = BLOCK_RUN) -> float:
    """Share of a closed contour's steps that lie in straight axis-parallel runs of >= min_run steps."""
    runs = axis_runs(points)
    return float(runs[runs >= min_run].sum() / len(points))


def straightness(
    points: np.ndarray,
    tolerance: float = POLY_TOLERANCE,
    min_edge: float = STRAIGHT_EDGE,
    max_bulge: float = MAX_BULGE,
) -> float:
    """Share of a closed contour's polygon-fit length on straight edges: edges of at least min_edge px
    along which the contour does not bend (the sagitta of a parabola fitted to it, in the edge's frame,
    is at most max_bulge px). A smooth arc cut into chords bends by about its chord's sagitta, a
    clicked edge not at all; the fitted parabola ignores where exactly the fit put the vertices."""
    polygon = cv2.approxPolyDP(points.reshape(-1, 1, 2).astype(np.int32), tolerance, True).reshape(-1, 2)
    if len(polygon) < 3:
        return float("nan")
    # The fit's vertices are contour points: find their positions along the contour.
    width = int(points[:, 0].max()) + 2
    keys = points[:, 1].astype(np.int64) * width + points[:, 0]
    order = np.argsort(keys, kind="stable")
    vertex = np.unique(
        order[np.searchsorted(keys[order], polygon[:, 1].astype(np.int64) * width + polygon[:, 0])]
    )
    pts = np.roll(points, -vertex[0], axis=0).astype(np.float64)
    vertex = vertex - vertex[0]
    edge = np.searchsorted(vertex, np.arange(len(pts)), side="right") - 1  # the edge each point is on
    start, end = pts[vertex], pts[np.append(vertex[1:], 0)]
    chord = end - start
    length = np.maximum(np.hypot(*chord.T), 1e-9)
    rel = pts - start[edge]
    along = 2 * (rel[:, 0] * chord[edge, 0] + rel[:, 1] * chord[edge, 1]) / length[edge] ** 2 - 1  # -1..1
    across = (rel[:, 0] * chord[edge, 1] - rel[:, 1] * chord[edge, 0]) / length[edge]
    # Least squares across = a + b*t + c*t^2 for every edge at once (normal equations from sums).
    t = [along**k for k in range(5)]
    s = [np.add.reduceat(tk, vertex) for tk in t]
    r = [np.add.reduceat(across * t[k], vertex) for k in range(3)]
    normal = np.stack([np.stack(s[i : i + 3], -1) for i in range(3)], -2) + 1e-9 * np.eye(3)
    sagitta = np.abs(np.linalg.solve(normal, np.stack(r, -1)[..., None])[:, 2, 0])
    straight = (length >= min_edge) & (sagitta <= max_bulge)
    return float(length[straight].sum() / length.sum())


def staircase_step(points: np.ndarray, min_run: int = BLOCK_RUN) -> float:
    """Typical stair length of a blocky contour (median of its long runs; 0 when it has none)."""
    runs = axis_runs(points)
    long = runs[runs >= min_run]
    return float(np.median(long)) if long.size else 0.0


def isolation(comp: Components, measured: np.ndarray) -> np.ndarray:
    """Per component: distance in px to the nearest `measured` component (0 for those; inf if none)."""
    out = np.zeros(len(comp.areas))
    if measured.all():
        return out
    if not measured.any():
        out[~measured] = np.inf
        return out
    big = np.concatenate([[False], measured])[comp.labels]
    dist = cv2.distanceTransform((~big).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    small = np.flatnonzero(~measured)
    # The closest pixel of each small component: a minimum per label in one vectorised pass.
    nearest = np.full(len(comp.areas) + 1, np.inf)
    np.minimum.at(nearest, comp.labels[comp.labels > 0], dist[comp.labels > 0])
    out[small] = nearest[small + 1]
    return out


def fill_contours(shape: tuple[int, int], contours: list[np.ndarray]) -> np.ndarray:
    """Boolean image of the filled (float, sub-pixel) contours; each is filled on its own so overlaps add."""
    out = np.zeros(shape, np.uint8)
    shift = 4  # fillPoly's fixed-point bits: keeps the smoothed contour's sub-pixel position
    for contour in contours:
        pts = np.round(contour * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(out, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return out.astype(bool)


def repair_binary(binary: np.ndarray, min_area: int, blocky_from: float, rough_from: float) -> np.ndarray:
    """Repair one class without a model: holes under min_area px are filled (larger ones can be real:
    an occluder in front of the animal), and every object whose outline is a staircase (blockiness >=
    blocky_from) or jagged (roughness >= rough_from) is redrawn from its smoothed contour. A staircase
    is smoothed over its own stair length (sigma = step: the stairs' period is two steps, which such a
    Gaussian all but erases); a jagged outline at CONTOUR_SIGMA. Clean outlines are left pixel-exact."""
    binary = binary.astype(bool)
    hole_pixels, _ = holes(binary)
    small_holes = hole_pixels & ~remove_small(hole_pixels, min_area)
    out = binary | small_holes
    comp = components(binary)
    for contour in outer_contours(binary):
        if blockiness(contour) >= blocky_from:
            sigma = max(CONTOUR_SIGMA, staircase_step(contour))
        elif contour_roughness(contour) >= rough_from:
            sigma = CONTOUR_SIGMA
        else:
            continue
        if len(contour) < 6 * sigma:
            continue
        k = comp.labels[contour[0, 1], contour[0, 0]]
        smoothed = fill_contours(binary.shape, [smooth_contour(contour, sigma)])
        out[comp.labels == k] = False
        out |= grow_to_area(smoothed, int(comp.areas[k - 1]))
    return out & ~(hole_pixels & ~small_holes)


def grow_to_area(binary: np.ndarray, area: int) -> np.ndarray:
    """binary grown outwards, nearest pixels first, to the pixel count closest to `area`. Gaussian
    smoothing pulls a contour inwards where it is convex (by ~sigma^2 / 2R); this gives the object back
    the area the annotator drew, which a staircase does not bias."""
    deficit = area - int(binary.sum())
    if deficit <= 0 or binary.all():
        return binary
    dist = cv2.distanceTransform((~binary).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = np.sort(dist[~binary])
    cut = outside[min(deficit, outside.size) - 1]
    # Pixels at equal distance come as a whole ring: take it, or not, whichever lands closer to area.
    below, upto = np.searchsorted(outside, cut, "left"), np.searchsorted(outside, cut, "right")
    return binary | ((dist < cut) if deficit - below < upto - deficit else (dist <= cut))


def border_slivers(labels: np.ndarray, n: int, band: int = BORDER_BAND) -> np.ndarray:
    """Per component 1..n: touches the image edge and lies wholly within `band` px of it."""
    edge = np.zeros(n + 1, bool)
    edge[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    edge[0] = False
    if not edge.any():  # the common case: nothing touches the frame
        return edge[1:]
    inner = np.bincount(labels[band:-band, band:-band].ravel(), minlength=n + 1) > 0
    return (edge & ~inner)[1:]


def class_geometry(binary: np.ndarray, min_area: int) -> ClassGeometry:
    """Objects, holes, contour shape, isolation and border slivers of one class (binary image).
    Contours are measured for objects of at least min_area px; smaller ones get their isolation."""
    binary = binary.astype(bool)
    comp = components(binary)
    n = len(comp.areas)
    measured = comp.areas >= min_area
    roughness, blocky, straight = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    outer, hole_count = contours_and_holes(binary)
    for contour in outer:
        k = comp.labels[contour[0, 1], contour[0, 0]]
        if measured[k - 1]:
            roughness[k - 1] = contour_roughness(contour)
            blocky[k - 1] = blockiness(contour)
            straight[k - 1] = straightness(contour)
    return ClassGeometry(
        areas=comp.areas,
        roughness=roughness,
        blockiness=blocky,
        straightness=straight,
        isolation=isolation(comp, measured),
        border_sliver=border_slivers(comp.labels, n),
        hole_count=hole_count,
    )


def mask_geometry(mask: np.ndarray, classes: tuple[int, ...], min_area: int) -> MaskGeometry:
    """Everything EDA and the scorer need from one label map, in one pass per class."""
    return MaskGeometry(
        shape=mask.shape,
        pixel_counts=np.bincount(mask.ravel(), minlength=256).astype(np.int64),
        classes={c: class_geometry(mask == c, min_area) for c in classes},
    )


# ---------------------------------------------------------------- label maps (several classes)


def drop_small(mask: np.ndarray, classes: tuple[int, ...], min_area: int) -> np.ndarray:
    """Components of `classes` under min_area px take the most common label on their outer 1-px ring
    (background for a speckle in the open, the enclosing class for one inside another object)."""
    out = mask.copy()
    kernel = np.ones((3, 3), np.uint8)
    for c in classes:
        comp = components(mask == c)
        for k in np.flatnonzero(comp.areas < min_area) + 1:
            ys, xs = np.nonzero(comp.labels == k)
            y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, mask.shape[0])
            x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, mask.shape[1])
            blob = (comp.labels[y0:y1, x0:x1] == k).astype(np.uint8)
            ring = cv2.dilate(blob, kernel).astype(bool) & ~blob.astype(bool)
            around = mask[y0:y1, x0:x1][ring]
            around = around[around != c]
            out[y0:y1, x0:x1][blob.astype(bool)] = np.bincount(around).argmax() if around.size else 0
    return out


def repair_label_map(
    mask: np.ndarray, classes: tuple[int, ...], min_area: int, blocky_from: float, rough_from: float
) -> np.ndarray:
    """Every class of `classes` repaired with repair_binary. Where repaired classes overlap, a pixel
    keeps its original class if that is one of them, else the lowest class id; pixels no repaired class
    covers become background, except ignore pixels, which stay as they were."""
    repaired = {c: repair_binary(mask == c, min_area, blocky_from, rough_from) for c in classes}
    fg = np.isin(mask, classes)
    out = np.where(fg, 0, mask).astype(mask.dtype)
    for c in reversed(classes):  # reversed: the lowest id is painted last and wins a disputed pixel
        out[repaired[c]] = c
    for c in classes:  # ...unless the original label is among the claimants
        out[repaired[c] & (mask == c)] = c
    return out
