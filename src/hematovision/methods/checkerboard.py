"""Checkerboard augmentation (HematoVision paper): each image becomes two "holed" images.

Both outputs keep the pixels on alternating grid positions and set the others to black
(#000000), which simulates pixelisation and missing pixels. Two readings exist:

* ``"parity"`` (default): the plain checkerboard. The first image keeps pixels with
  (i + j) even, the second those with (i + j) odd, so each keeps half the pixels and
  together they give back the whole image. This is what the paper's text and its name
  describe ("alternating grid positions"), so it is the default.
* ``"paper"``: the paper's pseudo-code taken literally. It steps rows and columns by 2
  and, for each visited (i, j), copies pixel (i, j) to the first output and (i, j-1) to
  the second. Only even rows are ever visited, so each output keeps a quarter of the
  pixels and odd rows are black in both; at j = 0, ``j - 1`` is -1, which in the
  paper's (Python) indexing is the last column, reproduced here as ``(j - 1) mod W``.
"""

from __future__ import annotations

import numpy as np

MODES = ("parity", "paper")


def checkerboard_pair(image: np.ndarray, mode: str = "parity") -> tuple[np.ndarray, np.ndarray]:
    """Split one image into its two checkerboard images.

    Args:
        image: (H, W) or (H, W, C) array of any dtype.
        mode: ``"parity"`` or ``"paper"`` (see the module docstring).

    Returns:
        Two arrays shaped and typed like ``image``, zero where a pixel is dropped.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    height, width = image.shape[:2]
    first, second = np.zeros_like(image), np.zeros_like(image)
    if mode == "parity":
        keep = (np.add.outer(np.arange(height), np.arange(width)) % 2) == 0
        first[keep] = image[keep]
        second[~keep] = image[~keep]
    elif mode == "paper":
        rows = np.arange(0, height, 2)[:, None]
        columns = np.arange(0, width, 2)
        first[rows, columns] = image[rows, columns]
        previous = (columns - 1) % width
        second[rows, previous] = image[rows, previous]
    else:
        raise ValueError(f"checkerboard mode must be one of {MODES}, got {mode!r}")
    return first, second


def checkerboard_augment(images: np.ndarray, labels: np.ndarray, mode: str = "parity",
                         keep_original: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Add both checkerboard images of every image to a training set.

    Args:
        images: (N, H, W, C) images.
        labels: (N,) labels.
        mode: ``"parity"`` or ``"paper"``.
        keep_original: keep the unmodified images too (the test images are never holed,
            so a training set of holed images only would not match them).

    Returns:
        ``(images, labels)`` with 3N rows (2N without the originals): originals first,
        then all first outputs, then all second outputs.
    """
    pairs = [checkerboard_pair(image, mode) for image in images]
    firsts = np.stack([pair[0] for pair in pairs]) if pairs else images[:0]
    seconds = np.stack([pair[1] for pair in pairs]) if pairs else images[:0]
    parts = ([images] if keep_original else []) + [firsts, seconds]
    return np.concatenate(parts), np.concatenate([labels] * len(parts))
