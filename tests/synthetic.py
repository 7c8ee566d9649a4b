"""Tiny synthetic "cells" on disk: each class is a disc of its own colour and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_STYLES = {
    "neutrophil": ((150, 60, 170), 0.30),
    "lymphocyte": ((60, 40, 150), 0.20),
    "eosinophil": ((210, 90, 60), 0.35),
}


def synthetic_cell(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An (size, size, 3) uint8 image: pink background, one noisy disc in the class's style."""
    color, radius = CLASS_STYLES[label]
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, size=2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius * size) ** 2
    image = np.empty((size, size, 3), np.float64)
    image[:] = (235, 200, 205)
    image[disc] = color
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, per_class: int = 12, size: int = 40, seed: int = 0,
                 classes: tuple[str, ...] = tuple(CLASS_STYLES)) -> Path:
    """Write ``root/<class>/<i>.png`` for each class and return ``root``."""
    rng = np.random.default_rng(seed)
    for label in classes:
        folder = root / label.upper()  # upper-case folders check class-name normalisation
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_cell(label, size, rng)).save(folder / f"{label}_{i:03d}.png")
    return root
