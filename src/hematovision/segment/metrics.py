"""Overlap metrics for label maps: Dice, IoU and pixel accuracy, per image and averaged.

Two regions are scored: the **nucleus** (label 2) and the **whole cell** (label 1 or 2).

Why pixel accuracy alone misleads: most pixels are background. In Zheng's 120x120 crops the
cell covers 31 % of the image on average and the nucleus 12.5 %, so labelling *everything*
background already scores ~69 % pixel accuracy, and a segmentation that is perfect except
for missing a third of the nucleus (labelled cytoplasm instead) scores ~96 %. On a 640x480
BCCD frame, where the white cell is ~10 % of the pixels, the same errors hide even better.
Dice and IoU are computed on the region itself, so they fall exactly when the region is
wrong. The U-Net paper's 98 % pixel accuracy therefore says little on its own; this module
reports all three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from hematovision.errors import HematoVisionError
from hematovision.segment.masks import NUCLEUS, SegSample

REGIONS = ("nucleus", "cell")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks.

    Both empty counts as perfect agreement (1.0): nothing to find, nothing found.
    """
    pred, target = _bool_pair(pred, target)
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & target).sum()) / total


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union |A∩B| / |A∪B| of two boolean masks (1.0 when both are empty)."""
    pred, target = _bool_pair(pred, target)
    union = int((pred | target).sum())
    return 1.0 if union == 0 else int((pred & target).sum()) / union


def pixel_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of pixels whose label (0/1/2) is right."""
    pred, target = np.asarray(pred), np.asarray(target)
    _check_shapes(pred, target)
    return float((pred == target).mean())


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of ``"nucleus"`` (label 2) or ``"cell"`` (label ≥ 1)."""
    if region == "nucleus":
        return np.asarray(labels) == NUCLEUS
    if region == "cell":
        return np.asarray(labels) >= 1
    raise HematoVisionError(f"unknown region {region!r}; use one of {REGIONS}")


def segmentation_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """All scores for one image.

    Args:
        pred: (H, W) predicted labels 0/1/2.
        target: (H, W) ground-truth labels 0/1/2.

    Returns:
        ``nucleus_dice``, ``nucleus_iou``, ``cell_dice``, ``cell_iou``, ``pixel_accuracy``.
    """
    scores = {}
    for region in REGIONS:
        p, t = region_mask(pred, region), region_mask(target, region)
        scores[f"{region}_dice"] = dice(p, t)
        scores[f"{region}_iou"] = iou(p, t)
    scores["pixel_accuracy"] = pixel_accuracy(pred, target)
    return scores


def summarize_scores(per_image: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, median and minimum of each score over images.

    Returns:
        ``{score_name: {"mean", "std", "median", "min"}}``.
    """
    rows = list(per_image)
    if not rows:
        raise HematoVisionError("no per-image scores to summarise")
    summary = {}
    # Identifiers (image names) are carried along in the rows; only numbers are summarised.
    for key in [k for k, v in rows[0].items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "median": float(np.median(values)),
            "min": float(values.min()),
        }
    return summary


def _bool_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    _check_shapes(pred, target)
    return pred, target


def _check_shapes(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise HematoVisionError(f"prediction shape {pred.shape} differs from target shape {target.shape}")


def evaluate_segmenter(
    samples: Sequence[SegSample],
    segment: Callable[[np.ndarray], np.ndarray],
    crop_to_cell: bool = False,
    binary: bool = False,
    progress: bool = True,
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Score a segmentation function on image/mask pairs at each image's own size.

    Args:
        samples: pairs to score (a held-out split).
        segment: maps an (H, W, 3) uint8 image to (H, W) labels 0/1/2.
        crop_to_cell: crop image and mask around the labelled cell first (BCCD frames).
        binary: ``segment`` gives cell (1) vs background (0); the target is reduced to the same
            two labels and only the cell scores and pixel accuracy are kept.
        progress: show a tqdm bar.

    Returns:
        (per-image rows with ``name``, the scores and ``ms``, summary by score).
    """
    import time

    from tqdm import tqdm

    from hematovision.segment.masks import crop_to_cell as crop
    from hematovision.segment.masks import read_sample

    rows = []
    for sample in tqdm(samples, desc="scoring", unit="img", disable=not progress):
        image, target = read_sample(sample)
        if crop_to_cell:
            image, target = crop(image, target)
        start = time.perf_counter()
        pred = segment(image)
        elapsed = 1000.0 * (time.perf_counter() - start)
        if binary:
            target = (target > 0).astype(np.uint8)
        scores = segmentation_scores(pred, target)
        if binary:
            scores = {k: v for k, v in scores.items() if not k.startswith("nucleus")}
        rows.append({"name": sample.name, **scores, "ms": elapsed})
    return rows, summarize_scores(rows)
