"""Crop-first datasets: each frame's white cell cropped into the same split/class layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_segment_field import synthetic_field

from hematovision.errors import DatasetError
from hematovision.segment.crops import MANIFEST_FILE, pick_white_cell, write_crop_dataset
from hematovision.segment.field import Box, WhiteCell


def _frames(root: Path) -> Path:
    """TRAIN/NEUTROPHIL (2 fields), TEST/LYMPHOCYTE (1 field, 1 blank), and a README."""
    image, _ = synthetic_field()
    left = np.ascontiguousarray(image[:, 120:])  # both white cells, a few red cells
    for relative in ("TRAIN/NEUTROPHIL/a.jpeg", "TRAIN/NEUTROPHIL/b.jpeg", "TEST/LYMPHOCYTE/c.jpeg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(left).save(root / relative, quality=95)
    Image.fromarray(np.full((120, 160, 3), 228, np.uint8)).save(root / "TEST/LYMPHOCYTE/blank.jpeg")
    (root / "README.md").write_text("not an image")
    return root


def test_crops_keep_the_layout_and_file_names(tmp_path: Path) -> None:
    source = _frames(tmp_path / "frames")
    summary = write_crop_dataset(source, tmp_path / "crops")
    assert (summary["images"], summary["cropped"], summary["no_cell"], summary["several_found"]) == (4, 3, 1, 3)
    assert summary["by_folder"]["TEST/LYMPHOCYTE"] == {"cropped": 1, "no_cell": 1, "several_found": 1}
    crops = sorted(str(p.relative_to(tmp_path / "crops")) for p in (tmp_path / "crops").rglob("*.jpeg"))
    assert crops == ["TEST/LYMPHOCYTE/c.jpeg", "TRAIN/NEUTROPHIL/a.jpeg", "TRAIN/NEUTROPHIL/b.jpeg"]
    crop = np.asarray(Image.open(tmp_path / "crops" / "TRAIN/NEUTROPHIL/a.jpeg"))
    assert crop.shape[0] == crop.shape[1] and 40 <= crop.shape[0] <= 80  # one white cell, square
    with open(tmp_path / "crops" / MANIFEST_FILE, newline="") as handle:
        rows = {r["file"]: r for r in csv.DictReader(handle)}
    assert rows["TEST/LYMPHOCYTE/blank.jpeg"]["note"] == "no white cell found"
    assert rows["TRAIN/NEUTROPHIL/a.jpeg"]["split"] == "TRAIN" and rows["TRAIN/NEUTROPHIL/a.jpeg"]["found"] == "2"


def test_the_larger_then_more_central_cell_is_kept() -> None:
    def cell(x: float, area: int) -> WhiteCell:
        return WhiteCell(box=Box(x, 40, x + 20, 60), nucleus_area=area)

    edge, centre, small = cell(0, 1000), cell(90, 900), cell(50, 300)
    assert pick_white_cell([edge, centre, small], (100, 200, 3)) is centre  # 900 is within 20 % of 1000
    assert pick_white_cell([cell(0, 1000), cell(90, 500)], (100, 200, 3)).nucleus_area == 1000
    assert pick_white_cell([], (100, 200, 3)) is None


def test_bad_source_or_output_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        write_crop_dataset(tmp_path / "empty", tmp_path / "out")
    source = _frames(tmp_path / "frames")
    with pytest.raises(DatasetError, match="inside"):
        write_crop_dataset(source, source / "crops")
