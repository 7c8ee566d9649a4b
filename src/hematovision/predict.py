"""``hematovision predict``: classify image files and folders, and write the answers as CSV or JSON.

The model side is :class:`hematovision.infer.predictor.Predictor`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write, write_json
from hematovision.data.images import ImageLoadError, display_path, is_image_file, load_rgb
from hematovision.errors import HematoVisionError
from hematovision.infer.predictor import Predictor
from hematovision.infer.shift import LabShift
from hematovision.run import METRICS_FILE

OUTPUT_FORMATS = (".csv", ".json")


@dataclass
class PredictionRow:
    """One file's prediction, or the reason it could not be read.

    ``file`` is the path as :func:`~hematovision.data.images.display_path` shows it: a name that is
    not valid UTF-8 has ``\\xNN`` escapes, so it can be written to CSV and JSON.
    """

    file: str
    probabilities: np.ndarray | None = None
    error: str | None = None


def check_output_path(out: str | Path) -> Path:
    """Refuse an output file the predictions cannot be written to, before any work is done.

    Raises:
        HematoVisionError: the extension is not ``.csv`` or ``.json``, or ``out`` is a folder.
    """
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise HematoVisionError(f"--out {display_path(out)}: unsupported output format {out.suffix or '(none)'!r}; "
                                f"use one of {', '.join(OUTPUT_FORMATS)}")
    if out.is_dir():
        raise HematoVisionError(f"--out {display_path(out)} is a folder; give a file name ending in .csv or .json")
    return out


def collect_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (recursively, image extensions only) and keep files as given.

    In folders, every entry with an image extension that is not itself a folder is kept, so a
    FIFO, a socket or a dangling symbolic link becomes an unreadable row with its reason rather
    than disappearing; such entries are never opened (see :func:`~hematovision.data.images.load_rgb`).
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_image_file(p) and not p.is_dir())
        else:
            found.append(path)
    return found


def predict_files(predictor: Predictor, paths: Sequence[Path], batch_size: int = 32) -> list[PredictionRow]:
    """Predict every file in batches; unreadable files become rows with an ``error``.

    The files are one batch for the lab-shift score: ``predictor.lab_shift()`` afterwards covers them all.
    """
    from tqdm.auto import tqdm

    predictor.reset_shift()
    rows = [PredictionRow(display_path(path)) for path in paths]  # in the order given
    for start in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch"):
        images, readable = [], []
        for row, path in zip(rows[start : start + batch_size], paths[start : start + batch_size]):
            try:
                images.append(load_rgb(path))
                readable.append(row)
            except ImageLoadError as error:
                row.error = str(error)
        if images:
            for row, probs in zip(readable, predictor.predict(images, batch_size)):
                row.probabilities = probs
    return rows


def write_predictions(rows: Sequence[PredictionRow], class_names: Sequence[str], out: str | Path, top_k: int = 3,
                      lab_shift: LabShift | None = None) -> Path:
    """Write predictions as CSV (by extension ``.csv``) or JSON, with top-k classes and all probabilities.

    Args:
        lab_shift: the lab-shift score of the batch; when given, every row also has ``lab_shift_score``
            and ``lab_shift_threshold`` (the same for all rows: the score is the batch's).
    """
    out = Path(out)
    top_k = min(top_k, len(class_names))
    records = []
    for row in rows:
        record: dict = {"file": row.file, "error": row.error or ""}
        if row.probabilities is not None:
            order = np.argsort(-row.probabilities)[:top_k]
            record["label"] = class_names[order[0]]
            record["confidence"] = float(row.probabilities[order[0]])
            for rank, index in enumerate(order, start=1):
                record[f"top{rank}"] = class_names[index]
                record[f"top{rank}_p"] = float(row.probabilities[index])
            record["probabilities"] = {name: float(p) for name, p in zip(class_names, row.probabilities)}
        if lab_shift is not None:
            record["lab_shift_score"] = round(lab_shift.score, 4)
            record["lab_shift_threshold"] = None if lab_shift.threshold is None else round(lab_shift.threshold, 4)
        records.append(record)
    if out.suffix.lower() == ".json":
        return write_json(out, records)
    columns = ["file", "label", "confidence"] + [f"top{r}{s}" for r in range(1, top_k + 1) for s in ("", "_p")]
    columns += [f"p_{name}" for name in class_names] + ["error"]
    if lab_shift is not None:
        columns += ["lab_shift_score", "lab_shift_threshold"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for record in records:
                flat = {k: v for k, v in record.items() if k != "probabilities"}
                flat.update({f"p_{name}": p for name, p in record.get("probabilities", {}).items()})
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in flat.items()})

    return atomic_write(out, write)


def load_metrics(run_dir: str | Path) -> dict:
    """The test metrics stored in a run folder."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())
