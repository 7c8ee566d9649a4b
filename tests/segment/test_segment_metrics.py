"""Dice/IoU/pixel accuracy against hand-computed values; mask quantisation, loading and splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.errors import DatasetError, HematoVisionError
from hematovision.segment.masks import (
    BCCD_LEVELS,
    MaskSizeError,
    crop_to_cell,
    find_seg_samples,
    load_mask,
    quantize_mask,
    read_sample,
    split_seg_samples,
)
from hematovision.segment.metrics import (
    dice,
    iou,
    pixel_accuracy,
    segmentation_scores,
    summarize_scores,
)


def test_dice_and_iou_hand_computed() -> None:
    # A: 4 pixels, B: 6 pixels, overlap 3 → Dice 2*3/10 = 0.6, IoU 3/7.
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True
    b[0, 1:4] = True
    b[1, 0:3] = True
    assert dice(a, b) == pytest.approx(0.6)
    assert iou(a, b) == pytest.approx(3 / 7)
    assert dice(a, a) == 1.0 and iou(a, ~a) == 0.0


def test_both_empty_is_perfect_and_one_empty_is_zero() -> None:
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0


def test_scores_for_nucleus_and_cell_regions() -> None:
    target = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = np.array([[0, 1, 2, 2], [0, 0, 2, 2]])
    scores = segmentation_scores(pred, target)
    # nucleus: pred 4 px, target 3 px, overlap 3 → 6/7; cell: pred 5, target 6, overlap 5 → 10/11.
    assert scores["nucleus_dice"] == pytest.approx(6 / 7)
    assert scores["nucleus_iou"] == pytest.approx(3 / 4)
    assert scores["cell_dice"] == pytest.approx(10 / 11)
    assert scores["cell_iou"] == pytest.approx(5 / 6)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 8)


def test_pixel_accuracy_hides_a_missed_nucleus() -> None:
    target = np.zeros((10, 10), np.uint8)
    target[4:6, 4:6] = 2
    all_background = np.zeros_like(target)
    assert pixel_accuracy(all_background, target) == pytest.approx(0.96)
    assert dice(all_background == 2, target == 2) == 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(HematoVisionError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summary_mean_and_min() -> None:
    summary = summarize_scores([{"name": "a", "d": 1.0}, {"name": "b", "d": 0.5}])
    assert summary["d"]["mean"] == pytest.approx(0.75)
    assert summary["d"]["min"] == 0.5 and "name" not in summary


def test_quantise_antialiased_mask_to_nearest_level() -> None:
    gray = np.array([0, 60, 77, 79, 155, 204, 206, 255], np.uint8)
    np.testing.assert_array_equal(quantize_mask(gray[None], BCCD_LEVELS)[0], [0, 0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(quantize_mask(np.array([[0, 63, 65, 128, 191, 193, 255]])), [[0, 0, 1, 1, 1, 2, 2]])
    rgb = np.repeat(gray[None, :, None], 3, axis=2)
    np.testing.assert_array_equal(quantize_mask(rgb, BCCD_LEVELS), quantize_mask(gray[None], BCCD_LEVELS))


def _write_pair(root: Path, stem: str, size: tuple[int, int], mask_size: tuple[int, int] | None = None, value: int = 0) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    w, h = mask_size or size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 128
    mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 255
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_mask_with_the_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    _write_pair(tmp_path, "001", (20, 16), mask_size=(16, 20))
    (sample,) = find_seg_samples(tmp_path)
    with pytest.raises(MaskSizeError, match="mask is 16x20 but its image is 20x16"):
        read_sample(sample)
    with pytest.raises(MaskSizeError):
        load_mask(sample.mask_path, shape=(16, 20 + 1))


def test_unknown_layout_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        find_seg_samples(tmp_path)


def test_split_is_seeded_and_keeps_identical_images_together(tmp_path: Path) -> None:
    for i in range(20):
        # Images 0 and 1 are pixel-identical (like Zheng's 112 and 139).
        _write_pair(tmp_path, f"{i:03d}", (16, 16), value=7 if i < 2 else 20 + i)
    samples = find_seg_samples(tmp_path)
    split = split_seg_samples(samples, test_fraction=0.25, val_fraction=0.1, seed=3)
    assert split == split_seg_samples(samples, test_fraction=0.25, val_fraction=0.1, seed=3)
    assert sum(len(v) for v in split.values()) == 20
    sides = {name for name, items in split.items() for s in items if s.name in ("000", "001")}
    assert len(sides) == 1
    assert 4 <= len(split["test"]) <= 6


def test_split_keeps_named_pairs_together(tmp_path: Path) -> None:
    for i in range(20):
        _write_pair(tmp_path, f"{i:03d}", (16, 16), value=20 + i)
    samples = find_seg_samples(tmp_path)
    pairs = [("003", "011"), ("011", "017"), ("005", "006")]
    for seed in range(5):
        split = split_seg_samples(samples, 0.3, 0.1, seed, same_side=pairs)
        side = {s.name: name for name, items in split.items() for s in items}
        assert side["003"] == side["011"] == side["017"] and side["005"] == side["006"]


def test_crop_to_cell_is_square_around_the_labels() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    labels = np.zeros((100, 100), np.uint8)
    labels[40:60, 30:50] = 1
    crop_image, crop_labels = crop_to_cell(image, labels, margin=0.25)
    assert crop_image.shape[:2] == crop_labels.shape
    assert crop_labels.sum() == labels.sum()
    assert abs(crop_labels.shape[0] - crop_labels.shape[1]) <= 1


def test_zheng_masks_quantise_to_three_labels(shared_data: Path) -> None:
    root = shared_data / "wbc_seg_zheng"
    if not root.is_dir():
        pytest.skip("../shared/data/wbc_seg_zheng not present")
    samples = find_seg_samples(root)
    assert len(samples) == 300
    image, labels = read_sample(samples[0])
    assert image.shape[:2] == labels.shape and set(np.unique(labels)) <= {0, 1, 2}


def test_bccd_masks_are_found_and_quantised(shared_data: Path) -> None:
    root = shared_data / "bccd"
    if not (root / "masks").is_dir():
        pytest.skip("../shared/data/bccd/masks not present")
    samples = find_seg_samples(root)
    assert len(samples) == 367 and samples[0].levels == BCCD_LEVELS
    _, labels = read_sample(samples[0])
    assert labels.shape == (480, 640) and set(np.unique(labels)) == {0, 1, 2}
