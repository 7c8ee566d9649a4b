"""``hematovision predict``: classify image files and folders, and write the answers as CSV or JSON.

The model side is :class:`hematovision.infer.predictor.Predictor`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write, sha256_file, write_json
from hematovision.data.images import ImageLoadError, display_path, is_image_file, load_rgb
from hematovision.errors import HematoVisionError
from hematovision.infer.predictor import Predictor
from hematovision.infer.shift import LabShift
from hematovision.infer.stream import StreamResult
from hematovision.run import METRICS_FILE

OUTPUT_FORMATS = (".csv", ".json", ".parquet")


@dataclass
class PredictionRow:
    """One file's prediction, or the reason it could not be read.

    ``file`` is the path as :func:`~hematovision.data.images.display_path` shows it: a name that is
    not valid UTF-8 has ``\\xNN`` escapes, so it can be written to CSV and JSON. ``sha256`` is the
    content hash of a readable file (what ``--resume`` keys on), ``shift_score`` the image's own
    lab-shift score (``None`` without a shift reference).
    """

    file: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    sha256: str = ""
    shift_score: float | None = None


def check_output_path(out: str | Path) -> Path:
    """Refuse an output file the predictions cannot be written to, before any work is done.

    ``.parquet`` is a folder of shards (:mod:`hematovision.parquet_results`): it needs pyarrow and
    may not be a file or a folder holding other files.

    Raises:
        HematoVisionError: the extension is not ``.csv``, ``.json`` or ``.parquet``, or ``out`` is a
            folder (a file for ``.parquet``).
    """
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        from hematovision.parquet_results import check_parquet_folder, require_pyarrow

        require_pyarrow()
        check_parquet_folder(out)
        return out
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
    """Predict every file in batches, all rows in memory; unreadable files become rows with an ``error``.

    The reference for :func:`stream_to_file` (which the ``predict`` command uses): both give the
    same rows. The files are one batch for the lab-shift score: ``predictor.lab_shift()`` afterwards
    covers them all.
    """
    from tqdm.auto import tqdm

    predictor.reset_shift()
    rows = [PredictionRow(display_path(path)) for path in paths]  # in the order given
    for start in tqdm(range(0, len(paths), batch_size), desc="predicting", unit="batch"):
        images, readable = [], []
        for row, path in zip(rows[start : start + batch_size], paths[start : start + batch_size]):
            try:
                images.append(load_rgb(path))
                row.sha256 = sha256_file(path)
                readable.append(row)
            except ImageLoadError as error:
                row.error = str(error)
        if images:
            seen = len(predictor.shift.scores) if predictor.shift is not None else 0
            for row, probs in zip(readable, predictor.predict(images, batch_size)):
                row.probabilities = probs
            if predictor.shift is not None:
                for row, score in zip(readable, predictor.shift.scores[seen:]):
                    row.shift_score = score
    return rows


def prediction_record(row: PredictionRow, class_names: Sequence[str], top_k: int, with_shift: bool) -> dict:
    """A row as one output record: file, error, sha256, label, confidence, top-k, probabilities (JSON form)."""
    record: dict = {"file": row.file, "error": row.error or "", "sha256": row.sha256}
    if row.probabilities is not None:
        order = np.argsort(-row.probabilities)[:top_k]
        record["label"] = class_names[order[0]]
        record["confidence"] = float(row.probabilities[order[0]])
        for rank, index in enumerate(order, start=1):
            record[f"top{rank}"] = class_names[index]
            record[f"top{rank}_p"] = float(row.probabilities[index])
        record["probabilities"] = {name: float(p) for name, p in zip(class_names, row.probabilities)}
    if with_shift:
        record["lab_shift_image_score"] = None if row.shift_score is None else round(row.shift_score, 6)
    return record


def csv_columns(class_names: Sequence[str], top_k: int, with_shift: bool) -> list[str]:
    """The CSV header: file, label, confidence, top-k, one probability per class, error, sha256, lab-shift."""
    columns = ["file", "label", "confidence"] + [f"top{r}{s}" for r in range(1, top_k + 1) for s in ("", "_p")]
    columns += [f"p_{name}" for name in class_names] + ["error", "sha256"]
    if with_shift:
        columns += ["lab_shift_image_score", "lab_shift_score", "lab_shift_threshold"]
    return columns


def _csv_row(record: dict) -> dict:
    flat = {k: v for k, v in record.items() if k != "probabilities"}
    flat.update({f"p_{name}": p for name, p in record.get("probabilities", {}).items()})
    return {k: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v) for k, v in flat.items()}


def job_shift_fields(lab_shift: LabShift | None) -> dict:
    """The job-wide lab-shift columns (the same in every row: the score is the whole job's)."""
    if lab_shift is None:
        return {"lab_shift_score": None, "lab_shift_threshold": None}
    return {"lab_shift_score": round(lab_shift.score, 4),
            "lab_shift_threshold": None if lab_shift.threshold is None else round(lab_shift.threshold, 4)}


def write_predictions(rows: Sequence[PredictionRow], class_names: Sequence[str], out: str | Path, top_k: int = 3,
                      lab_shift: LabShift | None = None) -> Path:
    """Write predictions as CSV (by extension ``.csv``) or JSON, with top-k classes and all probabilities.

    Args:
        lab_shift: the lab-shift score of the batch; when given, every row also has
            ``lab_shift_image_score`` (its own), ``lab_shift_score`` and ``lab_shift_threshold``
            (the same for all rows: the score is the batch's).
    """
    out = Path(out)
    top_k = min(top_k, len(class_names))
    with_shift = lab_shift is not None
    records = [{**prediction_record(row, class_names, top_k, with_shift), **(job_shift_fields(lab_shift)
                                                                            if with_shift else {})} for row in rows]
    if out.suffix.lower() == ".json":
        return write_json(out, records)
    columns = csv_columns(class_names, top_k, with_shift)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_csv_row(record) for record in records)

    return atomic_write(out, write)


class ResultsFile:
    """The ``predict`` output written as the job goes: CSV appended and flushed per chunk, JSON at the end.

    A CSV interrupted at any point (Ctrl-C, a crash, a full disk) holds complete rows for the files
    finished so far; ``resume=True`` reads them back, so those files are skipped (see :meth:`done`).
    The job-wide lab-shift columns are blank until :meth:`finish` fills them (the score is the
    whole job's, known only at the end). JSON is one list, written by :meth:`finish` (and by
    :meth:`abort` with the records so far).

    Args:
        out: the ``.csv`` or ``.json`` file.
        class_names: the model's classes; top_k: classes named per row.
        with_shift: the run has a lab-shift reference: per-image and job-wide score columns.
        resume: keep the rows already in ``out`` (a missing file starts empty).

    Raises:
        HematoVisionError: resuming a file written with other columns (another model, ``--top-k``) or
            that is not a prediction file.
    """

    def __init__(self, out: Path, class_names: Sequence[str], top_k: int, with_shift: bool, resume: bool) -> None:
        self.out = out
        self.class_names = list(class_names)
        self.top_k = min(top_k, len(class_names))
        self.with_shift = with_shift
        self.is_json = out.suffix.lower() == ".json"
        self.columns = csv_columns(self.class_names, self.top_k, with_shift)
        self.records: list[dict] = self._read_existing() if resume and out.is_file() else []
        self._handle: io.TextIOWrapper | None = None

    def _read_existing(self) -> list[dict]:
        hint = "remove it or choose another --out to start afresh"
        if self.is_json:
            try:
                records = json.loads(self.out.read_text(encoding="utf-8"))
            except ValueError as error:
                raise HematoVisionError(f"--resume: {display_path(self.out)} is not valid JSON ({error}); {hint}") from error
            if not isinstance(records, list) or not all(isinstance(r, dict) and "file" in r for r in records):
                raise HematoVisionError(f"--resume: {display_path(self.out)} is not a list of predictions; {hint}")
            return records
        with open(self.out, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != self.columns:
                raise HematoVisionError(f"--resume: {display_path(self.out)} has other columns than this run writes "
                                        f"(another model, --top-k or version); {hint}")
            # A row cut short (the machine stopped mid-write) has missing fields: it is predicted again.
            return [row for row in reader if None not in row.values() and None not in row]

    def done(self) -> dict[str, str]:
        """Files already predicted: display path → sha256 (unreadable rows are not done: they are retried)."""
        return {r["file"]: r["sha256"] for r in self.records if r.get("label") and r.get("sha256")}

    def start(self, redo: set[str]) -> None:
        """Drop the old rows of files predicted again (``redo``: changed or unreadable before); open for writing."""
        self.records = [r for r in self.records if r["file"] not in redo]
        if self.is_json:
            return
        kept = self.records

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(kept)

        atomic_write(self.out, write)
        self._handle = open(self.out, "a", newline="", encoding="utf-8")

    def write(self, rows: Sequence[PredictionRow]) -> None:
        """Append ``rows``: for CSV one write and a flush, so the file never ends inside a row."""
        records = [prediction_record(row, self.class_names, self.top_k, self.with_shift) for row in rows]
        if self._handle is None:
            self.records += records
            return
        chunk = io.StringIO()
        csv.DictWriter(chunk, fieldnames=self.columns).writerows(_csv_row(record) for record in records)
        self._handle.write(chunk.getvalue())
        self._handle.flush()
        self.records += [{"file": r["file"], "label": r.get("label", ""), "sha256": r["sha256"],
                          "lab_shift_image_score": r.get("lab_shift_image_score")} for r in records]

    def image_shift_scores(self) -> list[float]:
        """The per-image lab-shift scores of every row (resumed ones included)."""
        scores = []
        for record in self.records:
            value = record.get("lab_shift_image_score")
            if value not in (None, ""):
                scores.append(float(value))
        return scores

    def finish(self, lab_shift: LabShift | None) -> None:
        """Complete the file: CSV gets the job-wide lab-shift columns filled in, JSON is written."""
        self.close()
        if self.is_json:
            fields = job_shift_fields(lab_shift) if self.with_shift else {}
            write_json(self.out, [{**record, **fields} for record in self.records])
            return
        if not self.with_shift:
            return
        fields = {k: ("" if v is None else f"{v:.6f}") for k, v in job_shift_fields(lab_shift).items()}

        def write(tmp: Path) -> None:
            with open(self.out, newline="", encoding="utf-8") as source, open(tmp, "w", newline="", encoding="utf-8") as dest:
                writer = csv.DictWriter(dest, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows({**row, **fields} for row in csv.DictReader(source))

        atomic_write(self.out, write)

    def abort(self) -> None:
        """Interrupted: keep what is done (CSV rows are on disk already; JSON gets the records so far).

        With nothing done (e.g. a damaged model failed on the first batch) no file is left behind: an
        empty results file would read as "these images were predicted".
        """
        self.close()
        if not self.records:
            self.out.unlink(missing_ok=True)
            return
        if self.is_json:
            write_json(self.out, self.records)

    def close(self) -> None:
        """Close the CSV file (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class StreamSummary:
    """What :func:`stream_to_file` did.

    Attributes:
        classified: files predicted in this call; skipped: files already in the output (``--resume``).
        errors: the unreadable files' reasons, in order.
        lab_shift: the job-wide lab-shift score, resumed rows included (``None`` without a reference).
    """

    classified: int
    skipped: int
    errors: list[str]
    lab_shift: LabShift | None


def stream_to_file(predictor: Predictor, paths: Sequence[Path], out: Path, top_k: int = 3, batch_size: int | None = None,
                   resume: bool = False, workers: int | None = None, chunk: int = 256,
                   on_skip: Callable[[int, int], None] | None = None,
                   engine: Callable[[Sequence[Path]], Generator[StreamResult, None, None]] | None = None) -> StreamSummary:
    """Predict ``paths`` in bounded memory and write ``out`` as the job goes (see :class:`ResultsFile`).

    Args:
        resume: skip files whose path and content sha256 are already in ``out``; a changed file is
            predicted again (its old row dropped), and so is a file that was unreadable before.
        workers: decoding threads (see :mod:`hematovision.infer.stream`).
        chunk: rows per append to the CSV.
        on_skip: called with (skipped, total) before predicting, e.g. to print how many were skipped.
        engine: gives the results of the files still to do, in any order (e.g. a partial of
            :func:`hematovision.infer.ray_engine.ray_predictions`); default: the local streaming engine.
    """
    from contextlib import closing

    from hematovision.infer.stream import stream_predictions
    from hematovision.parquet_results import ParquetResults

    results_type = ParquetResults if out.suffix.lower() == ".parquet" else ResultsFile
    results = results_type(out, predictor.class_names, top_k, predictor.shift is not None, resume)
    done = results.done()
    todo, skipped = [], 0
    for path in paths:
        shown = display_path(path)
        if shown in done and _same_content(path, done[shown]):
            skipped += 1
        else:
            todo.append(path)
    if on_skip is not None:
        on_skip(skipped, len(paths))
    results.start({display_path(path) for path in todo})
    predictor.reset_shift()
    errors: list[str] = []
    classified = 0
    pending: list[PredictionRow] = []
    try:
        source = engine(todo) if engine is not None else stream_predictions(predictor, todo, batch_size, workers,
                                                                             hash_files=True)
        with closing(source) as stream:
            for result in stream:
                row = PredictionRow(display_path(result.path), result.probabilities, result.error, result.sha256,
                                    result.shift_score)
                pending.append(row)
                if row.error:
                    errors.append(row.error)
                else:
                    classified += 1
                if len(pending) >= chunk:
                    results.write(pending)
                    pending.clear()
        results.write(pending)
    except BaseException:  # Ctrl-C or a failure: what is finished stays valid and resumable
        results.write(pending)
        results.abort()
        raise
    lab_shift = predictor.shift.reference.assess(results.image_shift_scores()) if predictor.shift is not None else None
    results.finish(lab_shift)
    return StreamSummary(classified, skipped, errors, lab_shift)


def _same_content(path: Path, sha256: str) -> bool:
    try:
        return sha256_file(path) == sha256
    except OSError:
        return False


def load_metrics(run_dir: str | Path) -> dict:
    """The test metrics stored in a run folder."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())
