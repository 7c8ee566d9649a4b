"""Crop-first datasets: find the white cell in each whole-frame image and keep its crop.

Some public "white-cell" datasets are whole smear frames labelled with the type of the white cell
they show (``bccd_wbc4_aug``: 320x240 BCCD frames, most of the picture red cells). A classifier
trained on them learns the frame; one trained on crops learns the cell, the way
``hematovision count`` sees it. :func:`write_crop_dataset` runs the same finder and the same
square crop as ``count`` (:func:`~hematovision.segment.field.locate_white_cells`,
:func:`~hematovision.segment.field.crop_square`) over a class-folder dataset and writes the crops
with the same relative paths (``SPLIT/CLASS/file``), so that the source's split folders, file
names and any provenance CSV (``--group-csv``) still apply.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hematovision.data.images import ImageLoadError, is_image_file, load_rgb
from hematovision.errors import DatasetError
from hematovision.segment.field import FieldParams, WhiteCell, crop_square, locate_white_cells

log = logging.getLogger(__name__)

MANIFEST_FILE = "crops.csv"
_MANIFEST_COLUMNS = ["file", "split", "class", "found", "x0", "y0", "x1", "y1", "nucleus_area", "note"]


def pick_white_cell(cells: Sequence[WhiteCell], shape: tuple[int, ...]) -> WhiteCell | None:
    """The cell a frame-level label most likely names: the largest nucleus, the more central on a near tie.

    A frame labelled with one type shows that cell whole and, at times, a piece of another at the
    edge; the whole one has the larger nucleus. Nuclei within 20 % of the largest count as a tie.

    Args:
        cells: the white cells found in the frame.
        shape: the frame's (H, W, ...) shape.
    """
    if not cells:
        return None
    largest = max(cell.nucleus_area for cell in cells)
    near = [cell for cell in cells if cell.nucleus_area >= 0.8 * largest]
    height, width = shape[:2]

    def off_centre(cell: WhiteCell) -> float:
        cx, cy = cell.box.center
        return float(np.hypot(cx / width - 0.5, cy / height - 0.5))

    return min(near, key=off_centre)


def write_crop_dataset(
    source: str | Path,
    out_dir: str | Path,
    params: FieldParams | None = None,
    quality: int = 95,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the white-cell crop of every image of a class-folder dataset.

    Args:
        source: ``ROOT/<class>/*`` or ``ROOT/<split>/<class>/*`` images (any nesting: the relative
            path is kept; the class is the image's parent folder).
        out_dir: output root (created); crops are JPEG at the source's relative path and name.
        params: finder tuning (default: adaptive, red-cell diameter measured per image).
        quality: JPEG quality of the crops.
        progress: called with (images done, images in all).

    Returns:
        Summary: ``images``, ``cropped``, ``no_cell`` (no white cell found: not written),
        ``unreadable``, ``several_found`` (the largest/most central was kept) and the same counts
        per ``split/class`` under ``by_folder``. Also written per image to ``crops.csv``.

    Raises:
        DatasetError: ``source`` holds no image, or ``out_dir`` is inside ``source``.
    """
    from PIL import Image

    source, out_dir = Path(source), Path(out_dir)
    if out_dir.resolve().is_relative_to(source.resolve()):
        raise DatasetError(f"the output folder {out_dir} must not be inside the source {source}")
    files = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise DatasetError(f"no images under {source}")
    params = params or FieldParams()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, totals, by_folder = [], Counter(), {}
    for done, path in enumerate(files, start=1):
        relative = path.relative_to(source)
        folder = str(relative.parent)
        counts = by_folder.setdefault(folder, Counter())
        row = {"file": str(relative), "split": relative.parts[0] if len(relative.parts) > 2 else "",
               "class": relative.parent.name, "found": 0}
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            row["note"] = f"unreadable: {error}"
            _count(totals, counts, "unreadable")
            rows.append(row)
            continue
        cells = locate_white_cells(image, params)
        row["found"] = len(cells)
        chosen = pick_white_cell(cells, image.shape)
        if chosen is None:
            row["note"] = "no white cell found"
            _count(totals, counts, "no_cell")
        else:
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop_square(image, chosen.box)).save(target, format="JPEG", quality=quality)
            row.update(zip(("x0", "y0", "x1", "y1"), chosen.box.as_list()), nucleus_area=chosen.nucleus_area)
            _count(totals, counts, "cropped")
            if len(cells) > 1:
                _count(totals, counts, "several_found")
        rows.append(row)
        if progress is not None:
            progress(done, len(files))
    _write_manifest(out_dir / MANIFEST_FILE, rows)
    summary = {"images": len(files), **{k: totals[k] for k in ("cropped", "no_cell", "unreadable", "several_found")},
               "by_folder": {folder: dict(counts) for folder, counts in sorted(by_folder.items())}}
    log.info("%d of %d images cropped (%d without a white cell)", summary["cropped"], len(files), summary["no_cell"])
    return summary


def _count(totals: Counter, counts: Counter, key: str) -> None:
    totals[key] += 1
    counts[key] += 1


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
