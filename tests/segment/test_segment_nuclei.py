"""The adaptive white-cell finder: other stains, tints and magnifications; red-cell diameter; no false finds."""

from __future__ import annotations

import numpy as np
import pytest
from test_segment_field import DIAMETER, synthetic_field

from hematovision.errors import HematoVisionError
from hematovision.segment.field import FieldParams, analyze_field, locate_white_cells
from hematovision.segment.nuclei import estimate_rbc_diameter, find_nuclei, neutralize_tint, white_point

# A lamp/camera cast over the whole field: a cyan background (red weak) and a yellow one (blue weak).
CYAN, YELLOW = (0.55, 0.92, 1.0), (1.0, 0.95, 0.6)


def _cast(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return np.clip(image * np.asarray(gains), 0, 255).astype(np.uint8)


def _disc(image: np.ndarray, cy: float, cx: float, r: float, colour: tuple[int, ...]) -> None:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def raabin_like_field(seed: int = 0, scale: float = 1.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Another lab's palette: pinkish background, grey-lavender red cells, magenta nuclei, lobed nucleus.

    Red cells here are as blue as BCCD's nuclei by the fixed threshold (b* ≈ -22 < -20), and one
    white cell has three lobes a few pixels apart.
    """
    rng = np.random.default_rng(seed)
    size = (round(260 * scale), round(340 * scale))
    image = np.empty((*size, 3), np.float64)
    image[:] = (236, 214, 206)
    d = DIAMETER * scale
    for cy, cx in [(35, 35), (35, 135), (130, 30), (215, 45), (215, 160), (125, 150), (35, 300), (225, 300)]:
        _disc(image, cy * scale, cx * scale, d / 2, (160, 146, 198))
        _disc(image, cy * scale, cx * scale, d / 6, (200, 180, 205))  # pale centre
    white = [(85, 240), (190, 245)]
    _disc(image, white[0][0] * scale, white[0][1] * scale, 30 * scale, (222, 190, 212))
    _disc(image, white[0][0] * scale, white[0][1] * scale, 17 * scale, (128, 40, 132))
    cy, cx = white[1]
    _disc(image, cy * scale, cx * scale, 30 * scale, (222, 190, 212))
    for dy, dx in [(-9, -11), (-9, 11), (10, 0)]:  # three lobes, 3-4 px apart
        _disc(image, (cy + dy) * scale, (cx + dx) * scale, 8 * scale, (110, 35, 125))
    image += rng.normal(0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), [(y * scale, x * scale) for y, x in white]


def _one_box_per_cell(cells: list, centres: list[tuple[float, float]]) -> bool:
    return len(cells) == len(centres) and all(
        sum(c.box.x0 <= cx < c.box.x1 and c.box.y0 <= cy < c.box.y1 for c in cells) == 1 for cy, cx in centres
    )


@pytest.mark.parametrize("cast", [None, CYAN, YELLOW], ids=["bccd-like", "cyan", "yellow"])
@pytest.mark.parametrize("diameter", [DIAMETER, None], ids=["given", "measured"])
def test_both_white_cells_found_whatever_the_tint(cast: tuple | None, diameter: float | None) -> None:
    image, truth = synthetic_field()
    image = image if cast is None else _cast(image, cast)
    cells = locate_white_cells(image, FieldParams(rbc_diameter=diameter))
    assert _one_box_per_cell(cells, truth["wbc"])


@pytest.mark.parametrize("cast", [None, CYAN, YELLOW], ids=["plain", "cyan", "yellow"])
def test_another_labs_palette_and_a_lobed_nucleus(cast: tuple | None) -> None:
    image, white = raabin_like_field()
    image = image if cast is None else _cast(image, cast)
    assert _one_box_per_cell(locate_white_cells(image), white)
    # The fixed-threshold finder boxes the bluish red cells (issue 12: "boxes around red cells").
    assert not _one_box_per_cell(locate_white_cells(image, FieldParams(finder="lab", rbc_diameter=DIAMETER)), white)


def test_other_magnifications_need_no_setting() -> None:
    for scale in (0.6, 1.8):
        image, white = raabin_like_field(scale=scale)
        assert _one_box_per_cell(locate_white_cells(image), white), scale


def test_cell_box_is_larger_than_the_nucleus_and_covers_the_cell() -> None:
    image, truth = synthetic_field()
    for cell in locate_white_cells(image, FieldParams(rbc_diameter=DIAMETER)):
        cx, cy = cell.box.center
        cy0, cx0 = min(truth["wbc"], key=lambda c: np.hypot(c[0] - cy, c[1] - cx))
        # The white cell's disc has radius 28 (nucleus 15): the box should be about 56 px wide.
        assert 40 <= cell.box.x1 - cell.box.x0 <= 75 and 40 <= cell.box.y1 - cell.box.y0 <= 75
        assert abs(cx - cx0) < 4 and abs(cy - cy0) < 4


def test_red_cell_diameter_is_measured_and_follows_the_magnification() -> None:
    image, _ = raabin_like_field()
    measured = estimate_rbc_diameter(image)
    assert measured is not None and 0.9 * DIAMETER <= measured <= 1.35 * DIAMETER
    larger = estimate_rbc_diameter(raabin_like_field(scale=1.8)[0])
    assert larger is not None and larger / measured == pytest.approx(1.8, rel=0.12)


def test_fields_without_white_cells_give_none() -> None:
    image, _ = raabin_like_field()
    image[:, 190:] = (236, 214, 206)  # remove both white cells
    for version in (image, _cast(image, CYAN), _cast(image, YELLOW)):
        assert find_nuclei(version) == []
    rbc_only, _ = synthetic_field()
    rbc_only[:, 200:] = (228, 228, 232)
    assert find_nuclei(rbc_only) == [] and find_nuclei(_cast(rbc_only, CYAN)) == []


def test_a_bluer_red_cell_is_not_a_white_cell() -> None:
    # Lavender red cells and one a little darker and bluer: Otsu makes it the "stained" class, but
    # it does not stand out from the other red cells as a nucleus does.
    image = np.empty((240, 320, 3), np.float64)
    image[:] = (228, 228, 232)
    centres = [(cy, cx) for cy in range(35, 240, 60) for cx in range(35, 320, 60)]
    for k, (cy, cx) in enumerate(centres):
        _disc(image, cy, cx, 20, (165, 135, 200) if k == 7 else (185, 150, 195))
    image = np.clip(image + np.random.default_rng(0).normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    assert find_nuclei(image) == []
    # Only the contrast test rejects it; a dark nucleus-sized blob among the same cells is found.
    _disc(image, 185, 125, 12, (100, 60, 170))
    assert len(find_nuclei(image)) == 1


def test_a_sparse_field_mostly_background() -> None:
    # Cells cover ~8 % of the picture: the background, not the cells, sets the image's percentiles.
    image, white = raabin_like_field()
    sparse = np.empty((520, 680, 3), np.uint8)
    sparse[:] = image[5, 5]
    sparse[:260, :340] = image
    assert _one_box_per_cell(locate_white_cells(sparse), white)


def test_a_long_stain_streak_is_not_a_white_cell() -> None:
    # Stain precipitate along a scratch: dark and blue like a nucleus, but 6 red cells long.
    image, truth = synthetic_field()
    image[225:233, 20:260] = (90, 60, 170)
    assert _one_box_per_cell(locate_white_cells(image, FieldParams(rbc_diameter=DIAMETER)), truth["wbc"])


def test_black_fill_of_a_rotated_frame_is_not_a_cell() -> None:
    image, white = raabin_like_field()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    image[yy < 0.25 * xx - 30] = 0  # a black wedge, as Keras' constant fill leaves after a rotation
    image[yy > 0.6 * xx + 150] = 0  # and another
    assert (image.max(axis=2) == 0).mean() > 0.15
    assert _one_box_per_cell(locate_white_cells(image), white)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_images_find_nothing(value: int) -> None:
    image = np.full((90, 120, 3), value, np.uint8)
    assert estimate_rbc_diameter(image) is None
    assert find_nuclei(image) == []
    assert analyze_field(image).counts == {"wbc": 0, "rbc": 0, "platelet": 0}


def test_tiny_and_noise_images_do_not_crash() -> None:
    rng = np.random.default_rng(0)
    for shape in ((5, 5, 3), (8, 300, 3), (64, 64, 3)):
        find_nuclei(rng.integers(0, 255, shape, dtype=np.uint8))


def test_white_point_and_tint_removal() -> None:
    image, _ = synthetic_field()
    cyan = _cast(image, CYAN)
    assert white_point(cyan)[0] < 0.75 * white_point(cyan)[2]
    neutral = white_point(neutralize_tint(cyan))
    assert neutral.max() - neutral.min() < 3  # grey again
    assert abs(neutral.mean() - white_point(cyan).mean()) < 3  # at its own brightness


def test_field_params_are_checked() -> None:
    with pytest.raises(HematoVisionError, match="unknown white-cell finder"):
        FieldParams(finder="magic")
    with pytest.raises(HematoVisionError, match="positive"):
        FieldParams(rbc_diameter=0.0)
    assert analyze_field(synthetic_field()[0]).rbc_diameter > 0  # measured, reported
