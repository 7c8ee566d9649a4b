"""Whole-field counting on synthetic fields with a known number of cells; boxes, VOC, matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hematovision.errors import DatasetError, HematoVisionError
from hematovision.segment.field import (
    Box,
    FieldParams,
    analyze_field,
    crop_square,
    draw_field,
    match_boxes,
    match_points_to_boxes,
    read_voc_boxes,
)

BACKGROUND = (228, 228, 232)   # BCCD-like pale grey
RED_CELL = (205, 150, 160)     # pink: a* > 0, b* ≈ 0
CYTOPLASM = (205, 195, 225)    # pale lavender: b* above the stain threshold
NUCLEUS = (105, 80, 195)       # blue-purple: b* ≈ -50
DIAMETER = 40.0                # red-cell diameter in this synthetic field


def _disc(image: np.ndarray, cy: float, cx: float, r: float, colour: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def synthetic_field(seed: int = 0) -> tuple[np.ndarray, dict]:
    """A 240x320 field: 7 separate red cells, 2 white cells (nucleus in cytoplasm), 3 platelets."""
    rng = np.random.default_rng(seed)
    image = np.empty((240, 320, 3), np.float64)
    image[:] = BACKGROUND
    red = [(30, 30), (30, 130), (120, 30), (200, 40), (200, 150), (120, 150), (30, 290)]
    for cy, cx in red:
        _disc(image, cy, cx, DIAMETER / 2, RED_CELL)
    white = [(70, 230), (180, 260)]
    for cy, cx in white:
        _disc(image, cy, cx, 28, CYTOPLASM)
        _disc(image, cy, cx, 15, NUCLEUS)
    platelets = [(80, 90), (160, 95), (225, 205)]
    for cy, cx in platelets:
        _disc(image, cy, cx, 4.5, NUCLEUS)
    image += rng.normal(0, 2.0, image.shape)
    truth = {"rbc": red, "wbc": white, "platelet": platelets}
    return np.clip(image, 0, 255).astype(np.uint8), truth


def test_counts_a_synthetic_field_exactly() -> None:
    image, truth = synthetic_field()
    result = analyze_field(image, FieldParams(rbc_diameter=DIAMETER))
    assert result.counts == {"wbc": 2, "rbc": 7, "platelet": 3}
    # Each white cell's box holds its centre; each red-cell centre is near a true one.
    for cy, cx in truth["wbc"]:
        assert sum(c.box.x0 <= cx < c.box.x1 and c.box.y0 <= cy < c.box.y1 for c in result.white_cells) == 1
    for x, y in result.rbc_centers:
        assert min(np.hypot(x - cx, y - cy) for cy, cx in truth["rbc"]) < 4


def test_counting_is_the_same_for_other_noise() -> None:
    for seed in (1, 2):
        image, _ = synthetic_field(seed)
        assert analyze_field(image, FieldParams(rbc_diameter=DIAMETER)).counts == {"wbc": 2, "rbc": 7, "platelet": 3}


class _FixedClassifier:
    class_names = ("lymphocyte", "neutrophil")

    def __init__(self) -> None:
        self.sizes: list[tuple[int, ...]] = []

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        self.sizes += [im.shape for im in images]
        return np.tile([0.3, 0.7], (len(images), 1))


def test_found_cells_are_cropped_square_and_classified() -> None:
    image, _ = synthetic_field()
    classifier = _FixedClassifier()
    result = analyze_field(image, FieldParams(rbc_diameter=DIAMETER), classifier)
    assert [c.cell_type for c in result.white_cells] == ["neutrophil", "neutrophil"]
    assert result.white_cells[0].probability == pytest.approx(0.7)
    assert all(h == w and c == 3 for h, w, c in classifier.sizes)
    assert "2 white cells (neutrophil, neutrophil)" in result.message


class _PlateletHappyClassifier:
    class_names = ("neutrophil", "platelet")

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        return np.tile([0.2, 0.8], (len(images), 1))


def test_a_found_white_cell_is_never_typed_as_a_platelet() -> None:
    image, _ = synthetic_field()
    result = analyze_field(image, FieldParams(rbc_diameter=DIAMETER), _PlateletHappyClassifier())
    assert {c.cell_type for c in result.white_cells} == {"neutrophil"}
    assert result.white_cells[0].probabilities == {"neutrophil": pytest.approx(1.0)}


@pytest.mark.parametrize("value", [0, 255, 200])
def test_blank_or_saturated_field_finds_nothing(value: int) -> None:
    result = analyze_field(np.full((100, 150, 3), value, np.uint8))
    assert result.counts == {"wbc": 0, "rbc": 0, "platelet": 0}
    assert result.message.startswith("no white cell found")


def test_field_with_only_red_cells_says_no_white_cell() -> None:
    image, _ = synthetic_field()
    image[:, 200:] = BACKGROUND  # remove both white cells (and the right-hand red cell/platelet)
    result = analyze_field(image, FieldParams(rbc_diameter=DIAMETER))
    assert result.counts["wbc"] == 0 and result.counts["rbc"] == 6
    assert result.message.startswith("no white cell found")


def test_tiny_and_odd_shaped_images_do_not_crash() -> None:
    for shape in ((8, 8, 3), (9, 300, 3), (300, 9, 3)):
        image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        result = analyze_field(image)
        assert draw_field(image, result).shape == shape


def test_non_rgb_input_is_a_clear_error() -> None:
    with pytest.raises(HematoVisionError):
        analyze_field(np.zeros((10, 10), np.uint8))


def test_box_iou_and_greedy_matching() -> None:
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert a.iou(b) == pytest.approx(50 / 150)
    assert a.iou(Box(20, 20, 30, 30)) == 0.0
    truth = [Box(0, 0, 10, 10), Box(100, 100, 120, 120)]
    pred = [Box(1, 0, 11, 10), Box(0, 1, 10, 11), Box(50, 50, 60, 60)]
    assert match_boxes(pred, truth, 0.5)[:3] == (1, 2, 1)


def test_points_match_each_box_once() -> None:
    boxes = [Box(0, 0, 10, 10), Box(20, 0, 30, 10)]
    points = np.array([[5.0, 5.0], [6.0, 5.0], [50.0, 50.0]])
    assert match_points_to_boxes(points, boxes) == (1, 2, 1)


def test_crop_square_stays_inside_the_image() -> None:
    image = np.zeros((50, 80, 3), np.uint8)
    crop = crop_square(image, Box(60, 30, 80, 50))
    assert crop.shape == (20, 20, 3)
    crop = crop_square(image, Box(0, 0, 80, 20))
    assert crop.shape == (50, 50, 3)


def test_read_voc_boxes(tmp_path: Path) -> None:
    xml = tmp_path / "a.xml"
    xml.write_text(
        "<annotation><object><name>WBC</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>"
        "<object><name>Platelets</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "<object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>"
    )
    boxes = read_voc_boxes(xml)
    assert [(b.label, b.as_list()) for b in boxes] == [("wbc", [1, 2, 30, 40]), ("platelet", [5, 5, 9, 9])]
    (tmp_path / "bad.xml").write_text("<annotation>")
    with pytest.raises(DatasetError):
        read_voc_boxes(tmp_path / "bad.xml")


def test_bccd_frames_white_cell_found(shared_data: Path) -> None:
    root = shared_data / "bccd"
    if not (root / "JPEGImages").is_dir():
        pytest.skip("../shared/data/bccd not present")
    from hematovision.data.images import load_rgb

    # Two held-out (CBC test) frames with one annotated white cell each.
    for stem in ("BloodImage_00339", "BloodImage_00340"):
        truth = [b for b in read_voc_boxes(root / "Annotations" / f"{stem}.xml") if b.label == "wbc"]
        result = analyze_field(load_rgb(root / "JPEGImages" / f"{stem}.jpg"))
        assert match_boxes([c.box for c in result.white_cells], truth, 0.5)[0] == len(truth) == 1
