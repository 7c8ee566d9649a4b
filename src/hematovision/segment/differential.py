"""The differential count: how many white cells of each type one sample holds, beside the normal ranges.

A manual differential classifies 100 (or 200) white cells and reports each type as a
percentage. Here the cells are those found and classified in all images of one sample
(see :mod:`hematovision.segment.field`). Each percentage comes with a 95 % Wilson interval,
because with few cells a percentage is very uncertain (with 100 cells, 5 % means anything from
2 % to 11 %), and cells the classifier is unsure about are listed for review with a thumbnail.

Reference ranges (adults, % of white cells) are those MedlinePlus gives for the blood
differential test (https://medlineplus.gov/ency/article/003657.htm): neutrophils 40–60,
lymphocytes 20–40, monocytes 2–8, eosinophils 1–4, basophils 0.5–1. Ranges differ between
laboratories, ages and methods; they are shown for orientation, and this is not a diagnosis.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write, write_text
from hematovision.data.classes import display_name

REFERENCE_RANGES = {
    "neutrophil": (40.0, 60.0),
    "lymphocyte": (20.0, 40.0),
    "monocyte": (2.0, 8.0),
    "eosinophil": (1.0, 4.0),
    "basophil": (0.5, 1.0),
}
REFERENCE_SOURCE = "MedlinePlus, Blood differential test (adults)"
DEFAULT_REVIEW_BELOW = 0.6


@dataclass
class CellRecord:
    """One classified white cell of the sample.

    Attributes:
        image: the file it was found in.
        index: its number within that image (1-based).
        box: [x0, y0, x1, y1] in that image.
        cell_type: the predicted class.
        probability: the predicted class's probability.
        thumbnail: (h, w, 3) uint8 crop for the review list.
        second_type: the runner-up class (what a reviewer should consider).
        second_probability: its probability.
    """

    image: str
    index: int
    box: list[int]
    cell_type: str
    probability: float
    thumbnail: np.ndarray
    second_type: str = ""
    second_probability: float = 0.0


def wilson_interval(count: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion, in percent ((0, 0) when total is 0)."""
    if total == 0:
        return 0.0, 0.0
    p = count / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def differential_table(cells: Sequence[CellRecord], class_names: Sequence[str]) -> list[dict]:
    """Counts, percentages, intervals and reference ranges, one row per class.

    Args:
        cells: the classified cells of one sample.
        class_names: every class the classifier knows (types with no cell get a 0 row).

    Returns:
        Rows with ``type``, ``count``, ``percent``, ``ci_low``, ``ci_high``, ``reference``
        (text, "—" when there is none) and ``flag`` (``below``/``within``/``above``/"").
    """
    counts = Counter(cell.cell_type for cell in cells)
    total = len(cells)
    rows = []
    for name in class_names:
        count = counts.get(name, 0)
        percent = 100.0 * count / total if total else 0.0
        low, high = wilson_interval(count, total)
        reference = REFERENCE_RANGES.get(name)
        flag = ""
        if reference and total:
            flag = "below" if percent < reference[0] else "above" if percent > reference[1] else "within"
        rows.append({
            "type": name, "count": count, "percent": percent, "ci_low": low, "ci_high": high,
            "reference": f"{reference[0]:g}–{reference[1]:g} %" if reference else "—", "flag": flag,
        })
    return rows


def review_list(cells: Sequence[CellRecord], below: float = DEFAULT_REVIEW_BELOW) -> list[CellRecord]:
    """Cells whose predicted-class probability is below ``below``, least confident first."""
    return sorted((c for c in cells if c.probability < below), key=lambda c: c.probability)


def write_differential(
    cells: Sequence[CellRecord],
    class_names: Sequence[str],
    out_dir: str | Path,
    title: str = "Differential count",
    review_below: float = DEFAULT_REVIEW_BELOW,
    images_without_cells: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the differential as Markdown, HTML and CSV, with review thumbnails.

    Files: ``differential.md`` (thumbnails as files in ``review/``), ``differential.html``
    (self-contained: thumbnails embedded), ``differential.csv`` (the table) and ``cells.csv``
    (every cell with its type and probability).

    Args:
        cells: the classified cells of the sample.
        class_names: the classifier's classes.
        out_dir: output folder.
        title: heading of the report.
        review_below: cells with a lower top probability are listed for review.
        images_without_cells: images in which no white cell was found (listed in the report).

    Returns:
        The written paths by kind (``markdown``, ``html``, ``csv``, ``cells``).
    """
    out_dir = Path(out_dir)
    table = differential_table(cells, class_names)
    review = review_list(cells, review_below)
    review_dir = out_dir / "review"
    thumbs = {}
    for cell in review:
        name = f"{Path(cell.image).stem}_cell{cell.index}.png"
        data = _png_bytes(cell.thumbnail)
        atomic_write(review_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
        thumbs[id(cell)] = (f"review/{name}", base64.b64encode(data).decode("ascii"))

    total = len(cells)
    lines = [f"# {title}", ""]
    lines.append(f"{total} white cell{'s' if total != 1 else ''} classified.")
    if total < 100:
        lines.append(f"A manual differential counts at least 100 cells; with {total}, the intervals below are wide.")
    lines += ["", "| type | count | % | 95 % CI | reference | |", "|---|---:|---:|---|---|---|"]
    for row in table:
        lines.append(
            f"| {display_name(row['type'])} | {row['count']} | {row['percent']:.1f} | "
            f"{row['ci_low']:.1f}–{row['ci_high']:.1f} | {row['reference']} | {row['flag']} |"
        )
    lines += ["", f"Reference ranges: {REFERENCE_SOURCE}; they vary between laboratories. Not a diagnosis.", ""]
    lines.append(f"## Cells to review (top probability < {review_below:g}): {len(review)}")
    lines.append("")
    if review:
        lines += ["| cell | image | box | predicted | p | runner-up |", "|---|---|---|---|---:|---|"]
        for cell in review:
            lines.append(
                f"| ![]({thumbs[id(cell)][0]}) | {Path(cell.image).name} #{cell.index} | {cell.box} | "
                f"{display_name(cell.cell_type)} | {cell.probability:.2f} | "
                f"{display_name(cell.second_type)} {cell.second_probability:.2f} |"
            )
    else:
        lines.append("None.")
    if images_without_cells:
        lines += ["", f"## Images with no white cell found: {len(images_without_cells)}", ""]
        lines += [f"- {Path(name).name}" for name in images_without_cells]
    markdown = "\n".join(lines) + "\n"

    paths = {
        "markdown": write_text(out_dir / "differential.md", markdown),
        "html": write_text(out_dir / "differential.html",
                           _html_report(title, total, table, review, thumbs, review_below, images_without_cells)),
        "csv": _write_csv(out_dir / "differential.csv", table),
        "cells": _write_csv(out_dir / "cells.csv", [
            {"image": c.image, "cell": c.index, "x0": c.box[0], "y0": c.box[1], "x1": c.box[2], "y1": c.box[3],
             "type": c.cell_type, "probability": round(c.probability, 4), "second_type": c.second_type,
             "second_probability": round(c.second_probability, 4), "review": c.probability < review_below}
            for c in cells
        ]),
    }
    return paths


def _html_report(
    title: str, total: int, table: list[dict], review: list[CellRecord], thumbs: dict,
    review_below: float, images_without_cells: Sequence[str],
) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(display_name(r['type']))}</td><td>{r['count']}</td><td>{r['percent']:.1f}</td>"
        f"<td>{r['ci_low']:.1f}–{r['ci_high']:.1f}</td><td>{esc(r['reference'])}</td><td>{r['flag']}</td></tr>"
        for r in table
    )
    review_rows = "".join(
        f"<tr><td><img alt='cell' src='data:image/png;base64,{thumbs[id(c)][1]}' width='96'></td>"
        f"<td>{esc(Path(c.image).name)} #{c.index}</td><td>{c.box}</td><td>{esc(display_name(c.cell_type))}</td>"
        f"<td>{c.probability:.2f}</td><td>{esc(display_name(c.second_type))} {c.second_probability:.2f}</td></tr>"
        for c in review
    )
    missing = "".join(f"<li>{esc(Path(n).name)}</li>" for n in images_without_cells)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head><body>
<h1>{esc(title)}</h1><p>{total} white cells classified.</p>
<table><tr><th>type</th><th>count</th><th>%</th><th>95 % CI</th><th>reference</th><th></th></tr>{rows}</table>
<p>Reference ranges: {esc(REFERENCE_SOURCE)}; they vary between laboratories. Not a diagnosis.</p>
<h2>Cells to review (top probability &lt; {review_below:g}): {len(review)}</h2>
<table><tr><th>cell</th><th>image</th><th>box</th><th>predicted</th><th>p</th><th>runner-up</th></tr>{review_rows}</table>
{f'<h2>Images with no white cell found: {len(images_without_cells)}</h2><ul>{missing}</ul>' if missing else ''}
</body></html>
"""


def _write_csv(path: Path, rows: list[dict]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            if not rows:
                return
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})

    return atomic_write(path, write)


def _png_bytes(image: np.ndarray, max_side: int = 128) -> bytes:
    from PIL import Image

    thumb = Image.fromarray(np.asarray(image))
    thumb.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()
