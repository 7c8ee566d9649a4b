"""Scale normalisation: find the white cell in a crop and resample it to a canonical diameter.

Another lab's microscope and camera show a white cell at another size in pixels (BCCD's cells are
about 3x larger than PBC's). Like cellpose's size model, the image is rescaled so that the cell
has one diameter, as a fraction of the network's input, before the network sees it.

How the cell is found (:func:`find_cell`), on a copy at most :data:`WORK_SIDE` pixels wide so that
it costs a few milliseconds whatever the image size:

1. **Optical density against the image's own background.** The background colour (white point) is
   the median of the brightest fifth of the pixels, and every pixel's absorbance is
   ``log(background / pixel)`` per channel. Dividing by the image's own white point removes a
   yellow (Zheng), grey or pink background tint, so one threshold rule works across stains.
2. **Nucleus.** The top class of a three-class Otsu split of the summed absorbance (background,
   red cells and cytoplasm, nucleus): in every stain seen so far the nucleus is what absorbs
   most. The dark component nearest the image centre is the cell's nucleus; other dark
   components within a nucleus-width of it join as lobes if their colour is the nucleus's.
3. **Cytoplasm.** Each image teaches its own colours: the nucleus colour (its median), the
   cytoplasm colour (median of a ring just outside the nucleus), the background (white point) and
   the red cells (stained pixels on the image border, away from the cell). Every pixel takes the
   nearest of these in CIELAB; the cell is the nucleus plus the connected cytoplasm-or-nucleus
   pixels, holes filled. A fixed threshold cannot do this: the pale lilac cytoplasm of a BCCD
   neutrophil is as light as the red cells around it and differs from them only in hue.
4. **Diameter.** The cell's equivalent-circle diameter, plus 1.5 working pixels: edge pixels, half
   cell and half background, go either way, and about that much is lost on Zheng's and BCCD's
   expert masks. Its centroid is the centre of the square that :func:`rescale_to_cell` cuts.

Measured by ``benchmarks/cell_diameters.py`` (the few constants above were chosen looking at
these same images, so the figures are optimistic): median relative error of the diameter 2.5 %
on Zheng's 300 expert masks and 3.5 % on BCCD's 354 single-cell expert masks (96 % and 94 % of
the cells within 15 %); 7.2 % against Raabin's WBC boxes (78 % within 15 %; without step 1's
white point 20 %). A crop whose edge cuts the cell understates it (BCCD, a quarter of the cell
cut off: -12 %). About 5 ms of CPU per image.

What it takes away: a cell's absolute size is a cue (PBC lymphocytes span 0.28 of the image,
monocytes 0.44, platelets 0.16); after normalisation only the context (how large the red cells
around it look) still carries it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

WORK_SIDE = 96
"""The cell is looked for on a copy whose longer side is at most this many pixels."""

DEFAULT_CELL_SCALE = 0.38
"""The median diameter of PBC's white cells as a fraction of the image side (0.30-0.41 IQR over 300
images): at this setting PBC images change little and other labs' cells are brought to PBC's scale."""

_MIN_SIDE = 16  # smaller images hold no measurable cell
_MIN_CONTRAST_OD = 0.3  # summed absorbance between darkest and lightest: flat images have less
_warned = threading.Event()
_NUCLEUS, _CYTOPLASM = 1, 2  # indices of the colour prototypes (0 background, 3 red cells)


@dataclass(frozen=True)
class CellMeasurement:
    """The white cell found in an image, in that image's pixel coordinates.

    Attributes:
        diameter: equivalent-circle diameter of the whole cell (nucleus and cytoplasm), pixels.
        center: (row, column) of the cell's centroid.
        nucleus_diameter: equivalent-circle diameter of the nucleus (all its lobes), pixels.
    """

    diameter: float
    center: tuple[float, float]
    nucleus_diameter: float


def find_cell(image: np.ndarray) -> CellMeasurement | None:
    """Find the white cell nearest the centre of a single-cell image and measure it.

    Args:
        image: (H, W, 3) RGB or (H, W) grey uint8 pixels, any size.

    Returns:
        The cell's diameter and centre, or ``None`` when the image holds nothing cell-like (flat,
        noise, blank, too small).
    """
    rgb = _as_rgb(image)
    if rgb is None:
        return None
    height, width = rgb.shape[:2]
    shrink = min(1.0, WORK_SIDE / max(height, width))
    small = rgb if shrink == 1.0 else np.asarray(
        Image.fromarray(rgb).resize((max(1, round(width * shrink)), max(1, round(height * shrink))),
                                    Image.Resampling.BILINEAR, reducing_gap=2.0))
    found = _find_cell_small(small)
    if found is None:
        return None
    diameter, (row, col), nucleus = found
    # Back to the original image's pixels (pixel centres: working pixel i covers [i, i + 1) * step).
    sy, sx = height / small.shape[0], width / small.shape[1]
    scale = (sy + sx) / 2.0
    return CellMeasurement(diameter * scale, ((row + 0.5) * sy - 0.5, (col + 0.5) * sx - 0.5), nucleus * scale)


def measure_cell_diameter(image: np.ndarray) -> float | None:
    """The white cell's equivalent-circle diameter in pixels, or ``None`` when no cell is found."""
    cell = find_cell(image)
    return None if cell is None else cell.diameter


def rescale_to_cell(image: np.ndarray, cell_scale: float) -> np.ndarray:
    """Crop or pad ``image`` around its white cell so the cell's diameter is ``cell_scale`` of the side.

    The result is a square centred on the cell, at the image's own resolution; the resize that
    follows in :meth:`~hematovision.data.transforms.Preprocessing.prepare` brings it to the
    network's input size. Where the square reaches past the image it is filled with the median
    colour of the image's border (reflecting would mirror the cell itself into a crop that is
    larger than the image).

    Args:
        image: (H, W, 3) RGB or (H, W) grey uint8 pixels.
        cell_scale: the fraction of the output's side the cell's diameter should span, in (0, 1].

    Returns:
        The square crop; the image unchanged when no white cell is found (a warning is logged
        once per process; :func:`measure_cell_diameter` tells a caller which images those are).

    Raises:
        ValueError: ``cell_scale`` is not in (0, 1].
    """
    if not 0.0 < cell_scale <= 1.0:
        raise ValueError(f"cell_scale must be in (0, 1], got {cell_scale}")
    cell = find_cell(image)
    if cell is None:
        if not _warned.is_set():
            _warned.set()
            log.warning("no white cell found in an image (%s): it is resized as it is, without scale "
                        "normalisation; further such images are not reported (hematovision.data.scale."
                        "measure_cell_diameter returns None for them)", "x".join(map(str, np.shape(image))))
        return image
    side = max(1, round(cell.diameter / cell_scale))
    image = np.asarray(image)
    return crop_square(image, cell.center, side, _border_colour(image))


def crop_square(image: np.ndarray, center: tuple[float, float], side: int, fill: np.ndarray | float) -> np.ndarray:
    """A ``side`` x ``side`` crop centred on ``center`` (row, col of pixel centres); outside the image is ``fill``."""
    top = int(np.floor(center[0] - (side - 1) / 2.0 + 0.5))
    left = int(np.floor(center[1] - (side - 1) / 2.0 + 0.5))
    height, width = image.shape[:2]
    y0, y1 = max(0, top), min(height, top + side)
    x0, x1 = max(0, left), min(width, left + side)
    if y0 == top and x0 == left and y1 == top + side and x1 == left + side:
        return np.ascontiguousarray(image[y0:y1, x0:x1])
    canvas = np.empty((side, side) + image.shape[2:], dtype=image.dtype)
    canvas[...] = fill
    if y1 > y0 and x1 > x0:
        canvas[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return canvas


def _as_rgb(image: np.ndarray) -> np.ndarray | None:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    else:
        return None
    if min(image.shape[:2]) < _MIN_SIDE:
        return None
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the image's outermost pixels: what surrounds the cell, as the zoom-out of
    strong augmentation (:func:`hematovision.data.transforms._degrade`) also fills it."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.asarray(np.median(border, axis=0).round().astype(image.dtype))


@dataclass(frozen=True)
class CellMasks:
    """The white cell found in an image, as masks over that image's pixels.

    Attributes:
        nucleus: (H, W) bool, all its lobes.
        cell: (H, W) bool, nucleus and cytoplasm, holes filled.
        density: (H, W, 3) float32 absorbance per channel against the image's own background.
    """

    nucleus: np.ndarray
    cell: np.ndarray
    density: np.ndarray


def cell_masks(rgb: np.ndarray) -> CellMasks | None:
    """Steps 1-3 of the module docstring on an RGB uint8 image (used as it is: shrink it first).

    ``None`` when nothing in the image is cell-like.
    """
    pixels = rgb.astype(np.float32) + 1.0
    brightness = pixels.sum(axis=2)
    bright = brightness >= np.percentile(brightness, 80)
    white = np.median(pixels[bright], axis=0)
    density = np.log(white / pixels).clip(min=0.0)  # absorbance against the image's own background
    total = density.sum(axis=2)
    seed = _nucleus_seed(total)
    if seed is None:
        return None
    dark, components, big, main_index = seed
    main = components == main_index
    main_diameter = 2.0 * np.sqrt(main.sum() / np.pi)
    to_main = ndi.distance_transform_edt(~main)
    nearest = _nearest_colour(rgb, total, bright, dark, main, to_main, main_diameter)
    if nearest is None:
        return None

    # Lobes: dark pieces near the main one that have the nucleus's colour (not a dark red cell).
    nucleus = main.copy()
    near_main = to_main <= main_diameter + 2.0
    for index in big:
        piece = components == index
        if index != main_index and (piece & near_main).any() and np.mean(nearest[piece] == _NUCLEUS) >= 0.5:
            nucleus |= piece
    cellish = ndi.binary_opening((nearest == _NUCLEUS) | (nearest == _CYTOPLASM), structure=_disc(1)) | nucleus
    regions, _ = ndi.label(cellish)
    keep = np.unique(regions[nucleus])
    cell = _fill_holes(np.isin(regions, keep[keep > 0]))
    return CellMasks(nucleus, cell, density)


def _find_cell_small(rgb: np.ndarray) -> tuple[float, tuple[float, float], float] | None:
    """The steps of the module docstring on the working copy: (diameter, centre, nucleus diameter)."""
    masks = cell_masks(rgb)
    if masks is None:
        return None
    # Edge pixels are half cell, half background and go either way: ~1.5 working pixels of
    # diameter are lost on average (measured on Zheng's and BCCD's masks).
    diameter = float(2.0 * np.sqrt(masks.cell.sum() / np.pi) + 1.5)
    row, col = ndi.center_of_mass(masks.cell)
    return diameter, (float(row), float(col)), float(2.0 * np.sqrt(masks.nucleus.sum() / np.pi))


def _nucleus_seed(total: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int], int] | None:
    """Dark mask, its components, the big ones and the one nearest the centre; ``None`` if nothing is dark."""
    from skimage.filters import threshold_multiotsu

    if float(total.max() - total.min()) < _MIN_CONTRAST_OD:
        return None
    try:
        threshold = threshold_multiotsu(total, classes=3)[1]
    except ValueError:  # fewer than three grey levels
        return None
    dark = ndi.binary_opening(total > threshold, structure=_disc(1))
    components, count = ndi.label(dark)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    big = [i for i in range(1, count + 1) if sizes[i] >= max(4, 0.004 * total.size)]
    if not big:
        return None
    height, width = total.shape
    centroids = ndi.center_of_mass(dark, components, big)
    main_index = big[int(np.argmin([np.hypot(r - height / 2.0, c - width / 2.0) for r, c in centroids]))]
    return dark, components, big, main_index


def _nearest_colour(rgb: np.ndarray, total: np.ndarray, bright: np.ndarray, dark: np.ndarray, main: np.ndarray,
                    to_main: np.ndarray, main_diameter: float) -> np.ndarray | None:
    """Per pixel, the index of the nearest of the image's own colours in CIELAB: background (0),
    nucleus (1), cytoplasm (2, a ring just outside the nucleus) and red cells (3, stained pixels
    on the image border away from the cell, when there are enough)."""
    from skimage.color import rgb2lab

    grown = to_main <= max(1, round(0.25 * main_diameter))
    ring = grown & ~dark
    if ring.sum() < 4:
        ring = grown & ~main
    if ring.sum() < 4:
        return None
    lab = rgb2lab(rgb).astype(np.float32)
    prototypes = [np.median(lab[bright], axis=0), np.median(lab[main], axis=0), np.median(lab[ring], axis=0)]
    height, width = total.shape
    band = max(1, round(0.04 * min(height, width)))
    border = np.ones((height, width), dtype=bool)
    border[band:-band, band:-band] = False
    # Away from the nucleus: where the cell reaches the border (a tight crop) that is cytoplasm.
    border &= to_main > 0.6 * main_diameter
    stained = border & (total > 0.5 * float(np.median(total[ring])))
    if stained.sum() > 0.05 * max(1, border.sum()):
        prototypes.append(np.median(lab[stained], axis=0))
    centres = np.stack(prototypes)
    return np.asarray(((lab[:, :, None, :] - centres) ** 2).sum(axis=-1).argmin(axis=-1))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # Background regions that do not reach the border are holes; one labelling is much faster
    # than binary_fill_holes' repeated dilations.
    regions, _ = ndi.label(~mask)
    outside = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    return mask | ~np.isin(regions, outside[outside > 0])


def _disc(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(x * x + y * y <= radius * radius)
