from __future__ import annotations

import numpy as np
import pytest
import torch

from hematovision.data.transforms import Preprocessing, TrainTransform, dihedral_mean

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _cell_image(size: int = 96) -> np.ndarray:
    """White background, one dark 'cell' in the middle."""
    image = np.full((size, size, 3), 235, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 10) ** 2] = (60, 30, 120)
    return image


@pytest.mark.parametrize("strong", [False, True])
def test_train_transform_is_seeded_and_well_formed(strong: bool) -> None:
    transform = TrainTransform(PREP, strong=strong)
    image = _cell_image()
    a = transform(image, np.random.default_rng(3))
    b = transform(image, np.random.default_rng(3))
    c = transform(image, np.random.default_rng(4))
    assert a.shape == (3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_strong_augmentation_never_crops_the_cell_away() -> None:
    transform = TrainTransform(PREP, strong=True)
    image = _cell_image()
    for seed in range(200):
        view = transform(image, np.random.default_rng(seed))
        brightness = view.mean(0)
        # The dark cell is still there: its pixels stay far darker than the background.
        assert brightness.min() < brightness.median() - 0.4, seed


def test_dihedral_mean_averages_the_eight_views() -> None:
    batch = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(dihedral_mean(lambda x: x, batch, 1), batch)
    corner = dihedral_mean(lambda x: x[..., 0, 0], batch, 8)
    # The top-left pixel of the 8 flips/rotations visits each corner twice.
    assert corner.item() == pytest.approx((0 + 3 + 12 + 15) / 4)
    with pytest.raises(ValueError):
        dihedral_mean(lambda x: x, batch, 3)
