"""Scoring a white-cell finder against YOLO boxes: frames, tuning/report split, precision/recall/F1.

Used by ``benchmarks/wbc_detection.py`` on the three labs of ``txl_pbc_multilab`` (``bcd``,
``bccd``, ``raabin``): ``<set>/images/<stem>.jpg`` with ``<set>/labels/<stem>.txt``, one line per box,
``class x_center y_center width height`` relative to the image size (0 = WBC, 1 = RBC, 2 = platelet).

A found box is a true positive when it matches an annotated white cell at IoU ≥ 0.5, one to one,
highest IoU first (:func:`hematovision.segment.field.match_boxes`, as VOC scoring).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.errors import DatasetError
from hematovision.segment.field import Box, match_boxes

YOLO_CLASSES = {0: "wbc", 1: "rbc", 2: "platelet"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Frame:
    """An image with its annotation file."""

    image: Path
    labels: Path

    @property
    def stem(self) -> str:
        return self.image.stem


def list_yolo_frames(folder: str | Path) -> list[Frame]:
    """Frames of a YOLO-layout folder (``images/`` + ``labels/``), sorted by name.

    An image without a label file is an image with no box (YOLO's convention).

    Raises:
        DatasetError: ``folder/images`` does not exist or holds no image.
    """
    root = Path(folder)
    images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{root}: no images in {root / 'images'} (expected YOLO layout images/ + labels/)")
    return [Frame(image=p, labels=root / "labels" / f"{p.stem}.txt") for p in images]


def read_yolo_boxes(path: str | Path, width: int, height: int) -> list[Box]:
    """Boxes of a YOLO label file in pixels, clipped to the image, labels ``wbc``/``rbc``/``platelet``.

    A missing file means no boxes; other classes are skipped.

    Raises:
        DatasetError: a line is not ``class xc yc w h`` with numbers.
    """
    path = Path(path)
    if not path.is_file():
        return []
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError(f"{len(parts)} fields")
            cls, xc, yc, w, h = int(parts[0]), *(float(v) for v in parts[1:])
        except ValueError as error:
            raise DatasetError(f"{path}:{number}: not a YOLO box line ({error}): {line!r}") from error
        if cls not in YOLO_CLASSES:
            continue
        x0, x1 = (xc - w / 2) * width, (xc + w / 2) * width
        y0, y1 = (yc - h / 2) * height, (yc + h / 2) * height
        boxes.append(Box(max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1), YOLO_CLASSES[cls]))
    return boxes


def is_tuning_frame(stem: str) -> bool:
    """Whether a frame belongs to the tuning third (fixed by a hash of its name, not by chance).

    The adaptive finder's constants were chosen on these frames of ``bcd`` and ``raabin``; the
    other two thirds are the report split.
    """
    return int(hashlib.sha1(stem.encode()).hexdigest(), 16) % 3 == 0


@dataclass
class FrameScore:
    """Detection outcome on one frame."""

    frame: str
    true: int
    found: int
    tp: int
    fp: int
    fn: int
    mean_iou: float


def score_frame(name: str, found: Sequence[Box], truth: Sequence[Box], iou_threshold: float = 0.5) -> FrameScore:
    """Match found white-cell boxes to the annotated ones."""
    tp, fp, fn, ious = match_boxes(found, truth, iou_threshold)
    return FrameScore(name, len(truth), len(found), tp, fp, fn, float(np.mean(ious)) if ious else float("nan"))


def summarize(scores: Sequence[FrameScore]) -> dict:
    """Precision, recall, F1 over all boxes, and the share of frames whose count is exact."""
    tp, fp, fn = (sum(getattr(s, key) for s in scores) for key in ("tp", "fp", "fn"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    matched = [s.mean_iou for s in scores if s.tp]
    return {
        "frames": len(scores), "true": sum(s.true for s in scores), "found": sum(s.found for s in scores),
        "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "count_exact": float(np.mean([s.found == s.true for s in scores])) if scores else 0.0,
        "mean_iou_matched": float(np.mean(matched)) if matched else float("nan"),
    }


def evaluate_finder(
    frames: Sequence[Frame],
    find: Callable[[np.ndarray], list[Box]],
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    scale: float = 1.0,
    iou_threshold: float = 0.5,
) -> list[FrameScore]:
    """Run a white-cell finder on frames and score each against its YOLO white-cell boxes.

    Args:
        frames: the frames.
        find: image → white-cell boxes.
        transform: applied to each image before finding (a stress test: a tint), or ``None``.
        scale: resample each image (and its boxes) by this factor first (a magnification change).
        iou_threshold: IoU a found box needs to match an annotated one.
    """
    from hematovision.data.images import load_rgb

    scores = []
    for frame in frames:
        image = load_rgb(frame.image)
        height, width = image.shape[:2]
        truth = [b for b in read_yolo_boxes(frame.labels, width, height) if b.label == "wbc"]
        if scale != 1.0:
            image = _resample(image, scale)
            truth = [Box(b.x0 * scale, b.y0 * scale, b.x1 * scale, b.y1 * scale, b.label) for b in truth]
        if transform is not None:
            image = transform(image)
        scores.append(score_frame(frame.stem, find(image), truth, iou_threshold))
    return scores


def false_finds_in_wbc_free_tiles(
    frames: Sequence[Frame], find: Callable[[np.ndarray], list[Box]], min_red_cells: int = 2
) -> tuple[int, int]:
    """Run a finder on the quarters of frames that hold no annotated white cell.

    Most fields of a real sample show no white cell, while the annotated sets were chosen to show
    one; these tiles (half the frame's width and height, at its four corners, overlapping no WBC
    box and holding at least ``min_red_cells`` whole red-cell boxes) measure false finds there.

    Returns:
        (tiles, white cells found in them).
    """
    from hematovision.data.images import load_rgb

    tiles = finds = 0
    for frame in frames:
        image = load_rgb(frame.image)
        height, width = image.shape[:2]
        boxes = read_yolo_boxes(frame.labels, width, height)
        th, tw = height // 2, width // 2
        for y0 in (0, height - th):
            for x0 in (0, width - tw):
                inside = Box(x0, y0, x0 + tw, y0 + th)
                if any(b.label == "wbc" and b.iou(inside) > 0 for b in boxes):
                    continue
                red = [b for b in boxes if b.label == "rbc" and b.x0 >= x0 and b.x1 <= x0 + tw and b.y0 >= y0 and b.y1 <= y0 + th]
                if len(red) < min_red_cells:
                    continue
                tiles += 1
                finds += len(find(np.ascontiguousarray(image[y0 : y0 + th, x0 : x0 + tw])))
    return tiles, finds


def tint(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """Multiply each RGB channel by a gain (a lamp, camera or mounting-medium colour cast)."""
    return np.clip(np.asarray(image, dtype=np.float64) * np.asarray(gains) + 0.5, 0, 255).astype(np.uint8)


def _resample(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
