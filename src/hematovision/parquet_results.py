"""``predict --out results.parquet``: the results as a folder of Parquet shards, appended as the job goes.

Why a folder and not one file: a Parquet file is written whole (its footer indexes the row
groups), so a single file could not grow as images are finished nor survive a Ctrl-C. A folder of
``part-NNNNN.parquet`` shards is what Ray Data, Spark, pandas (``pd.read_parquet("results.parquet")``),
pyarrow and DuckDB (``read_parquet('results.parquet/*.parquet')``) read as one table. Each shard is
written to a hidden temporary name and renamed, so every shard on disk is complete: ``--resume``
reads them back and skips the files already done (same path and content sha256).

The columns are the CSV's (:func:`hematovision.predict.csv_columns`, same names, same order) with
types instead of text: probabilities and scores are float64, a value that does not apply (the label
of an unreadable file, a lab-shift score without a reference) is null, ``error`` is ``""`` for a
readable file. The job-wide lab-shift columns are null until :meth:`ParquetResults.finish` fills
them (the score is the whole job's, known only at the end), as in the CSV.

Rows are in the order the engine finished them (the Ray engine's order depends on its workers);
sort by ``file`` when order matters.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hematovision.data.images import display_path
from hematovision.errors import HematoVisionError
from hematovision.infer.shift import LabShift

SHARD = re.compile(r"part-\d{5}\.parquet")
ROWS_PER_SHARD = 4096  # a shard per ~40 s at 100 images/s: few files, little lost when a job is killed


def require_pyarrow() -> Any:
    """``pyarrow.parquet``, or one line that says how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise HematoVisionError("Parquet output needs pyarrow, which is not installed: pip install "
                                "'hematovision[ray]' (or pip install pyarrow); or use --out .csv") from error
    return pq


def check_parquet_folder(out: Path) -> None:
    """Refuse an ``--out .parquet`` that is a file, or a folder holding anything but shards, before any work.

    Raises:
        HematoVisionError: with what to do instead.
    """
    if out.exists() and not out.is_dir():
        raise HematoVisionError(f"--out {display_path(out)} is a file; Parquet results are a folder of shards "
                                "(part-NNNNN.parquet): give a new name or remove the file")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not SHARD.fullmatch(p.name) and not p.name.startswith("."))
        if foreign:
            raise HematoVisionError(f"--out {display_path(out)} holds other files than Parquet shards "
                                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                                    "give a new or empty folder name")


class ParquetResults:
    """The same interface as :class:`hematovision.predict.ResultsFile`, writing Parquet shards.

    Args:
        out: the folder (created when missing).
        class_names: the model's classes; top_k: classes named per row.
        with_shift: the run has a lab-shift reference: per-image and job-wide score columns.
        resume: keep the shards already in ``out``; otherwise they are removed by :meth:`start`.
        rows_per_shard: rows buffered before a shard is written (:meth:`abort` writes what is buffered).

    Raises:
        HematoVisionError: resuming shards written with other columns (another model, ``--top-k``).
    """

    def __init__(self, out: Path, class_names: Sequence[str], top_k: int, with_shift: bool, resume: bool,
                 rows_per_shard: int = ROWS_PER_SHARD) -> None:
        from hematovision.predict import csv_columns

        self.pq = require_pyarrow()
        import pyarrow as pa

        self.pa = pa

        check_parquet_folder(out)
        self.out = out
        self.class_names = list(class_names)
        self.top_k = min(top_k, len(class_names))
        self.with_shift = with_shift
        self.columns = csv_columns(self.class_names, self.top_k, with_shift)
        text = {"file", "label", "error", "sha256"} | {f"top{r}" for r in range(1, self.top_k + 1)}
        self.schema = pa.schema([(name, pa.string() if name in text else pa.float64()) for name in self.columns])
        self.rows_per_shard = rows_per_shard
        # What resume and the job-wide lab-shift need of every row: file, label, sha256, image score.
        self.records: list[dict[str, Any]] = self._read_existing() if resume and out.is_dir() else []
        self._buffer: list[dict[str, Any]] = []

    def _shards(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if SHARD.fullmatch(p.name)) if self.out.is_dir() else []

    def _read_existing(self) -> list[dict[str, Any]]:
        kept = ["file", "label", "sha256"] + (["lab_shift_image_score"] if self.with_shift else [])
        records: list[dict[str, Any]] = []
        for shard in self._shards():
            if self.pq.read_schema(shard).names != self.columns:
                raise HematoVisionError(f"--resume: {display_path(shard)} has other columns than this run writes "
                                        "(another model, --top-k or version); remove the folder or choose another --out")
            records += self.pq.read_table(shard, columns=kept).to_pylist()
        return records

    def done(self) -> dict[str, str]:
        """Files already predicted: display path → sha256 (unreadable rows are not done: they are retried)."""
        return {r["file"]: r["sha256"] for r in self.records if r.get("label") and r.get("sha256")}

    def start(self, redo: set[str]) -> None:
        """Drop the rows of files predicted again (``redo``) from the shards; without resume, every shard."""
        self.out.mkdir(parents=True, exist_ok=True)
        for leftover in self.out.glob(".part-*.tmp"):  # a shard being written when the last job was killed
            leftover.unlink(missing_ok=True)
        if not self.records:
            for shard in self._shards():
                shard.unlink()
            return
        self.records = [r for r in self.records if r["file"] not in redo]
        for shard in self._shards():
            table = self.pq.read_table(shard)
            keep = [name not in redo for name in table.column("file").to_pylist()]
            if not all(keep):
                self._replace(shard, table.filter(self.pa.array(keep)))

    def write(self, rows: Sequence[Any]) -> None:
        """Buffer ``rows`` (:class:`~hematovision.predict.PredictionRow`); write a shard every ``rows_per_shard``."""
        from hematovision.predict import prediction_record

        for row in rows:
            record = prediction_record(row, self.class_names, self.top_k, self.with_shift)
            probabilities = record.pop("probabilities", {})
            record.update({f"p_{name}": p for name, p in probabilities.items()})
            self._buffer.append(record)
            self.records.append({"file": record["file"], "label": record.get("label"), "sha256": record["sha256"],
                                 "lab_shift_image_score": record.get("lab_shift_image_score")})
        if len(self._buffer) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        shards = self._shards()
        number = int(shards[-1].name[5:10]) + 1 if shards else 0
        table = self.pa.Table.from_pylist(self._buffer, schema=self.schema)  # missing keys are null
        self._replace(self.out / f"part-{number:05d}.parquet", table)
        self._buffer.clear()

    def _replace(self, shard: Path, table: Any) -> None:
        """Write ``table`` to ``shard`` through a hidden temporary file: a shard is whole or absent."""
        tmp = self.out / f".{shard.stem}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self.pq.write_table(table, tmp)
            os.replace(tmp, shard)
        finally:
            tmp.unlink(missing_ok=True)

    def image_shift_scores(self) -> list[float]:
        """The per-image lab-shift scores of every row (resumed ones included)."""
        return [float(r["lab_shift_image_score"]) for r in self.records if r.get("lab_shift_image_score") is not None]

    def finish(self, lab_shift: LabShift | None) -> None:
        """Write what is buffered; with a shift reference, fill the job-wide columns of every shard."""
        from hematovision.predict import job_shift_fields

        self._flush()
        if not self.with_shift:
            return
        fields = job_shift_fields(lab_shift)
        for shard in self._shards():
            table = self.pq.read_table(shard)
            for name, value in fields.items():
                column = self.pa.array([value] * table.num_rows, self.pa.float64())
                table = table.set_column(table.schema.get_field_index(name), name, column)
            self._replace(shard, table)

    def abort(self) -> None:
        """Interrupted: write what is buffered (shards on disk are complete); with nothing done, no folder."""
        self._flush()
        if not self.records and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def close(self) -> None:
        """Nothing is held open between shards (the same interface as the CSV file)."""
