"""Two synthetic "labs": the disc cells of :mod:`synthetic` and a copy seen through another microscope.

The second lab's stain and camera are different (a yellowish background, as in some labs' smears,
and other channel gains on the whole image) and its magnification is higher (discs 1.5x larger).
A run trained on the first lab gives every cell of the second the same class, as a PBC model does
on another lab's cells.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import CLASS_STYLES, synthetic_cell

BACKGROUND = (225.0, 215.0, 150.0)  # the first lab's is (235, 200, 205)
GAIN = np.array([0.9, 1.0, 0.8])  # per channel, on the whole image
OFFSET = np.array([10.0, 0.0, 0.0])
MAGNIFICATION = 1.5


def other_lab_cell(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A cell of ``label`` as the other lab sees it: larger, other colours (RGB uint8, size x size)."""
    color, radius = CLASS_STYLES[label]
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, size=2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius * MAGNIFICATION * size) ** 2
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUND
    image[disc] = color
    image = image * GAIN + OFFSET + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_lab(root: Path, per_class: int, size: int = 40, seed: int = 0, other: bool = False,
              labelled: bool = True, classes: tuple[str, ...] = tuple(CLASS_STYLES)) -> Path:
    """Write one lab's cells: ``root/<class>/*.png`` (labelled) or ``root/*.png`` (unlabelled)."""
    rng = np.random.default_rng(seed)
    draw = other_lab_cell if other else synthetic_cell
    for label in classes:
        folder = root / label if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(label, size, rng)).save(folder / f"{label}_{seed}_{i:03d}.png")
    return root


def train_on_one_thread(factory: pytest.TempPathFactory, out: Path, *args: str) -> Path:
    """``hematovision train --out OUT ARGS`` on one thread, with a fresh feature cache; returns ``out``."""
    import torch

    from hematovision.cli import main

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HEMATOVISION_HOME", str(factory.mktemp("home")))
            assert main(["train", "--out", str(out), *args]) == 0
    finally:
        torch.set_num_threads(previous)
    return out
