"""Scoring the field pipeline on BCCD frames against their Pascal VOC boxes.

Held-out set: the CBC dataset's ``test`` list (60 frames, ``ImageSets/CBC/test.txt``); the
pipeline was tuned on CBC ``train`` only. That split keeps every near-duplicate pair of
``near_duplicate_pairs_sift.csv`` on one side (checked by :func:`check_split_leaks`) and leaves
out the 4 frames the CBC authors dropped for missing red-cell boxes.

Scores per frame:

* white cells: detection TP/FP/FN at box IoU ≥ 0.5, and whether the count is exact;
* platelets: count error (found − annotated), and detection matching at IoU ≥ 0.1 (platelet
  boxes are ~40 px; a small offset already halves the IoU);
* red cells: count error, and centre-in-box matching, which separates missed cells from
  *unmatched* finds — found cells no box covers, which are false finds or cells the
  annotators skipped.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hematovision.data.classes import normalize_class_name
from hematovision.data.images import load_rgb
from hematovision.errors import DatasetError
from hematovision.segment.field import (
    Classifier,
    FieldParams,
    analyze_field,
    match_boxes,
    match_points_to_boxes,
    read_voc_boxes,
)


def read_split(bccd_root: str | Path, name: str = "test", source: str = "CBC") -> list[str]:
    """Frame stems of a BCCD split list, e.g. ``ImageSets/CBC/test.txt``.

    Raises:
        DatasetError: the list does not exist.
    """
    path = Path(bccd_root) / "ImageSets" / source / f"{name}.txt"
    if not path.is_file():
        raise DatasetError(f"split list {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_split_leaks(bccd_root: str | Path, train: Sequence[str], test: Sequence[str]) -> list[tuple[str, str]]:
    """Near-duplicate pairs with one frame in ``train`` and the other in ``test`` (should be empty)."""
    path = Path(bccd_root) / "near_duplicate_pairs_sift.csv"
    if not path.is_file():
        return []
    train_set, test_set = set(train), set(test)
    leaks = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            a, b = Path(row["image_a"]).stem, Path(row["image_b"]).stem
            if (a in train_set and b in test_set) or (a in test_set and b in train_set):
                leaks.append((a, b))
    return leaks


def read_bccd_labels(bccd_root: str | Path) -> dict[str, list[str]]:
    """White-cell types per frame from ``labels.csv`` (``BloodImage_%05d`` → canonical names)."""
    path = Path(bccd_root) / "labels.csv"
    labels: dict[str, list[str]] = {}
    if not path.is_file():
        return labels
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            names = [normalize_class_name(part) for part in (row.get("Category") or "").split(",") if part.strip()]
            labels[f"BloodImage_{int(row['Image']):05d}"] = names
    return labels


def evaluate_frames(
    bccd_root: str | Path,
    stems: Sequence[str],
    params: FieldParams | None = None,
    classifier: Classifier | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run the field pipeline on frames and score it against their VOC boxes.

    Args:
        bccd_root: the BCCD folder (``JPEGImages/``, ``Annotations/``, ``labels.csv``).
        stems: frame names without extension.
        params: pipeline tuning.
        classifier: optional white-cell classifier; its agreement with ``labels.csv`` is scored
            on frames with exactly one found cell and exactly one label.
        progress: show a tqdm bar.

    Returns:
        (per-frame rows, summary dict).
    """
    from tqdm import tqdm

    root = Path(bccd_root)
    params = params or FieldParams()
    type_labels = read_bccd_labels(root) if classifier is not None else {}
    rows = []
    seconds = 0.0
    for stem in tqdm(stems, desc="fields", unit="frame", disable=not progress):
        image = load_rgb(root / "JPEGImages" / f"{stem}.jpg")
        truth = read_voc_boxes(root / "Annotations" / f"{stem}.xml")
        start = time.perf_counter()
        result = analyze_field(image, params, classifier)
        seconds += time.perf_counter() - start
        gt = {kind: [b for b in truth if b.label == kind] for kind in ("wbc", "rbc", "platelet")}
        wbc_tp, wbc_fp, wbc_fn, wbc_ious = match_boxes([c.box for c in result.white_cells], gt["wbc"], 0.5)
        plt_tp, _, _, _ = match_boxes(result.platelets, gt["platelet"], 0.1)
        rbc_matched, rbc_unmatched, rbc_missed = match_points_to_boxes(result.rbc_centers, gt["rbc"])
        # Cells cut by the frame edge are where the annotation is least complete; counting only
        # centres at least a radius inside the frame compares like with like.
        shape, margin = image.shape[:2], result.rbc_diameter / 2.0
        found_interior = [_is_interior(x, y, shape, margin) for x, y in result.rbc_centers]
        unmatched_points = _unmatched_points(result.rbc_centers, gt["rbc"])
        row = {
            "frame": stem,
            "wbc_true": len(gt["wbc"]), "wbc_found": len(result.white_cells),
            "wbc_tp": wbc_tp, "wbc_fp": wbc_fp, "wbc_fn": wbc_fn,
            "wbc_mean_iou": float(np.mean(wbc_ious)) if wbc_ious else float("nan"),
            "platelet_true": len(gt["platelet"]), "platelet_found": len(result.platelets),
            "platelet_tp": plt_tp,
            "rbc_true": len(gt["rbc"]), "rbc_found": len(result.rbc_centers),
            "rbc_matched": rbc_matched, "rbc_unmatched": rbc_unmatched, "rbc_missed": rbc_missed,
            "rbc_true_interior": sum(_is_interior(*b.center, shape, margin) for b in gt["rbc"]),
            "rbc_found_interior": sum(found_interior),
            "rbc_outside_boxes": len(unmatched_points),
            "rbc_outside_boxes_at_edge": sum(not _is_interior(x, y, shape, margin) for x, y in unmatched_points),
            "predicted_types": ";".join(c.cell_type or "" for c in result.white_cells),
            "true_types": ";".join(type_labels.get(stem, [])),
        }
        rows.append(row)
    return rows, summarize_frames(rows, seconds)


def _is_interior(x: float, y: float, shape: tuple[int, ...], margin: float) -> bool:
    return margin <= x < shape[1] - margin and margin <= y < shape[0] - margin


def _unmatched_points(points: np.ndarray, truth: Sequence) -> list[tuple[float, float]]:
    # The points no annotated box contains (a looser test than the one-to-one matching).
    return [
        (float(x), float(y)) for x, y in points
        if not any(b.x0 <= x < b.x1 and b.y0 <= y < b.y1 for b in truth)
    ]


def summarize_frames(rows: Sequence[dict], seconds: float = float("nan")) -> dict:
    """Detection and count summaries over frames (see the module docstring)."""
    def total(key: str) -> int:
        return int(sum(row[key] for row in rows))

    tp, fp, fn = total("wbc_tp"), total("wbc_fp"), total("wbc_fn")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    summary: dict = {
        "frames": len(rows),
        "wbc": {
            "true": total("wbc_true"), "found": total("wbc_found"), "tp": tp, "fp": fp, "fn": fn,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "count_exact_fraction": float(np.mean([row["wbc_found"] == row["wbc_true"] for row in rows])),
            "mean_iou_matched": float(np.nanmean([row["wbc_mean_iou"] for row in rows])) if tp else float("nan"),
        },
        "seconds_per_frame": seconds / max(1, len(rows)),
    }
    for kind in ("platelet", "rbc"):
        error = np.array([row[f"{kind}_found"] - row[f"{kind}_true"] for row in rows], dtype=np.float64)
        truth = np.array([row[f"{kind}_true"] for row in rows], dtype=np.float64)
        summary[kind] = {
            "true": int(truth.sum()), "found": total(f"{kind}_found"),
            "mean_error": float(error.mean()), "mean_abs_error": float(np.abs(error).mean()),
            "exact_fraction": float((error == 0).mean()),
            "within_1_fraction": float((np.abs(error) <= 1).mean()),
        }
    summary["platelet"]["matched"] = total("platelet_tp")
    interior_error = np.array([row["rbc_found_interior"] - row["rbc_true_interior"] for row in rows], dtype=np.float64)
    summary["rbc"].update(
        matched=total("rbc_matched"), unmatched=total("rbc_unmatched"), missed=total("rbc_missed"),
        recall_of_annotated=total("rbc_matched") / max(1, total("rbc_true")),
        outside_boxes=total("rbc_outside_boxes"), outside_boxes_at_edge=total("rbc_outside_boxes_at_edge"),
        interior_true=total("rbc_true_interior"), interior_found=total("rbc_found_interior"),
        interior_mean_error=float(interior_error.mean()), interior_mean_abs_error=float(np.abs(interior_error).mean()),
    )
    pairs = [
        (row["predicted_types"], row["true_types"]) for row in rows
        if row["predicted_types"] and ";" not in row["predicted_types"] and row["true_types"] and ";" not in row["true_types"]
    ]
    if pairs:
        summary["classification"] = {
            "frames_scored": len(pairs),
            "agreement": float(np.mean([p == t for p, t in pairs])),
        }
    return summary


def unannotated_red_fraction(bccd_root: str | Path, stem: str, params: FieldParams | None = None) -> tuple[float, float]:
    """How much red-cell-coloured area of a frame lies outside every annotated box.

    The red-cell foreground is the same pink mask the counter uses (Otsu on a*, white cells
    and stain removed). If the annotation were complete, almost all of it would fall inside
    some RBC/WBC/platelet box.

    Returns:
        (fraction of foreground pixels outside all boxes, foreground pixels / frame pixels).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from hematovision.segment.field import _disc, _rgb_to_lab, _stain_mask

    root = Path(bccd_root)
    params = params or FieldParams()
    image = load_rgb(root / "JPEGImages" / f"{stem}.jpg")
    lab = _rgb_to_lab(image)
    stain = _stain_mask(lab, params)
    redness = lab[..., 1]
    foreground = ndi.binary_opening((redness > threshold_otsu(redness[~stain])) & ~stain, structure=_disc(3))
    covered = np.zeros_like(foreground)
    for box in read_voc_boxes(root / "Annotations" / f"{stem}.xml"):
        x0, y0, x1, y1 = box.as_list()
        covered[y0:y1, x0:x1] = True
    total = int(foreground.sum())
    return (float((foreground & ~covered).sum() / total) if total else 0.0), total / foreground.size
