"""Differentiable augmentation for GAN training on few images (DiffAugment, Zhao et al. 2020).

With a few hundred real cells the discriminator soon memorises them, and the generator then
learns to reproduce the one cell it is least punished for. Augmenting *both* the real and the
generated images the discriminator sees, with operations the generator's gradient passes
through, gives the discriminator more varied real data without teaching the generator to draw
augmented cells. Every operation draws its randomness from torch's global generator, which
the training checkpoint saves, so a resumed run repeats the same augmentations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(text: str) -> tuple[str, ...]:
    """``"translation,cutout"`` → ("translation", "cutout"); ``""`` → no augmentation."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown GAN augmentation(s) {unknown}; choose from {', '.join(POLICIES)}")
    return names


def diff_augment(images: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """Apply the operations of ``policy`` in order to (N, 3, S, S) images in [-1, 1]."""
    for name in policy:
        images = _OPERATIONS[name](images)
    return images


def _per_image(images: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator (the one a checkpoint saves), whatever the images' device.
    return torch.rand(images.shape[0], 1, 1, 1, dtype=images.dtype).to(images.device)


def color(images: torch.Tensor) -> torch.Tensor:
    """Random brightness (±0.25), saturation (×0.5–1.5) and contrast (×0.75–1.25) per image.

    Milder than DiffAugment's defaults: a cell's stain colour is part of what makes it
    an eosinophil or a basophil.
    """
    images = images + (_per_image(images) - 0.5) * 0.5
    grey = images.mean(dim=1, keepdim=True)
    images = (images - grey) * (_per_image(images) + 0.5) + grey
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_per_image(images) * 0.5 + 0.75) + mean


def translation(images: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its side in x and y, filling with zeros."""
    n, _, height, width = images.shape
    pad_y, pad_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))
    offsets_y = torch.randint(0, 2 * pad_y + 1, (n,)).tolist()
    offsets_x = torch.randint(0, 2 * pad_x + 1, (n,)).tolist()
    return torch.stack([padded[i, :, y : y + height, x : x + width]
                        for i, (y, x) in enumerate(zip(offsets_y, offsets_x))])


def cutout(images: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Set a random square of ``ratio`` times the side to zero in each image."""
    n, _, height, width = images.shape
    cut_y, cut_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    top = torch.randint(0, height - cut_y + 1, (n, 1, 1)).to(images.device)
    left = torch.randint(0, width - cut_x + 1, (n, 1, 1)).to(images.device)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + cut_y) & (cols >= left) & (cols < left + cut_x)
    return images * (~inside).unsqueeze(1).to(images.dtype)


_OPERATIONS = {"color": color, "translation": translation, "cutout": cutout}
