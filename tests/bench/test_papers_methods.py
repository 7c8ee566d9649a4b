"""Checkerboard augmentation, class balancing and SimpleITK-style intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from hematovision.methods import (
    AUGMENTATIONS,
    balanced_indices,
    checkerboard_augment,
    checkerboard_pair,
)
from hematovision.methods.intensity import intensity_tensor, normalize_intensity


def paper_pseudocode(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The paper's pseudo-code, literally: rows and columns stepped by 2, (i, j) to the
    # first image and (i, j-1) to the second, with Python's negative indexing at j = 0.
    first, second = np.zeros_like(image), np.zeros_like(image)
    for i in range(0, image.shape[0], 2):
        for j in range(0, image.shape[1], 2):
            first[i][j] = image[i][j]
            second[i][j - 1] = image[i][j - 1]
    return first, second


def test_parity_checkerboard_pixel_exact() -> None:
    image = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    first, second = checkerboard_pair(image, "parity")
    assert first.tolist() == [[1, 0, 3, 0], [0, 6, 0, 8], [9, 0, 11, 0]]
    assert second.tolist() == [[0, 2, 0, 4], [5, 0, 7, 0], [0, 10, 0, 12]]
    assert (first + second == image).all()


def test_paper_checkerboard_pixel_exact() -> None:
    image = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    first, second = checkerboard_pair(image, "paper")
    assert first.tolist() == [[1, 0, 3, 0], [0, 0, 0, 0], [9, 0, 11, 0]]
    assert second.tolist() == [[0, 2, 0, 4], [0, 0, 0, 0], [0, 10, 0, 12]]


@pytest.mark.parametrize("shape", [(4, 4, 3), (5, 3, 3), (3, 5), (1, 1, 3), (6, 7, 3)])
def test_paper_mode_equals_literal_pseudocode(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(1, 256, size=shape).astype(np.uint8)
    expected = paper_pseudocode(image)
    actual = checkerboard_pair(image, "paper")
    assert (actual[0] == expected[0]).all() and (actual[1] == expected[1]).all()


def test_checkerboard_on_rgb_blacks_whole_pixels() -> None:
    image = np.full((4, 4, 3), 200, np.uint8)
    first, second = checkerboard_pair(image, "parity")
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert (first[0, 1] == 0).all() and (first[0, 0] == 200).all()
    assert (first.sum(2) > 0).sum() == 8 and (second.sum(2) > 0).sum() == 8
    first, second = checkerboard_pair(image, "paper")
    assert (first.sum(2) > 0).sum() == 4 and (second.sum(2) > 0).sum() == 4


def test_checkerboard_augment_triples_with_labels() -> None:
    images = np.random.default_rng(1).integers(1, 256, size=(3, 4, 4, 3)).astype(np.uint8)
    labels = np.array([0, 1, 2])
    out, out_labels = checkerboard_augment(images, labels)
    assert out.shape == (9, 4, 4, 3)
    assert out_labels.tolist() == [0, 1, 2] * 3
    assert (out[:3] == images).all()
    assert (out[3] + out[6] == images[0]).all()
    out, out_labels = checkerboard_augment(images, labels, keep_original=False)
    assert len(out) == 6 and AUGMENTATIONS["checkerboard"] is checkerboard_augment


def test_checkerboard_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        checkerboard_pair(np.zeros((2, 2)), "diagonal")


def test_balanced_indices_equal_counts() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    rng = np.random.default_rng(0)
    indices = balanced_indices(labels, rng)
    assert np.bincount(labels[indices]).tolist() == [10, 10, 10]
    uses = np.bincount(indices, minlength=len(labels))
    assert uses[:10].tolist() == [1] * 10
    assert sorted(uses[10:13].tolist()) == [3, 3, 4]  # 10 = 3*3 + 1: repeats differ by at most one
    assert uses[13] == 10
    assert np.bincount(labels[balanced_indices(labels, rng, per_class=4)]).tolist() == [4, 4, 4]


def test_balanced_indices_is_shuffled_and_seeded() -> None:
    labels = np.repeat([0, 1], [50, 20])
    first = balanced_indices(labels, np.random.default_rng(3))
    again = balanced_indices(labels, np.random.default_rng(3))
    assert (first == again).all()
    assert not (np.diff(labels[first]) >= 0).all()  # classes are interleaved, not in blocks


def test_zscore_matches_simpleitk_statistics() -> None:
    image = np.random.default_rng(2).integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
    out = normalize_intensity(image, "zscore")
    assert out.dtype == np.float32
    for channel in range(3):
        values = image[..., channel].astype(np.float64)
        expected = (values - values.mean()) / values.std(ddof=1)
        np.testing.assert_allclose(out[..., channel], expected, rtol=1e-5)


def test_rescale_and_constant_images() -> None:
    image = np.stack([np.full((3, 3), 7), np.arange(9).reshape(3, 3), np.full((3, 3), 0)], -1).astype(np.uint8)
    out = normalize_intensity(image, "rescale")
    assert out[..., 1].min() == 0 and out[..., 1].max() == 1
    assert (out[..., 0] == 0).all()
    assert (normalize_intensity(image, "zscore")[..., 0] == 0).all()
    tensor = intensity_tensor(image[None])
    assert tuple(tensor.shape) == (1, 3, 3, 3)


def test_batch_normalised_per_image() -> None:
    batch = np.stack([np.arange(48).reshape(4, 4, 3), 10 * np.arange(48).reshape(4, 4, 3)]).astype(np.float32)
    out = normalize_intensity(batch)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.parametrize("method", ["zscore", "rescale"])
def test_matches_simpleitk(method: str) -> None:
    # SimpleITK comes with the test extra; it is imported here only so the rest of the file runs without it.
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is in the test extra: pip install -e '.[test]'")

    def reference(array: np.ndarray, is_vector: bool) -> np.ndarray:
        image = sitk.GetImageFromArray(array, isVector=is_vector)
        # RescaleIntensity maps onto 0..255 unless told otherwise; ours maps onto 0..1.
        out = sitk.Normalize(image) if method == "zscore" else sitk.RescaleIntensity(image, 0.0, 1.0)
        return sitk.GetArrayFromImage(out)

    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, size=(7, 9)).astype(np.float32)
    np.testing.assert_allclose(normalize_intensity(grey[..., None], method)[..., 0], reference(grey, False),
                               rtol=1e-4, atol=1e-5)
    # An RGB image whose channels have different ranges: SimpleITK treats it as a vector image and
    # normalises each component on its own, as normalize_intensity does.
    rgb = rng.integers(0, 256, size=(6, 5, 3)).astype(np.float32) * [1.0, 0.3, 2.0] + [0.0, 40.0, 500.0]
    np.testing.assert_allclose(normalize_intensity(rgb, method), reference(rgb.astype(np.float32), True),
                               rtol=1e-4, atol=1e-5)
