"""DiffAugment for GAN training: exact effects on tiny images, and gradients pass through."""

from __future__ import annotations

import pytest
import torch

from hematovision.gan.augment import (
    color,
    cutout,
    diff_augment,
    parse_policy,
    translation,
)


def test_cutout_zeroes_one_square_of_half_the_side_per_image() -> None:
    torch.manual_seed(0)
    images = torch.ones(5, 3, 8, 8)
    out = cutout(images)
    for image in out:
        zero = image[0] == 0
        assert int(zero.sum()) == 16  # a 4x4 square
        rows, cols = torch.nonzero(zero, as_tuple=True)
        assert int(rows.max() - rows.min()) == 3 and int(cols.max() - cols.min()) == 3
        assert torch.equal(image[0] == 0, image[2] == 0)  # the same square in every channel


def test_translation_shifts_content_within_the_ratio_and_fills_with_zeros() -> None:
    torch.manual_seed(0)
    images = torch.zeros(20, 3, 16, 16)
    images[:, :, 8, 8] = 1.0
    out = translation(images, ratio=0.125)  # at most 2 pixels
    assert out.shape == images.shape
    shifts = set()
    for image in out:
        position = torch.nonzero(image[0] == 1)
        assert len(position) == 1
        dy, dx = (int(v) - 8 for v in position[0])
        assert abs(dy) <= 2 and abs(dx) <= 2
        shifts.add((dy, dx))
    assert len(shifts) > 1  # each image draws its own shift
    border = torch.ones(1, 3, 16, 16)
    shifted = translation(border, ratio=0.25)
    assert shifted.sum() <= border.sum()  # nothing is invented, only zeros come in


def test_color_changes_each_image_differently_and_keeps_the_shape() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 8, 8).repeat(4, 1, 1, 1) * 2 - 1
    out = color(images)
    assert out.shape == images.shape
    assert not torch.allclose(out[0], out[1])


def test_gradients_reach_the_generated_images() -> None:
    torch.manual_seed(0)
    fake = torch.rand(3, 3, 16, 16, requires_grad=True)
    diff_augment(fake, parse_policy("color,translation,cutout")).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_policy_parsing() -> None:
    assert parse_policy("") == ()
    assert parse_policy(" translation , cutout ") == ("translation", "cutout")
    with pytest.raises(ValueError, match="unknown GAN augmentation"):
        parse_policy("translation,mixup")
