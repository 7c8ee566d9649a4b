"""Segmentation datasets: image/mask pairs, mask quantisation and a seeded held-out split.

Label maps everywhere in :mod:`hematovision.segment` use one convention::

    0 = background (including red cells), 1 = cytoplasm, 2 = nucleus

Two layouts are read:

* **images/ + masks/** with matching file stems (Zheng et al. 2018 Dataset 1, and any folder
  prepared the same way). Zheng's masks are clean 0/128/255.
* **BCCD**: ``JPEGImages/BloodImage_XXXXX.jpg`` with ``masks/BloodImage_Mask_XXXXX.png``
  (Banik et al. 2020), 0/~155/255 with anti-aliased edges and every value in between.

Quantisation (:func:`quantize_mask`): a mask is read as grayscale (the RGB BCCD masks are
gray in all three channels) and each pixel gets the label of the *nearest* nominal level,
i.e. thresholds halfway between levels: 64/192 for 0/128/255, 78/205 for 0/155/255. A pixel
that is half nucleus and half cytoplasm on an edge thus goes to whichever it is closer to,
which keeps the area of each region unbiased. Where a nucleus touches the background
directly, the blend passes through the cytoplasm level, so a 1-pixel rim there becomes
cytoplasm; it is a few pixels per image and changes whole-cell masks not at all.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hematovision.data.images import is_image_file, load_rgb
from hematovision.errors import DatasetError, HematoVisionError

LABEL_NAMES = ("background", "cytoplasm", "nucleus")
BACKGROUND, CYTOPLASM, NUCLEUS = 0, 1, 2

ZHENG_LEVELS = (0, 128, 255)
BCCD_LEVELS = (0, 155, 255)

_BCCD_MASK_RE = re.compile(r"BloodImage_Mask_(\d+)\.png$", re.IGNORECASE)


class MaskSizeError(HematoVisionError, ValueError):
    """A mask does not have its image's height and width."""


@dataclass(frozen=True)
class SegSample:
    """One image with its ground-truth mask file.

    Attributes:
        name: a short identifier (the image stem).
        image_path: the RGB image.
        mask_path: the grayscale mask.
        levels: nominal gray levels of background, cytoplasm and nucleus in this mask.
    """

    name: str
    image_path: Path
    mask_path: Path
    levels: tuple[int, int, int] = ZHENG_LEVELS


def quantize_mask(mask: np.ndarray, levels: tuple[int, int, int] = ZHENG_LEVELS) -> np.ndarray:
    """Turn a gray (possibly anti-aliased) mask into labels 0/1/2 by the nearest nominal level.

    Args:
        mask: (H, W) or (H, W, 3) array of gray values.
        levels: the gray values of background, cytoplasm and nucleus, increasing.

    Returns:
        (H, W) uint8 labels: 0 background, 1 cytoplasm, 2 nucleus.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        # Gray replicated in RGB (or RGBA): the first channel carries it; a real colour mask would
        # need a different reader, and averaging would hide that.
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise HematoVisionError(f"a mask must be (H, W) or (H, W, C), got shape {mask.shape}")
    low, mid, high = levels
    thresholds = [(low + mid) / 2.0, (mid + high) / 2.0]
    return np.digitize(mask.astype(np.float64), thresholds).astype(np.uint8)


def load_mask(path: str | Path, levels: tuple[int, int, int] = ZHENG_LEVELS, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read and quantise a mask file.

    Args:
        path: mask image file.
        levels: nominal gray levels (see :func:`quantize_mask`).
        shape: the (H, W) its image has; a different size is an error.

    Returns:
        (H, W) uint8 labels.

    Raises:
        MaskSizeError: the mask's size differs from ``shape``.
        DatasetError: the file cannot be read.
    """
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read mask ({error})") from error
    if shape is not None and gray.shape != tuple(shape):
        raise MaskSizeError(
            f"{path}: mask is {gray.shape[1]}x{gray.shape[0]} but its image is {shape[1]}x{shape[0]} (width x height)"
        )
    return quantize_mask(gray, levels)


def read_sample(sample: SegSample) -> tuple[np.ndarray, np.ndarray]:
    """Load a sample's image and quantised mask, checking they have the same size.

    Returns:
        (H, W, 3) uint8 image and (H, W) uint8 labels.
    """
    image = load_rgb(sample.image_path)
    return image, load_mask(sample.mask_path, sample.levels, shape=image.shape[:2])


def find_seg_samples(root: str | Path) -> list[SegSample]:
    """List the image/mask pairs in a dataset folder (either layout in the module docstring).

    Args:
        root: ``DIR`` holding ``images/`` + ``masks/`` (or ``dataset1/images`` ...), or a BCCD
            folder with ``JPEGImages/`` + ``masks/``.

    Returns:
        Samples sorted by name.

    Raises:
        DatasetError: no known layout, or no pairs found.
    """
    root = Path(root)
    if (root / "dataset1" / "images").is_dir():
        root = root / "dataset1"
    if (root / "JPEGImages").is_dir() and (root / "masks").is_dir():
        samples = _bccd_samples(root)
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        samples = _paired_samples(root / "images", root / "masks")
    else:
        raise DatasetError(
            f"{root}: expected images/ and masks/ (matching stems) or BCCD's JPEGImages/ and masks/"
        )
    if not samples:
        raise DatasetError(f"{root}: no image/mask pairs found")
    return samples


def _paired_samples(image_dir: Path, mask_dir: Path) -> list[SegSample]:
    masks = {p.stem: p for p in mask_dir.iterdir() if is_image_file(p)}
    samples = [
        SegSample(p.stem, p, masks[p.stem], ZHENG_LEVELS)
        for p in image_dir.iterdir()
        if is_image_file(p) and p.stem in masks
    ]
    return sorted(samples, key=lambda s: s.name)


def _bccd_samples(root: Path) -> list[SegSample]:
    samples = []
    for mask_path in (root / "masks").iterdir():
        match = _BCCD_MASK_RE.search(mask_path.name)
        if not match:
            continue
        stem = f"BloodImage_{match.group(1)}"
        # The 3 frames without VOC boxes live in extra_images_no_xml/; their masks are still usable.
        for folder in ("JPEGImages", "extra_images_no_xml"):
            image_path = root / folder / f"{stem}.jpg"
            if image_path.exists():
                samples.append(SegSample(stem, image_path, mask_path, BCCD_LEVELS))
                break
    return sorted(samples, key=lambda s: s.name)


def split_seg_samples(
    samples: list[SegSample],
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    same_side: list[tuple[str, str]] | None = None,
) -> dict[str, list[SegSample]]:
    """A seeded train/val/test split that keeps pixel-identical images on one side.

    Images are grouped by a hash of their decoded pixels (Zheng's 112 and 139 are identical),
    pairs in ``same_side`` are joined to one group, groups are shuffled with ``seed`` and cut
    by the fractions.

    Args:
        samples: the image/mask pairs.
        test_fraction: share of images held out for the final scores.
        val_fraction: share used to pick the best epoch.
        seed: shuffling seed.
        same_side: pairs of sample names that must not be separated (e.g. BCCD's near duplicates).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.
    """
    key_of = {
        s.name: hashlib.sha256(np.ascontiguousarray(load_rgb(s.image_path)).tobytes()).hexdigest() for s in samples
    }
    # Union the pairs' keys: every member of a pair takes the key of the pair's first member.
    for a, b in same_side or []:
        if a in key_of and b in key_of:
            old, new = key_of[b], key_of[a]
            key_of = {name: (new if key == old else key) for name, key in key_of.items()}
    groups: dict[str, list[SegSample]] = {}
    for sample in samples:
        groups.setdefault(key_of[sample.name], []).append(sample)
    keys = sorted(groups)
    np.random.default_rng(seed).shuffle(keys)
    n = len(samples)
    split: dict[str, list[SegSample]] = {"test": [], "val": [], "train": []}
    for key in keys:
        if len(split["test"]) < round(test_fraction * n):
            part = "test"
        elif len(split["val"]) < round(val_fraction * n):
            part = "val"
        else:
            part = "train"
        split[part].extend(groups[key])
    return {name: sorted(items, key=lambda s: s.name) for name, items in split.items()}


def read_near_duplicates(root: str | Path) -> list[tuple[str, str]]:
    """Pairs of frame stems from ``near_duplicate_pairs_sift.csv`` in a BCCD folder (empty if absent)."""
    import csv

    path = Path(root) / "near_duplicate_pairs_sift.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [(Path(row["image_a"]).stem, Path(row["image_b"]).stem) for row in csv.DictReader(handle)]


def crop_to_cell(image: np.ndarray, labels: np.ndarray, margin: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Crop a square around the labelled cell (mask > 0), widened by ``margin`` of its size.

    BCCD masks mark one or two cells in a 640x480 frame; at the U-Net's 128 px the cell would be
    a few pixels wide, so training and evaluation on BCCD use such crops (the crop position comes
    from the ground truth: it measures segmentation given a detection).

    Returns:
        The cropped image and labels (the whole inputs if there is no labelled pixel).
    """
    rows, cols = np.nonzero(labels)
    if len(rows) == 0:
        return image, labels
    cy, cx = (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0
    half = max(rows.max() - rows.min(), cols.max() - cols.min()) * (0.5 + margin)
    y0, y1 = int(max(0, cy - half)), int(min(labels.shape[0], cy + half + 1))
    x0, x1 = int(max(0, cx - half)), int(min(labels.shape[1], cx + half + 1))
    return image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
