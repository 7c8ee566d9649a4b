"""Scoring a white-cell finder against YOLO boxes: reading, matching, F1 and exact counts on toy examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_segment_field import DIAMETER, synthetic_field

from hematovision.errors import DatasetError
from hematovision.segment.detection import (
    evaluate_finder,
    false_finds_in_wbc_free_tiles,
    is_tuning_frame,
    list_yolo_frames,
    read_yolo_boxes,
    score_frame,
    summarize,
    tint,
)
from hematovision.segment.field import Box, FieldParams, locate_white_cells


def test_yolo_boxes_are_read_in_pixels_and_clipped(tmp_path: Path) -> None:
    labels = tmp_path / "a.txt"
    labels.write_text("0 0.5 0.5 0.2 0.4\n1 0.05 0.5 0.2 0.2\n\n7 0.5 0.5 0.1 0.1\n")
    boxes = read_yolo_boxes(labels, width=200, height=100)
    assert [(b.label, b.as_list()) for b in boxes] == [("wbc", [80, 30, 120, 70]), ("rbc", [0, 40, 30, 60])]
    assert read_yolo_boxes(tmp_path / "missing.txt", 10, 10) == []
    labels.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DatasetError, match="a.txt:1"):
        read_yolo_boxes(labels, 10, 10)


def test_precision_recall_f1_and_exact_count_on_a_toy_example() -> None:
    truth = [Box(0, 0, 10, 10), Box(20, 20, 30, 30)]
    scores = [
        # one right, one box beside the second cell (IoU 1/3 < 0.5), one extra: TP 1, FP 2, FN 1
        score_frame("a", [Box(0, 0, 10, 10), Box(25, 20, 35, 30), Box(50, 50, 60, 60)], truth),
        # both right, count exact
        score_frame("b", [Box(1, 0, 11, 10), Box(20, 20, 30, 30)], truth),
        # nothing to find, nothing found: exact
        score_frame("c", [], []),
    ]
    assert (scores[0].tp, scores[0].fp, scores[0].fn) == (1, 2, 1)
    summary = summarize(scores)
    assert (summary["tp"], summary["fp"], summary["fn"]) == (3, 2, 1)
    assert summary["precision"] == pytest.approx(3 / 5) and summary["recall"] == pytest.approx(3 / 4)
    assert summary["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert summary["count_exact"] == pytest.approx(2 / 3)
    assert summarize([])["f1"] == 0.0


def test_tuning_third_is_fixed_by_the_name() -> None:
    names = [f"frame_{i}" for i in range(300)]
    chosen = [n for n in names if is_tuning_frame(n)]
    assert chosen == [n for n in names if is_tuning_frame(n)]
    assert 70 < len(chosen) < 130


def _yolo_folder(root: Path) -> Path:
    """Two synthetic fields with their two white cells as YOLO boxes, and one frame without labels."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image, truth = synthetic_field()
    height, width = image.shape[:2]
    for name in ("f1", "f2"):
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        lines = [f"0 {cx / width} {cy / height} {56 / width} {56 / height}" for cy, cx in truth["wbc"]]
        lines += [f"1 {cx / width} {cy / height} {DIAMETER / width} {DIAMETER / height}" for cy, cx in truth["rbc"]]
        (root / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    Image.fromarray(np.full((60, 60, 3), 228, np.uint8)).save(root / "images" / "blank.png")
    return root


def test_a_finder_is_scored_on_a_yolo_folder_also_tinted_and_rescaled(tmp_path: Path) -> None:
    frames = list_yolo_frames(_yolo_folder(tmp_path / "set"))
    assert [f.stem for f in frames] == ["blank", "f1", "f2"]

    def find(image: np.ndarray) -> list[Box]:
        return [cell.box for cell in locate_white_cells(image)]

    plain = summarize(evaluate_finder(frames, find))
    assert (plain["tp"], plain["fp"], plain["fn"], plain["count_exact"]) == (4, 0, 0, 1.0)
    cyan = summarize(evaluate_finder(frames, find, transform=lambda im: tint(im, (0.55, 0.92, 1.0))))
    assert cyan["f1"] == 1.0
    smaller = summarize(evaluate_finder(frames, find, scale=0.6))
    assert smaller["f1"] == 1.0
    # A finder that finds nothing scores 0, one that boxes everything has precision < 1.
    assert summarize(evaluate_finder(frames, lambda im: []))["recall"] == 0.0


def test_wbc_free_tiles_count_false_finds(tmp_path: Path) -> None:
    frames = list_yolo_frames(_yolo_folder(tmp_path / "set"))
    # The white cells sit in the right half; of the left quarters only the top one holds two
    # whole red cells: one WBC-free tile per field with labels (the blank frame has none).
    tiles, finds = false_finds_in_wbc_free_tiles(frames, lambda im: [c.box for c in locate_white_cells(im)])
    assert tiles == 2 and finds == 0
    assert false_finds_in_wbc_free_tiles(frames, lambda im: [Box(0, 0, 5, 5)]) == (2, 2)
    # The fixed-threshold finder also keeps quiet here (a BCCD-like field).
    lab = FieldParams(finder="lab", rbc_diameter=DIAMETER)
    assert false_finds_in_wbc_free_tiles(frames, lambda im: [c.box for c in locate_white_cells(im, lab)])[1] == 0


def test_a_folder_without_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images"):
        list_yolo_frames(tmp_path)
