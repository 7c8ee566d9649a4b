"""Segmenting image files: the chosen segmenter, then each file's mask, overlay and shape features.

:func:`segment_files` is what ``hematovision segment IMAGES...`` runs. Per image it writes
``<stem>_mask.png`` (0 background, 1 cytoplasm, 2 nucleus) and ``<stem>_overlay.png``, and one row
of ``features.csv`` for all of them (see :mod:`hematovision.segment.outputs`).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write
from hematovision.data.images import ImageLoadError, load_rgb
from hematovision.segment.outputs import overlay_labels, save_label_png, shape_features

log = logging.getLogger(__name__)

FEATURES_FILE = "features.csv"

Segmenter = Callable[[np.ndarray], np.ndarray]


def make_segmenter(method: str, unet_run: str | Path | None = None, clusters: int = 3, seed: int = 0) -> Segmenter:
    """A function from an (H, W, 3) uint8 image to its (H, W) labels.

    Args:
        method: ``ekmeans`` (colour clustering, no training) or ``unet`` (a trained U-Net).
        unet_run: the U-Net run folder (``unet`` only; made by ``hematovision segment train``).
        clusters: EK-means colour clusters (3 or 4).
        seed: EK-means seed for the fuzzy c-means start.
    """
    if method == "unet":
        if unet_run is None:
            raise ValueError("the unet method needs a U-Net run folder")
        from hematovision.segment.unet import load_unet, predict_labels

        model, config = load_unet(unet_run)
        return lambda image: predict_labels(model, image, config)
    if method != "ekmeans":
        raise ValueError(f"unknown segmentation method {method!r}")
    from hematovision.segment.ekmeans import segment_ekmeans

    return lambda image: segment_ekmeans(image, n_clusters=clusters, seed=seed)


def segment_files(
    paths: Sequence[Path],
    segment: Segmenter,
    out_dir: str | Path,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], int]:
    """Segment every image file and write its mask, its overlay and ``features.csv``.

    Args:
        paths: image files; unreadable ones get a ``status`` row in ``features.csv`` and are skipped.
        segment: image -> labels (see :func:`make_segmenter`).
        out_dir: output folder (created).
        progress: called with one line per image; logged when not given.

    Returns:
        The ``features.csv`` rows (``image``, ``status``, size and shape features) and the number
        of unreadable files.
    """
    from PIL import Image

    report = progress or log.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, failures = [], 0
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            report(f"skipped: {error}")
            rows.append({"image": str(path), "status": f"unreadable: {error}"})
            failures += 1
            continue
        labels = segment(image)
        stem = path.stem
        save_label_png(labels, out_dir / f"{stem}_mask.png")
        overlay = overlay_labels(image, labels)
        atomic_write(out_dir / f"{stem}_overlay.png", lambda tmp, o=overlay: Image.fromarray(o).save(tmp, format="PNG"))
        features = shape_features(labels)
        status = "ok" if features["cell_area"] else "no white cell found"
        sizes = f" (nucleus {features['nucleus_area']} px, cell {features['cell_area']} px)" if features["cell_area"] else ""
        report(f"{path.name}: {status}{sizes}")
        rows.append({"image": str(path), "status": status, "width": image.shape[1], "height": image.shape[0],
                     **features})
    _write_features(out_dir / FEATURES_FILE, rows)
    return rows, failures


def _write_features(path: Path, rows: list[dict]) -> Path:
    # Unreadable files' rows have fewer keys: the columns are every key seen, in order of appearance.
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})

    return atomic_write(path, write)
