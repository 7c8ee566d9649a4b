"""Counting the cells of one sample: every field's counts and box overlay, and the differential.

:func:`count_fields` is what ``hematovision count`` runs. It finds the cells of each field with
:func:`hematovision.segment.field.analyze_field`, writes ``<stem>_boxes.png`` per field,
``counts.csv`` (one row per field), ``summary.json`` and, when a classifier types the white
cells, the differential report of :func:`hematovision.segment.differential.write_differential`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematovision._io import atomic_write, write_json
from hematovision.data.images import ImageLoadError, display_path, load_rgb
from hematovision.errors import HematoVisionError
from hematovision.segment.differential import DEFAULT_REVIEW_BELOW, CellRecord, write_differential
from hematovision.segment.field import (
    WHITE_CELL_TYPES,
    Classifier,
    FieldParams,
    analyze_field,
    crop_square,
    draw_field,
)

if TYPE_CHECKING:
    from hematovision.infer.predictor import Predictor

log = logging.getLogger(__name__)

COUNTS_FILE = "counts.csv"
SUMMARY_FILE = "summary.json"
_COUNT_COLUMNS = ["image", "wbc", "rbc", "platelet", "types", "note"]


def load_classifier(run_dir: str | Path) -> Predictor:
    """Load the white-cell classifier of a run folder made by ``hematovision train``.

    Raises:
        HematoVisionError: the folder is not a classifier run folder (no model card).
    """
    from hematovision.infer.predictor import Predictor
    from hematovision.run import CARD_FILE

    run_dir = Path(run_dir)
    if not (run_dir / CARD_FILE).is_file():
        raise HematoVisionError(f"{run_dir} is not a classifier run folder (no {CARD_FILE})")
    return Predictor.from_run_dir(run_dir)


def count_fields(
    paths: Sequence[Path],
    out_dir: str | Path,
    classifier: Classifier | None = None,
    rbc_diameter: float | None = None,
    review_below: float = DEFAULT_REVIEW_BELOW,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Count white cells, red cells and platelets in the fields of one sample.

    Args:
        paths: the sample's field images; unreadable ones are listed in ``counts.csv`` and skipped.
        out_dir: output folder (created).
        classifier: types the white cells; without it they are counted, not typed, and no
            differential is written.
        rbc_diameter: red-cell diameter in pixels (BCCD's 640x480 fields: about 100); ``None``
            measures it in each field.
        review_below: cells whose top probability is below this are listed for review.
        progress: called with one line per field (what was found, or why it was skipped);
            logged when not given.

    Returns:
        The summary also written to ``summary.json``: ``images``, ``readable`` (fields read),
        ``totals`` (``wbc``, ``rbc``, ``platelet`` over the readable fields), ``classified``
        (white cells typed) and ``lab_shift`` (the white cells' lab-shift score, when the classifier
        has a calibrated reference; see :mod:`hematovision.infer.shift`).
    """
    report = progress or log.info
    # The sample's white cells are one batch for the lab-shift score (a Predictor collects it).
    if hasattr(classifier, "reset_shift"):
        classifier.reset_shift()
    out_dir = Path(out_dir)
    params = FieldParams(rbc_diameter=rbc_diameter)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, cells, empty = [], [], []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageLoadError as error:
            report(f"skipped: {error}")
            rows.append({**dict.fromkeys(_COUNT_COLUMNS, ""), "image": display_path(path), "note": f"unreadable: {error}"})
            continue
        result = analyze_field(image, params, classifier)
        overlay = draw_field(image, result)
        atomic_write(out_dir / f"{path.stem}_boxes.png", lambda tmp, o=overlay: _save_png(o, tmp))
        report(f"{display_path(path.name)}: {result.message}")
        if not result.white_cells:
            empty.append(display_path(path))
        for index, cell in enumerate(result.white_cells, start=1):
            if cell.cell_type is None:
                continue
            ranked = sorted(cell.probabilities.items(), key=lambda item: -item[1])
            second = ranked[1] if len(ranked) > 1 else ("", 0.0)
            cells.append(CellRecord(
                image=display_path(path), index=index, box=cell.box.as_list(), cell_type=cell.cell_type,
                probability=float(cell.probability or 0.0), thumbnail=crop_square(image, cell.box),
                second_type=second[0], second_probability=float(second[1]),
            ))
        rows.append({
            "image": display_path(path), **result.counts,
            "types": ";".join(c.cell_type or "" for c in result.white_cells),
            "note": "" if result.white_cells else "no white cell found",
        })

    _write_counts(out_dir / COUNTS_FILE, rows)
    counted = [r for r in rows if r["wbc"] != ""]
    totals = {kind: int(sum(r[kind] for r in counted)) for kind in ("wbc", "rbc", "platelet")}
    summary = {"images": len(paths), "readable": len(counted), "totals": totals, "classified": len(cells)}
    shift = classifier.lab_shift() if hasattr(classifier, "lab_shift") else None
    if shift is not None:
        summary["lab_shift"] = shift.to_dict()
    if classifier is not None:
        # The differential lists the white-cell types; a classifier of other classes lists its own.
        types = [name for name in classifier.class_names if name in WHITE_CELL_TYPES] or list(classifier.class_names)
        write_differential(
            cells, types, out_dir, title=f"Differential count ({len(counted)} images)",
            review_below=review_below, images_without_cells=empty,
        )
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _write_counts(path: Path, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=_COUNT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")
