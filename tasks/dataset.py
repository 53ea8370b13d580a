"""The study's dataset layout: reading images and masks, validating a dataset, its content hash.

Layout (one stem per sample, shared by the image and its masks):
    images/{train,val,test}/<stem>.jpg|.jpeg|.png
    labels/{train,val,test}/<stem>.png          single channel, values 0 background, 1 cat, 2 dog, 255 ignore
    labels_sam2/<split>/<stem>.png              optional relabeled copy (a split present here is complete)
    labels_clean/train/, defects.json           optional, written by `synth` (truth about injected defects)

Image colour policy (the same in `read_image` and `validate`): mmseg loads images with
color_type='color', so grayscale, palette, RGBA, CMYK... images become 3-channel RGB (alpha dropped).
Such images are CONVERTED, and `validate` lists each one under "converted" (never silently). Images
whose conversion is ambiguous are REFUSED: high bit depth (16-bit/float) and EXIF-rotated images
(mmseg's cv2 loader rotates the image but not its mask).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from tasks.errors import InputError

log = logging.getLogger(__name__)

CLASSES = ("background", "cat", "dog")
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
LABEL_VALUES = (*range(len(CLASSES)), IGNORE_INDEX)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIXES = (".png",)  # lossless only: JPEG would smear label values
IMAGE_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: multi-picture JPEG written by some cameras
REFUSED_IMAGE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # no agreed 8-bit conversion
# What the version covers: everything the pipeline reads from a dataset. labels_clean/ and
# defects.json are included because EDA/relabel read them (given bad-mask list, relabel quality):
# a change there must change the version, or content-cached stage outputs would go stale. Other
# files beside them (a README, synth.json provenance) do not change the version.
HASHED_DIRS = ("images", "labels", "labels_sam2", "labels_clean")
HASHED_FILES = ("defects.json",)
# What a split's version covers (images/<split>/, labels/<split>/): a split's samples and reference masks.
SPLIT_DIRS = ("images", "labels")
VERSION_CHARS = 16
EXIF_ORIENTATION = 0x0112
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the 12-byte IEND chunk every complete PNG ends with


# ---------------------------------------------------------------- reading one file


def _decode(path: Path, formats: Iterable[str]) -> Image.Image:
    """Fully decode a file (a header check misses truncation); InputError naming it if it fails."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror or err})") from err
    # Another library may have switched PIL to tolerate truncated files; validation never does.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated files would pass")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from err
    if image.format not in formats:
        raise InputError(f"{path}: {image.format} data, expected {'/'.join(formats)}")
    # PIL decodes a PNG cut right after its pixel data without complaint: the missing IEND tells.
    if image.format == "PNG" and not data.endswith(PNG_END):
        raise InputError(f"{path}: corrupt or truncated image (PNG does not end with an IEND chunk)")
    return image


def _image_rgb(path: Path) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 RGB and the original mode when it had to be converted (else None)."""
    image = _decode(path, IMAGE_FORMATS)
    if image.mode in REFUSED_IMAGE_MODES:
        raise InputError(f"{path}: {image.mode} image (high bit depth) is refused: convert it to 8-bit RGB")
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:
        raise InputError(
            f"{path}: EXIF orientation {orientation} is refused (mmseg would rotate the image but not "
            "its mask): store the pixels upright"
        )
    if image.mode == "RGB":
        return np.asarray(image), None
    return np.asarray(image.convert("RGB")), image.mode


def read_image(path: Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB, converted like mmseg's color loading (module docstring)."""
    return _image_rgb(Path(path))[0]


def read_mask(path: Path) -> np.ndarray:
    """A mask as (H, W) uint8; InputError naming the file if it has several channels or bad values."""
    path = Path(path)
    image = _decode(path, ("PNG",))
    bands = len(image.getbands())
    if bands != 1:
        raise InputError(f"{path}: mask has {bands} channels (mode {image.mode}), expected 1 channel")
    values = np.asarray(image)
    # Checked before the cast to uint8, so a 16-bit 256 cannot wrap around to 0.
    counts = np.bincount(values.ravel().astype(np.int64, copy=False), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v not in LABEL_VALUES]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise InputError(
            f"{path}: label values {shown} outside {{{', '.join(map(str, LABEL_VALUES))}}} "
            f"({int(counts[bad].sum())} px)"
        )
    return values.astype(np.uint8, copy=False)


# ---------------------------------------------------------------- layout: what a sample is
#
# THE definition of a sample, shared by validate, EDA, relabel and the mmseg dataset the configs
# use (tasks.mmseg_setup.StudyDataset): an image <stem><IMAGE_SUFFIXES> in an image folder and a mask
# <stem><MASK_SUFFIXES> with the same stem in the mask folder, suffixes compared without case (.JPG,
# .jpeg, .PNG count). Anything else in a split folder is a problem, never skipped.


def shown_name(name: str) -> str:
    """A file name as it can be printed: bytes that are not UTF-8 as \\x.. escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir/os.walk hand undecodable bytes over as surrogates
        return False
    return True


def _not_utf8(rel: str) -> str:
    return f"{shown_name(rel)}: file name is not valid UTF-8 (object keys need UTF-8): rename it"


def _index(root: Path, directory: str, suffixes: tuple[str, ...]) -> tuple[dict[str, Path], list[str]]:
    """stem -> file of one split folder, plus a problem per file that is not a sample."""
    stems: dict[str, Path] = {}
    problems = []
    with os.scandir(root / directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            rel = f"{directory}/{entry.name}"
            stem, suffix = os.path.splitext(entry.name)
            if not _utf8(entry.name):
                problems.append(_not_utf8(rel))
            elif not entry.is_file():
                problems.append(f"{rel}: not a file (a split folder holds only {'/'.join(suffixes)} files)")
            elif suffix.lower() not in suffixes:
                problems.append(f"{rel}: unexpected file type, expected {'/'.join(suffixes)}")
            elif stem in stems:
                problems.append(f"{rel}: second file for stem {stem!r} (also {stems[stem].name})")
            else:
                stems[stem] = Path(entry.path)
    return stems, problems


@dataclass
class _SplitIndex:
    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    images: int = 0
    masks: int = 0
    problems: list[str] = field(default_factory=list)


def _pair_index(root: Path, image_dir: str, mask_dir: str, required: bool = True) -> _SplitIndex | None:
    """Match image_dir with mask_dir (relative to root) by stem; None when an optional folder is absent."""
    has_images, has_masks = (root / image_dir).is_dir(), (root / mask_dir).is_dir()
    if not has_masks and not required:
        return None
    index = _SplitIndex()
    missing = [d for d, present in ((image_dir, has_images), (mask_dir, has_masks)) if not present]
    if missing:
        # Per-file pairing problems would only repeat that a whole folder is missing.
        index.problems += [f"{d}: split folder missing" for d in missing]
        return index
    images, image_problems = _index(root, image_dir, IMAGE_SUFFIXES)
    masks, mask_problems = _index(root, mask_dir, MASK_SUFFIXES)
    index.images, index.masks = len(images), len(masks)
    index.problems += image_problems + mask_problems
    if not images:
        index.problems.append(f"{image_dir}: split is empty (no images)")
    if not masks:
        index.problems.append(f"{mask_dir}: split is empty (no masks)")
    for stem in sorted(images.keys() | masks.keys()):
        if stem not in masks:
            index.problems.append(
                f"{image_dir}/{images[stem].name}: image without mask ({mask_dir}/{stem}.png)"
            )
        elif stem not in images:
            index.problems.append(f"{mask_dir}/{masks[stem].name}: mask without image in {image_dir}")
        else:
            index.pairs.append((images[stem], masks[stem]))
    return index


def list_samples(root: Path, image_dir: str, mask_dir: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of the samples in root/image_dir and root/mask_dir, sorted by stem.

    InputError (one line per file, named relative to root) unless every file is part of a sample.
    """
    index = _pair_index(Path(root), image_dir, mask_dir)
    if index.problems:
        raise InputError(index.problems)
    return index.pairs


def list_pairs(root: Path, split: str, labels_dir: str = "labels") -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split sorted by stem; InputError if the split is not fully paired."""
    return list_samples(root, f"images/{split}", f"{labels_dir}/{split}")


# ---------------------------------------------------------------- validation


def _check_pair(
    root: Path, image_path: Path, mask_path: Path, check_image: bool
) -> tuple[list[str], dict | None]:
    """Problems of one sample and its conversion record; decodes both files fully."""
    problems, converted, image_shape = [], None, None
    if check_image:
        try:
            pixels, mode = _image_rgb(image_path)
            image_shape = pixels.shape[:2]
            if mode is not None:
                converted = {"file": image_path.relative_to(root).as_posix(), "mode": mode, "to": "RGB"}
        except InputError as err:
            problems += err.problems
    else:
        try:  # a relabeled mask: its image is checked in the labels/ pass, only its size matters here
            with Image.open(image_path) as image:
                image_shape = (image.height, image.width)
        except (OSError, UnidentifiedImageError):
            pass  # reported by the labels/ pass already
    try:
        mask = read_mask(mask_path)
        if image_shape is not None and mask.shape != image_shape:
            problems.append(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{image_path.name} {image_shape[1]}x{image_shape[0]} (width x height)"
            )
    except InputError as err:
        problems += err.problems
    # Absolute paths came from the decoders: name files relative to the dataset root instead.
    prefix = f"{root}{os.sep}"
    return [p.removeprefix(prefix) for p in problems], converted


def _workers() -> int:
    # Decoding is mostly GIL-free C (zlib, libjpeg): threads scale with cores without copying arrays.
    return min(8, os.cpu_count() or 1)


def _checked(root: Path, jobs: list[tuple[Path, Path, bool]]) -> Iterator[tuple[list[str], dict | None]]:
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        yield from pool.map(lambda job: _check_pair(root, *job), jobs)


def validate_dataset(root: Path, splits: Iterable[str] = SPLITS) -> dict:
    """Check every sample of every split (and of labels_sam2 where present); return the summary.

    Raises InputError with one line per problem, each naming the file (relative to root), covering
    all problems found, not just the first. Samples are decoded by a few threads, one sample per task
    and nothing kept but the problems, so memory stays flat however many files there are.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{root}: dataset directory not found")
    problems: list[str] = []
    converted: list[dict] = []
    summary_splits: dict[str, dict] = {}
    for split in splits:
        index = _pair_index(root, f"images/{split}", f"labels/{split}")
        counts = {"images": index.images, "masks": index.masks}
        jobs = [(image, mask, True) for image, mask in index.pairs]
        relabeled = _pair_index(root, f"images/{split}", f"labels_sam2/{split}", required=False)
        if relabeled is not None:
            counts["masks_sam2"] = relabeled.masks
            # A relabeled copy replaces labels/ for training: it must cover every image, not a subset.
            problems += relabeled.problems
            jobs += [(image, mask, False) for image, mask in relabeled.pairs]
        problems += index.problems
        summary_splits[split] = counts
        for found, record in _checked(root, jobs):
            problems += found
            if record is not None:
                converted.append(record)
    if problems:
        raise InputError(list(dict.fromkeys(problems)))  # a missing images/ folder shows up once
    for record in converted:
        log.warning("%s: %s image converted to RGB", record["file"], record["mode"])
    version, split_versions = dataset_versions(root)
    return {
        "root": str(root),
        "version": version,
        "split_versions": {split: split_versions[split] for split in splits},
        "splits": summary_splits,
        "converted": converted,
    }


# ---------------------------------------------------------------- version


def dataset_files(
    root: Path, dirs: Iterable[str] = HASHED_DIRS, names: Iterable[str] = HASHED_FILES
) -> list[str]:
    """The dataset's own files, as sorted paths relative to root: what its version covers and what is
    uploaded (HASHED_DIRS, HASHED_FILES; a `.env` or notes beside them are neither). InputError
    naming every file or folder whose name is not UTF-8 (it could be neither hashed nor a key)."""
    root = Path(root)
    found = [name for name in names if (root / name).is_file()]
    problems = []
    for top in dirs:
        for folder, subdirs, files in os.walk(root / top):
            subdirs.sort()
            rel_folder = Path(folder).relative_to(root).as_posix()
            for name in files:
                rel = f"{rel_folder}/{name}"
                (found if _utf8(rel) else problems).append(rel)
    if problems:
        raise InputError([_not_utf8(rel) for rel in sorted(problems)])
    return sorted(found)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _split_of(rel: str) -> str | None:
    """The split a hashed file belongs to: SPLIT_DIRS/<split>/..., else None (other folders, defects.json)."""
    top, _, rest = rel.partition("/")
    split = rest.partition("/")[0]
    return split if top in SPLIT_DIRS and split in SPLITS and "/" in rest else None


def _hash_files(root: Path, files: list[str]) -> dict[str | None, str]:
    """One pass over files (sorted relative paths): the version of all of them under the key None and
    the version of each split's subset (_split_of) under the split's name, for every split in SPLITS.

    A version is sha256 over the sorted "relative path NUL sha256 of the bytes" lines, first
    VERSION_CHARS hex chars; every version here is computed from the same file digests."""
    outer = {None: hashlib.sha256(), **{split: hashlib.sha256() for split in SPLITS}}
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        digests = pool.map(lambda rel: _file_sha256(root / rel), files)
        for rel, digest in zip(files, digests, strict=True):
            line = f"{rel}\0{digest}\n".encode()
            outer[None].update(line)
            if (split := _split_of(rel)) is not None:
                outer[split].update(line)
    return {key: h.hexdigest()[:VERSION_CHARS] for key, h in outer.items()}


def dataset_versions(root: Path) -> tuple[str, dict[str, str]]:
    """(the dataset version, {split: split version}) from one read of the dataset's files.

    The dataset version covers everything the pipeline reads (HASHED_DIRS, HASHED_FILES); a split's
    version covers only images/<split>/ and labels/<split>/ (its samples and their reference masks,
    what evaluation on that split reads), so adding train images leaves the test version unchanged."""
    versions = _hash_files(Path(root), dataset_files(Path(root)))
    return versions.pop(None), versions


def content_hash(root: Path) -> str:
    """The dataset version: sha256 over the sorted (relative path, sha256 of bytes) of the files the
    pipeline reads (HASHED_DIRS, HASHED_FILES), first 16 hex chars. Independent of mtimes and of where
    the dataset lives, so a local copy and its S3 upload have the same version."""
    return dataset_versions(root)[0]


def split_version(root: Path, split: str) -> str:
    """One split's version (see dataset_versions), reading only that split's images and labels."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    root = Path(root)
    files = dataset_files(root, [f"{top}/{split}" for top in SPLIT_DIRS], names=())
    return _hash_files(root, files)[split]


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="PATH_OR_S3_URI", help="local dataset dir or s3://bucket/prefix")
    parser.add_argument(
        "--run-id",
        help="record the dataset version and params in runs/<id>/manifest.json (uploads a local dir)",
    )
    parser.add_argument(
        "--params-json", help="the run's parameters (JSON object) for the manifest; needs --run-id"
    )


def _params(params_json: str | None) -> dict:
    if params_json is None:
        return {}
    try:
        params = json.loads(params_json)
    except json.JSONDecodeError as err:
        raise InputError(f"--params-json: not valid JSON ({err})") from err
    if not isinstance(params, dict):
        raise InputError(f"--params-json: expected a JSON object, got {type(params).__name__}")
    return params


def main(args: argparse.Namespace) -> int:
    if args.params_json is not None and args.run_id is None:
        raise InputError("--params-json needs --run-id (the params go to that run's manifest)")
    params = _params(args.params_json)
    remote = args.dataset.startswith("s3://")
    if not (remote or args.run_id):
        # Offline path: no store involved at all.
        print(json.dumps(validate_dataset(Path(args.dataset)), indent=2))
        return 0

    # boto3 only when a store is actually used
    from tasks import manifest, materialize
    from tasks import store as store_module

    store = store_module.Store.from_env()
    if args.run_id is not None:
        store_module.check_run_id(args.run_id)
    if remote:
        ref = materialize.materialize_dataset(args.dataset, store)
        summary = validate_dataset(ref.root)
    else:
        summary = validate_dataset(Path(args.dataset))  # before uploading: never publish a bad dataset
        ref = materialize.materialize_dataset(args.dataset, store)
    summary["uri"] = ref.uri
    if args.run_id is not None:
        # the stages after validate read exactly this version (materialize.pinned_dataset)
        dataset = materialize.pin_dataset(args.dataset, ref, store)
        summary["uri"] = dataset["uri"]
        dataset["splits"] = summary["splits"]
        dataset["split_versions"] = summary["split_versions"]
        dataset["converted"] = len(summary["converted"])
        manifest.update_manifest(
            store, args.run_id, dataset=dataset, params=params, started_at=store_module.utc_now()
        )
        log.info("run %s: dataset %s version %s recorded in the manifest", args.run_id, ref.name, ref.version)
    print(json.dumps(summary, indent=2))
    return 0
