"""What ``hematovision segment`` writes per image: the label PNG, an overlay and shape features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hematovision._io import atomic_write
from hematovision.segment.masks import CYTOPLASM, NUCLEUS

# Overlay colours: cytoplasm green, nucleus magenta (distinct from the purple stain underneath).
_COLOURS = {CYTOPLASM: (40, 200, 80), NUCLEUS: (230, 30, 200)}


def save_label_png(labels: np.ndarray, path: str | Path) -> Path:
    """Save labels as a single-channel 8-bit PNG: 0 background, 1 cytoplasm, 2 nucleus.

    The values are the labels themselves (so the image looks black in a viewer); the overlay is
    the file for people.
    """
    from PIL import Image

    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Tint cytoplasm and nucleus on the image and draw the region outlines.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) labels 0/1/2.
        alpha: tint strength.

    Returns:
        (H, W, 3) uint8 RGB overlay.
    """
    from scipy import ndimage as ndi

    out = np.asarray(image, dtype=np.float64).copy()
    for label, colour in _COLOURS.items():
        region = labels == label
        out[region] = (1 - alpha) * out[region] + alpha * np.array(colour)
    for region, colour in ((labels >= 1, _COLOURS[CYTOPLASM]), (labels == NUCLEUS, _COLOURS[NUCLEUS])):
        edge = region & ~ndi.binary_erosion(region)
        out[edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def shape_features(labels: np.ndarray) -> dict[str, float]:
    """Areas and shape descriptors of the segmented cell (pixels; no physical scale is assumed).

    Returns:
        ``cell_area``, ``nucleus_area``, ``cytoplasm_area``, ``nc_ratio`` (nucleus/cytoplasm area),
        ``nucleus_lobes`` (connected nucleus pieces), ``nucleus_circularity`` (4π·area/perimeter²,
        1 for a disc), ``nucleus_solidity`` (area / convex-hull area: lobed nuclei score low),
        ``cell_circularity`` and ``cell_eccentricity``. Shape values are NaN without a cell.
    """
    from skimage.measure import label as connected
    from skimage.measure import regionprops

    nucleus = labels == NUCLEUS
    cell = labels >= 1
    nucleus_area, cell_area = int(nucleus.sum()), int(cell.sum())
    cytoplasm_area = cell_area - nucleus_area
    features: dict[str, float] = {
        "cell_area": cell_area,
        "nucleus_area": nucleus_area,
        "cytoplasm_area": cytoplasm_area,
        "nc_ratio": nucleus_area / cytoplasm_area if cytoplasm_area else float("nan"),
        "nucleus_lobes": int(connected(nucleus).max()),
        "nucleus_circularity": float("nan"),
        "nucleus_solidity": float("nan"),
        "cell_circularity": float("nan"),
        "cell_eccentricity": float("nan"),
    }
    if nucleus_area:
        props = regionprops(nucleus.astype(np.uint8))[0]
        features["nucleus_circularity"] = _circularity(props.area, props.perimeter)
        features["nucleus_solidity"] = float(props.solidity)
    if cell_area:
        props = regionprops(cell.astype(np.uint8))[0]
        features["cell_circularity"] = _circularity(props.area, props.perimeter)
        features["cell_eccentricity"] = float(props.eccentricity)
    return features


def _circularity(area: float, perimeter: float) -> float:
    # Pixel perimeters of tiny regions are coarse; cap at 1 so a 3-pixel blob is not "rounder than a disc".
    return float(min(1.0, 4 * np.pi * area / perimeter**2)) if perimeter > 0 else float("nan")
