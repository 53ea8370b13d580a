"""A generated stand-in for the study's data, in the study's layout, deterministic per seed.

Every image is drawn from numpy Generators seeded with (seed, split, index), so one seed gives the same
bytes (and the same content hash) whatever the other splits' sizes, and PNG keeps pixels lossless.

What makes it a fair stand-in (see STUDY.md):
- cats and dogs are animal silhouettes (body, head, ears, legs, paws, tail); cats are slim with pointed
  ears, a long curling tail and thin legs, dogs bulky with floppy ears, a muzzle and a short thick tail;
- the classes are told apart by shape and texture (cats striped, dogs spotted or patchy, at random
  orientation and frequency, a few pixels per period at 128 px), never by colour: animals, background
  and distractors draw their colours from one distribution, so a per-pixel colour classifier fails;
- backgrounds are cluttered: gradients, smooth and fine noise, and non-animal distractor shapes
  (a few carry stripes or spots), sometimes in front of the animals;
- class pixel shares (background ~90%, cat ~5%, dog ~4.5%), presence (each class in about half the
  images, both in about a quarter, neither in about a quarter) and object areas (visible median
  ~4500-5300 px at 256x256, study 5928/4854; scaled with size) follow the study;
- ~11.5% of train masks (23 of 200) carry annotation defects of the study's kinds: jagged contours that
  lose ears/paws/tail, a missing object or part, speckles under 100 px. The clean truth is written to
  labels_clean/train/, the list to defects.json. Val and test masks are clean.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.dataset import SPLITS, content_hash
from tasks.errors import InputError

log = logging.getLogger(__name__)

BACKGROUND, CAT, DOG = 0, 1, 2
REF_SIZE = 256  # sizes, areas and texture periods below are given at 256x256 and scaled with size
MIN_SIZE = 32
DEFECT_RATE = 23 / 200  # the study tagged 23 of its 200 train masks
SPECKLE_MAX_AREA = 100  # the study's "annotation noise" threshold
PRESENCE = 0.5  # each class in about half the images
SECOND_INSTANCE = 0.15
# Drawn areas; visible ones come out smaller (frame, occlusion): study medians cat 5928, dog 4854 px.
MEDIAN_AREA = {CAT: 6300.0, DOG: 5400.0}  # px at 256x256
AREA_SIGMA = 0.45  # lognormal spread of object areas
AREA_RANGE = (700.0, 17000.0)  # px at 256x256 (study max ~17k)
PER_WORKER_PX = 100 * 256 * 256  # a process pool pays off from ~100 full-size images per worker
MARKER = "synth.json"  # provenance; also marks a directory synth may regenerate
OWNED = ("images", "labels", "labels_clean", "defects.json", MARKER)


# ---------------------------------------------------------------- small drawing kit


def _colour(rng: np.random.Generator) -> np.ndarray:
    """One colour from the distribution shared by animals, background and distractors."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.0, 0.65), rng.uniform(0.15, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], np.float32))


def _colour_pair(rng: np.random.Generator, min_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Two colours whose brightness differs enough that a texture between them is visible."""
    first, second = _colour(rng), _colour(rng)
    while abs(_luma(first) - _luma(second)) < min_contrast:
        second = _colour(rng)
    return first, second


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights: upsampling as two small matrix products."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    low = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = (pos - low).astype(np.float32)
    matrix = np.zeros((n_out, n_in), np.float32)
    matrix[np.arange(n_out), low] = 1 - frac
    matrix[np.arange(n_out), low + 1] = frac
    return matrix


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int = 1
) -> np.ndarray:
    """(H, W, channels) noise of unit-ish amplitude with features about H/cells pixels wide."""
    n = cells + 1
    grid = rng.standard_normal((n, n, channels)).astype(np.float32)
    rows, cols = _interp_matrix(shape[0], n), _interp_matrix(shape[1], n)
    tall = (rows @ grid.reshape(n, n * channels)).reshape(shape[0], n, channels)  # (H, n, c)
    return (tall.transpose(0, 2, 1) @ cols.T).transpose(0, 2, 1)  # (H, c, n) @ (n, W) -> (H, W, c)


def _ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, a: float, b: float, rot: float = 0.0
) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    du, dv = u - cu, v - cv
    x, y = (c * du + s * dv) / a, (-s * du + c * dv) / b
    return x * x + y * y <= 1


def _capsule(u: np.ndarray, v: np.ndarray, p: tuple, q: tuple, r: float) -> np.ndarray:
    """Points within r of the segment p-q (a limb, a tail segment, a stick)."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) / max(du * du + dv * dv, 1e-9), 0, 1)
    eu, ev = u - p[0] - t * du, v - p[1] - t * dv
    return eu * eu + ev * ev <= r * r


def _polygon(u: np.ndarray, v: np.ndarray, points: list[tuple]) -> np.ndarray:
    """Inside a convex polygon given counter- or clockwise."""
    inside_pos = np.ones(u.shape, bool)
    inside_neg = np.ones(u.shape, bool)
    for (pu, pv), (qu, qv) in zip(points, points[1:] + points[:1], strict=True):
        cross = (qu - pu) * (v - pv) - (qv - pv) * (u - pu)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


@dataclass(frozen=True)
class Part:
    """One primitive of a silhouette in body units, with a bounding circle (to draw it only there)."""

    group: str  # body, head, ears, legs, tail: what a "missing part" defect removes
    shape: Callable[..., np.ndarray]
    args: tuple
    center: tuple[float, float]
    radius: float

    def inside(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.shape(u, v, *self.args)


def _ellipse_part(group: str, cu: float, cv: float, a: float, b: float, rot: float = 0.0) -> Part:
    return Part(group, _ellipse, (cu, cv, a, b, rot), (cu, cv), max(a, b))


def _capsule_part(group: str, p: tuple, q: tuple, r: float) -> Part:
    center = ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2)
    return Part(group, _capsule, (p, q, r), center, math.dist(p, q) / 2 + r)


def _polygon_part(group: str, points: list[tuple]) -> Part:
    center = (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))
    return Part(group, _polygon, (points,), center, max(math.dist(center, p) for p in points))


# ---------------------------------------------------------------- animals


@dataclass
class _Design:
    """An animal in its own frame: facing +u, v pointing down, body half-length 1."""

    parts: list[Part]
    dots: list[tuple[float, float, float]]  # eyes (and a dog's nose): (u, v, radius), drawn dark


def _legs(rng: np.random.Generator, body_w: float, radius: float, length: tuple, paw: float) -> list[Part]:
    parts: list[Part] = []
    swing = rng.uniform(0.1, 0.45)  # walking stride: the legs of a pair swing opposite ways
    for i, attach_u in enumerate((-0.72, -0.5, 0.45, 0.68)):
        angle = swing * (1 if i % 2 else -1) + rng.normal(0, 0.1)
        top = (attach_u + rng.normal(0, 0.03), body_w * 0.45)
        leg_len = rng.uniform(*length)
        foot = (top[0] + leg_len * math.sin(angle), top[1] + leg_len * math.cos(angle))
        parts.append(_capsule_part("legs", top, foot, radius))
        parts.append(_ellipse_part("legs", foot[0] + radius * 0.6, foot[1], radius * paw, radius * 1.1))
    return parts


def _tail(
    rng: np.random.Generator, start: tuple, length: float, radius: float, segments: int, curl: float
) -> list[Part]:
    """A tapering polyline leaving the rump backwards and up, bending by about `curl` per segment."""
    heading = math.pi + rng.uniform(0.3, 1.1)  # backwards (-u) and up (-v)
    bend = rng.uniform(-curl, curl)
    points = [start]
    for _ in range(segments):
        heading += bend + rng.normal(0, curl * 0.3)
        u0, v0 = points[-1]
        step = length / segments
        points.append((u0 + step * math.cos(heading), v0 - step * abs(math.sin(heading))))
    return [
        _capsule_part("tail", p, q, radius * (1 - 0.35 * i / segments))
        for i, (p, q) in enumerate(zip(points, points[1:], strict=False))
    ]


def _cat(rng: np.random.Generator) -> _Design:
    body_w = rng.uniform(0.30, 0.38)
    head_r = rng.uniform(0.29, 0.35)
    hu, hv = 1.0 + rng.uniform(-0.05, 0.1), -body_w - rng.uniform(0.05, 0.2)
    parts: list[Part] = [
        _ellipse_part("body", 0, 0, 1.0, body_w),
        _capsule_part("head", (0.72, -0.05), (hu, hv), 0.17),  # neck
        _ellipse_part("head", hu, hv, head_r * 1.05, head_r),
        _ellipse_part("head", hu + head_r * 0.85, hv + head_r * 0.25, head_r * 0.35, head_r * 0.28),
    ]
    for lo, hi in ((-2.35, -1.75), (-1.45, -0.85)):  # pointed ears: triangles on top of the head
        lo, hi = lo + rng.normal(0, 0.08), hi + rng.normal(0, 0.08)
        tip, mid = head_r * rng.uniform(1.7, 2.0), (lo + hi) / 2
        corners = [(hu + head_r * 0.9 * math.cos(a), hv + head_r * 0.9 * math.sin(a)) for a in (lo, hi)]
        corners.append((hu + tip * math.cos(mid), hv + tip * math.sin(mid)))
        parts.append(_polygon_part("ears", corners))
    parts += _legs(rng, body_w, rng.uniform(0.06, 0.075), (0.75, 0.95), paw=1.5)
    parts += _tail(rng, (-0.93, -0.2 * body_w), rng.uniform(1.2, 1.6), rng.uniform(0.055, 0.07), 8, 0.3)
    return _Design(parts, dots=[(hu + head_r * 0.4, hv - head_r * 0.15, head_r * 0.14)])


def _dog(rng: np.random.Generator) -> _Design:
    body_w = rng.uniform(0.42, 0.52)
    head_r = rng.uniform(0.32, 0.38)
    hu, hv = 1.05, -body_w - rng.uniform(0.0, 0.15)
    muzzle = head_r * rng.uniform(0.6, 0.8)
    parts: list[Part] = [
        _ellipse_part("body", 0, 0, 1.0, body_w),
        _capsule_part("head", (0.7, -0.1), (hu, hv), 0.25),  # neck
        _ellipse_part("head", hu, hv, head_r, head_r * 0.95),
        _ellipse_part("head", hu + head_r, hv + head_r * 0.25, muzzle, head_r * 0.42),
    ]
    for shift, size in ((-0.35, 1.0), (0.1, 0.85)):  # floppy ears hanging below the head line
        eu, ev = hu + head_r * shift, hv + head_r * rng.uniform(0.4, 0.6)
        tilt, length = rng.uniform(-0.45, 0.1), head_r * rng.uniform(0.7, 0.9) * size
        parts.append(_ellipse_part("ears", eu, ev, head_r * 0.3, length, tilt))
    parts += _legs(rng, body_w, rng.uniform(0.10, 0.13), (0.6, 0.8), paw=1.35)
    parts += _tail(rng, (-0.95, -0.3 * body_w), rng.uniform(0.45, 0.7), rng.uniform(0.07, 0.09), 3, 0.15)
    eye = (hu + head_r * 0.35, hv - head_r * 0.3, head_r * 0.13)
    nose = (hu + head_r + muzzle * 0.9, hv + head_r * 0.1, head_r * 0.16)
    return _Design(parts, dots=[eye, nose])


SPECIES: dict[int, Callable[[np.random.Generator], _Design]] = {CAT: _cat, DOG: _dog}


def _unit_area_and_reach(parts: list[Part]) -> tuple[float, float]:
    """Silhouette area (body units^2) and its farthest point from the origin, on a coarse grid."""
    step = 0.05
    axis = np.arange(-3.0, 3.0, step, dtype=np.float32) + step / 2
    u, v = np.meshgrid(axis, axis)
    inside = np.logical_or.reduce([part.inside(u, v) for part in parts])
    reach = float(np.sqrt(u[inside] ** 2 + v[inside] ** 2).max()) + step
    return float(inside.sum()) * step * step, reach


def _stripes(rng: np.random.Generator, lu: np.ndarray, lv: np.ndarray, k: float) -> np.ndarray:
    """Tabby stripes across the body: a sharpened, slightly wavy sine in the animal's frame."""
    phi = rng.normal(0, 0.35)
    period = rng.uniform(11, 17) * k
    along = lu * math.cos(phi) + lv * math.sin(phi)
    across = -lu * math.sin(phi) + lv * math.cos(phi)
    wave = rng.uniform(0, 0.3) * period * np.sin(2 * np.pi * across / (rng.uniform(3, 6) * period))
    duty = rng.uniform(-0.3, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    return np.clip(0.5 + 2.0 * (np.sin(2 * np.pi * (along + wave) / period + phase) - duty), 0, 1)


def _spots(rng: np.random.Generator, lu: np.ndarray, lv: np.ndarray, k: float) -> np.ndarray:
    """Round spots on a jittered grid in the animal's frame (each spot stays inside its cell)."""
    cell = rng.uniform(15, 22) * k
    iu, iv = np.floor(lu / cell).astype(int), np.floor(lv / cell).astype(int)
    iu -= iu.min()
    iv -= iv.min()
    shape = (iu.max() + 1, iv.max() + 1)
    radius = rng.uniform(0.28, 0.42, shape) * cell * (rng.random(shape) > 0.1)
    slack = np.maximum(cell / 2 - radius - 0.5, 0)
    jitter = rng.uniform(-1, 1, (2, *shape)) * slack
    cu = (np.floor(lu / cell) + 0.5) * cell + jitter[0][iu, iv]
    cv = (np.floor(lv / cell) + 0.5) * cell + jitter[1][iu, iv]
    dist = np.sqrt((lu - cu) ** 2 + (lv - cv) ** 2)
    return np.clip(radius[iu, iv] - dist + 0.5, 0, 1)


def _patches(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Large irregular patches (a piebald coat), a few per body length."""
    cells = max(2, round(shape[0] / (0.5 * scale)))
    return np.clip(0.5 + 6.0 * _smooth_noise(rng, shape, cells)[..., 0], 0, 1)


@dataclass
class _Animal:
    cls: int
    box: tuple[slice, slice]  # where the local arrays sit in the image
    groups: dict[str, np.ndarray]  # part group -> bool silhouette part inside the box
    scale: float  # pixels per body unit


def _draw_animal(
    rng: np.random.Generator, image: np.ndarray, ids: np.ndarray, index: int, cls: int, k: float
) -> _Animal | None:
    """Paint one animal into image and its index into ids; None when no placement fits."""
    size = image.shape[0]
    design = SPECIES[cls](rng)
    unit_area, reach = _unit_area_and_reach(design.parts)
    low, high = (a * k * k for a in AREA_RANGE)
    area = float(np.clip(MEDIAN_AREA[cls] * k * k * math.exp(rng.normal(0, AREA_SIGMA)), low, high))
    scale = math.sqrt(area / unit_area)
    half = math.ceil(reach * scale) + 1
    rot = rng.normal(0, 0.3) if rng.random() > 0.1 else rng.uniform(-math.pi, math.pi)
    flip = -1.0 if rng.random() < 0.5 else 1.0  # facing left or right
    cos_r, sin_r = math.cos(rot), math.sin(rot)
    for _attempt in range(6):
        cx, cy = rng.uniform(0.08, 0.92, 2) * size
        y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
        x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xs - cx, ys - cy
        lu, lv = flip * (cos_r * dx + sin_r * dy), -sin_r * dx + cos_r * dy  # pixels, animal frame
        u, v = lu / scale, lv / scale
        groups = {part.group: np.zeros(u.shape, bool) for part in design.parts}
        for part in design.parts:
            # Only the window of the part's bounding circle: a tail segment is a few px, the box is large.
            pu, pv = flip * part.center[0] * scale, part.center[1] * scale
            px, py = cx + cos_r * pu - sin_r * pv - x0, cy + sin_r * pu + cos_r * pv - y0
            reach_px = part.radius * scale + 2
            rows = slice(max(0, int(py - reach_px)), max(0, int(py + reach_px) + 2))
            cols = slice(max(0, int(px - reach_px)), max(0, int(px + reach_px) + 2))
            groups[part.group][rows, cols] |= part.inside(u[rows, cols], v[rows, cols])
        mask = np.logical_or.reduce(list(groups.values()))
        box = (slice(y0, y1), slice(x0, x1))
        drawn = int(mask.sum())
        # Mostly inside the frame (the border may cut it) and not hidden behind earlier animals.
        if drawn >= 0.55 * area and (ids[box][mask] > 0).sum() <= 0.25 * drawn:
            break
    else:
        return None

    base, second = _colour_pair(rng, min_contrast=75)
    if cls == CAT:
        texture = _stripes(rng, lu, lv, k)
    else:
        texture = _spots(rng, lu, lv, k) if rng.random() < 0.85 else _patches(rng, lu.shape, scale)
    fur = base + (second - base) * texture[..., None]
    light = 0.12 * rng.choice([-1.0, 1.0]) * lv / (reach * scale)
    fur *= (1 + light + 0.05 * _smooth_noise(rng, lu.shape, 3)[..., 0])[..., None]
    dark = rng.uniform(10, 45)
    for du, dv, r in design.dots:
        fur[_ellipse(u, v, du, dv, r, r)] = dark
    image[box][mask] = fur[mask]
    ids[box][mask] = index
    return _Animal(cls=cls, box=box, groups=groups, scale=scale)


# ---------------------------------------------------------------- background and clutter


def _background(rng: np.random.Generator, size: int, k: float) -> np.ndarray:
    """Gradient + smooth blotches + fine grain: (size, size, 3) float32."""
    first, second = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) + 0.5
    image = first + (second - first) * t[..., None]
    image += rng.uniform(15, 45) * _smooth_noise(rng, (size, size), int(rng.integers(3, 8)), 3)
    grain_cells = max(4, round(size / (rng.uniform(5, 12) * k)))
    image += rng.uniform(3, 10) * _smooth_noise(rng, (size, size), grain_cells, 1)
    return image


def _shape(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, radius: float) -> np.ndarray:
    """A non-animal shape centred at 0: ellipse, box, triangle, polygon, ring, stick or blob."""
    kind = rng.integers(7)
    rot = rng.uniform(0, np.pi)
    if kind == 0:
        return _ellipse(xs, ys, 0, 0, radius, radius * rng.uniform(0.3, 1.0), rot)
    if kind in (1, 2, 3):
        corners = {1: 4, 2: 3, 3: int(rng.integers(5, 8))}[int(kind)]
        angles = rot + np.arange(corners) * 2 * np.pi / corners
        stretch = rng.uniform(0.4, 1.0) if kind == 1 else 1.0
        return _polygon(xs, ys, [(radius * math.cos(a), radius * stretch * math.sin(a)) for a in angles])
    if kind == 4:
        outer = _ellipse(xs, ys, 0, 0, radius, radius)
        return outer & ~_ellipse(xs, ys, 0, 0, radius * rng.uniform(0.4, 0.8), radius * rng.uniform(0.4, 0.8))
    if kind == 5:
        end = (radius * math.cos(rot), radius * math.sin(rot))
        return _capsule(xs, ys, (-end[0], -end[1]), end, radius * rng.uniform(0.05, 0.2))
    blob = np.zeros(xs.shape, bool)
    for cu, cv in rng.uniform(-0.5, 0.5, (3, 2)) * radius:
        r = radius * rng.uniform(0.3, 0.6)
        blob |= _ellipse(xs, ys, cu, cv, r, r)
    return blob


def _draw_distractor(rng: np.random.Generator, image: np.ndarray, k: float, max_radius: float) -> np.ndarray:
    """Paint one textured non-animal shape; returns its mask over the whole image."""
    size = image.shape[0]
    radius = rng.uniform(0.04, max_radius) * size
    cx, cy = rng.uniform(0, size, 2)
    half = math.ceil(radius) + 1
    y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xs -= cx
    ys -= cy
    mask = _shape(rng, xs, ys, radius)
    full = np.zeros((size, size), bool)
    if not mask.any():
        return full
    first, second = _colour_pair(rng, min_contrast=30)
    style = rng.random()
    if style < 0.45:  # flat
        t = np.zeros(xs.shape, np.float32)
    elif style < 0.65:  # mottled
        t = np.clip(0.5 + _smooth_noise(rng, xs.shape, int(rng.integers(2, 6)))[..., 0], 0, 1)
    elif style < 0.8:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (math.cos(angle) * xs + math.sin(angle) * ys) / (2 * radius), 0, 1)
    elif style < 0.92:  # checkerboard: regular texture that is neither stripes nor spots
        cell = rng.uniform(5, 12) * k
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    elif style < 0.96:  # hard negatives: animal textures on shapes that are not animals
        t = _stripes(rng, xs, ys, k)
    else:
        t = _spots(rng, xs, ys, k)
    paint = first + (second - first) * t[..., None]
    image[y0:y1, x0:x1][mask] = paint[mask]
    full[y0:y1, x0:x1] = mask
    return full


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Soften edges a little (lens blur), light the scene unevenly, add sensor noise; uint8."""
    kernel = np.float32([0.25, 0.5, 0.25])
    image = cv2.sepFilter2D(image, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    size = image.shape[0]
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.15) * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])
    image *= light[..., None]
    image += rng.uniform(2, 7) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- one sample


@dataclass
class _Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8 clean truth
    ids: np.ndarray  # (H, W) int16 visible animal index + 1, 0 elsewhere
    animals: list[_Animal]


def _scene_classes(rng: np.random.Generator) -> tuple[int, ...]:
    """The animals of one image, in drawing (z-) order: each class in about half the images."""
    classes = [c for c in (CAT, DOG) if rng.random() < PRESENCE]
    classes += [c for c in classes if rng.random() < SECOND_INSTANCE]
    rng.shuffle(classes)
    return tuple(classes)


def _sample(rng: np.random.Generator, size: int, classes: tuple[int, ...]) -> _Sample:
    k = size / REF_SIZE
    image = _background(rng, size, k)
    for _ in range(int(rng.integers(3, 9))):
        _draw_distractor(rng, image, k, max_radius=0.22)
    ids = np.zeros((size, size), np.int16)
    animals: list[_Animal] = []
    for cls in classes:
        animal = _draw_animal(rng, image, ids, len(animals) + 1, cls, k)
        if animal is not None:
            animals.append(animal)
    if animals and rng.random() < 0.2:  # something in front: grass, a stick, a toy
        ids[_draw_distractor(rng, image, k, max_radius=0.09)] = 0
    lookup = np.array([BACKGROUND] + [a.cls for a in animals], np.uint8)
    return _Sample(image=_finish(rng, image), mask=lookup[ids], ids=ids, animals=animals)


# ---------------------------------------------------------------- annotation defects


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _jagged(rng: np.random.Generator, mask: np.ndarray, sample: _Sample, index: int) -> None:
    """A hasty polygon annotation: a few shaky straight edges that cut off ears, paws and tail."""
    animal = sample.animals[index]
    visible = sample.ids == index + 1
    radius = max(1, round(animal.scale * 0.16))  # wider than legs and tails, narrower than the body
    rough = cv2.morphologyEx(visible.astype(np.uint8), cv2.MORPH_OPEN, _disk(radius))
    contours, _ = cv2.findContours(
        rough if rough.any() else visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    hasty = np.zeros(mask.shape, np.uint8)
    for contour in contours:
        polygon = cv2.approxPolyDP(contour, rng.uniform(0.05, 0.1) * animal.scale, closed=True)
        shake = np.rint(rng.normal(0, 0.04 * animal.scale, polygon.shape)).astype(np.int32)
        cv2.fillPoly(hasty, [polygon + shake], 1)
    drawn = hasty.astype(bool)
    mask[visible & ~drawn] = BACKGROUND
    mask[drawn & (mask == BACKGROUND) & (sample.ids == 0)] = animal.cls


def _missing_object(rng: np.random.Generator, mask: np.ndarray, sample: _Sample, index: int) -> None:
    mask[sample.ids == index + 1] = BACKGROUND


def _missing_part(rng: np.random.Generator, mask: np.ndarray, sample: _Sample, index: int) -> None:
    """The annotator skipped the head, the legs or the tail (what sticks out of the body)."""
    animal = sample.animals[index]
    group = ("head", "legs", "tail")[int(rng.integers(3))]
    part = np.zeros(mask.shape, bool)
    part[animal.box] = animal.groups[group] & ~animal.groups["body"]
    mask[part & (sample.ids == index + 1)] = BACKGROUND


def _speckles(rng: np.random.Generator, mask: np.ndarray, k: float) -> None:
    """A few stray blobs of a random class, each well under SPECKLE_MAX_AREA px."""
    size = mask.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(2, 7))):
        radius = rng.uniform(min(1.5, 5.0 * k), max(1.5, 5.0 * k))
        cx, cy = rng.uniform(0, size, 2)
        blob = _ellipse(xs, ys, cx, cy, radius, radius * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi))
        if 0 < blob.sum() < SPECKLE_MAX_AREA:
            mask[blob] = rng.choice([CAT, DOG])


DEFECTS = {"jagged": _jagged, "missing_object": _missing_object, "missing_part": _missing_part}


def _with_defects(rng: np.random.Generator, sample: _Sample, size: int) -> tuple[np.ndarray, list[str]]:
    """A corrupted copy of the clean mask and the kinds of defect injected."""
    mask = sample.mask.copy()
    kinds: list[str] = []
    visible = [i for i in range(len(sample.animals)) if (sample.ids == i + 1).any()]
    if visible and rng.random() < 0.8:
        kind = str(rng.choice(list(DEFECTS), p=[0.5, 0.25, 0.25]))
        DEFECTS[kind](rng, mask, sample, int(rng.choice(visible)))
        kinds.append(kind)
    if not kinds or rng.random() < 0.3:
        _speckles(rng, mask, size / REF_SIZE)
        kinds.append("speckles")
    while np.array_equal(mask, sample.mask):  # e.g. speckles that landed on their own class
        _speckles(rng, mask, size / REF_SIZE)
    return mask, kinds


# ---------------------------------------------------------------- the dataset


def _stems(seed: int, split_index: int, count: int, taken: set[str]) -> list[str]:
    """COCO-like stems (12-digit image id, 4-digit suffix), unique in the dataset."""
    rng = np.random.default_rng([seed, split_index])
    stems = []
    for image_id, suffix in zip(
        rng.integers(1, 581930, count), rng.integers(1000, 10000, count), strict=True
    ):
        while (stem := f"{int(image_id):012d}_{int(suffix)}") in taken:
            suffix = 1000 + (suffix - 999) % 9000  # next 4-digit suffix, wrapping 9999 -> 1000
        taken.add(stem)
        stems.append(stem)
    return stems


@dataclass(frozen=True)
class _Job:
    root: Path
    seed: int
    split_index: int
    index: int
    stem: str
    size: int
    classes: tuple[int, ...]
    defective: bool


# Photos with sensor noise barely compress: Huffman-only with the SUB filter encodes ~4x faster than
# zlib's default and is no bigger. Masks are flat regions: they keep LZ77 matching. Both lossless.
PNG_PHOTO = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
PNG_PHOTO += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
PNG_MASK = [cv2.IMWRITE_PNG_COMPRESSION, 3]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    photo = pixels.ndim == 3
    bgr = pixels[..., ::-1] if photo else pixels
    ok, data = cv2.imencode(".png", bgr, PNG_PHOTO if photo else PNG_MASK)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(data.tobytes())


def _rng(job: _Job) -> np.random.Generator:
    return np.random.default_rng([job.seed, job.split_index, job.index])  # independent of other samples


def _render(job: _Job) -> str | None:
    """Draw and write one sample; returns its mask path (relative) when a defect was injected."""
    split = SPLITS[job.split_index]
    rng = _rng(job)
    sample = _sample(rng, job.size, job.classes)
    name = f"{job.stem}.png"
    _write_png(job.root / "images" / split / name, sample.image)
    mask = sample.mask
    if split == "train":
        _write_png(job.root / "labels_clean" / split / name, sample.mask)
        if job.defective:
            mask, kinds = _with_defects(rng, sample, job.size)
            log.debug("%s: injected %s", name, ", ".join(kinds))
    _write_png(job.root / "labels" / split / name, mask)
    return f"labels/{split}/{name}" if mask is not sample.mask else None


def _prepare(out_dir: Path) -> Path:
    """A fresh staging dir beside out_dir; refuses an out_dir that holds anything but a synth dataset."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f"{out_dir}: exists and is not a directory")
        entries = {p.name for p in out_dir.iterdir()}
        if entries and (MARKER not in entries or entries - set(OWNED)):
            extra = ", ".join(sorted(entries - set(OWNED))) or f"no {MARKER}"
            raise InputError(
                f"{out_dir}: not empty and not a previous synth dataset ({extra}); choose another --out"
            )
    staging = out_dir.with_name(f".{out_dir.name}.synth-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for split in SPLITS:
        (staging / "images" / split).mkdir(parents=True)
        (staging / "labels" / split).mkdir(parents=True)
    (staging / "labels_clean" / "train").mkdir(parents=True)
    return staging


def _jobs(root: Path, seed: int, counts: dict[str, int], size: int) -> list[_Job]:
    """Every sample to draw: its split, index (which seeds it), stem and whether it gets a defect."""
    scenes = {
        (split_index, i): _scene_classes(np.random.default_rng([seed, split_index, i, 1]))
        for split_index, split in enumerate(SPLITS)
        for i in range(counts[split])
    }
    # Defects go to images with animals first (as the study's hand-tagged ones), speckles elsewhere.
    n_defects = max(1, round(counts["train"] * DEFECT_RATE))
    order = np.random.default_rng([seed, len(SPLITS)]).permutation(counts["train"])
    order = sorted(order.tolist(), key=lambda i: not scenes[SPLITS.index("train"), i])  # stable sort
    defective = set(order[:n_defects])
    taken: set[str] = set()
    return [
        _Job(
            root,
            seed,
            split_index,
            i,
            stem,
            size,
            scenes[split_index, i],
            split == "train" and i in defective,
        )
        for split_index, split in enumerate(SPLITS)
        for i, stem in enumerate(_stems(seed, split_index, counts[split], taken))
    ]


def _run(jobs: list[_Job]) -> list[str | None]:
    # Samples are independent (own seeds, own files): processes scale with cores, output stays identical.
    workers = min(os.cpu_count() or 1, 8, math.ceil(len(jobs) * jobs[0].size ** 2 / PER_WORKER_PX))
    if workers <= 1:
        return [_render(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_render, jobs, chunksize=8))


def generate(
    out_dir: Path, seed: int = 0, n_train: int = 200, n_val: int = 120, n_test: int = 120, size: int = 256
) -> Path:
    """Write a dataset in the study's layout (+ labels_clean/train, defects.json) to out_dir.

    Replaces out_dir only when it is empty or a previous synth output; the new dataset is built in a
    staging dir and moved into place at the end, so a crash never leaves half a dataset behind.
    """
    counts = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    if size < MIN_SIZE:
        raise InputError(f"--size {size}: must be at least {MIN_SIZE}")
    if any(n < 1 for n in counts.values()):
        raise InputError(f"split sizes {counts}: every split needs at least one image")
    out_dir = Path(out_dir).expanduser().resolve()
    staging = _prepare(out_dir)
    jobs = _jobs(staging, seed, counts, size)
    defects = sorted(path for path in _run(jobs) if path is not None)
    (staging / "defects.json").write_text(json.dumps(defects, indent=2) + "\n")
    params = {"generator": __name__, "seed": seed, "size": size, **{f"n_{s}": n for s, n in counts.items()}}
    (staging / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="output directory (empty, new, or a previous synth)"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--train", type=int, default=200, help="train images (default 200)")
    parser.add_argument("--val", type=int, default=120, help="val images (default 120)")
    parser.add_argument("--test", type=int, default=120, help="test images (default 120)")
    parser.add_argument("--size", type=int, default=256, help="image side in px (default 256)")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = generate(
        args.out, seed=args.seed, n_train=args.train, n_val=args.val, n_test=args.test, size=args.size
    )
    defects = json.loads((out / "defects.json").read_text())
    log.info("generated %s in %.1f s", out, time.perf_counter() - start)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    print(
        json.dumps(
            {"out": str(out), "version": content_hash(out), "images": counts, "defects": len(defects)},
            indent=2,
        )
    )
    return 0
