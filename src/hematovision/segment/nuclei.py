"""A white-cell finder for whole smear fields that adapts to each image's stain, tint and magnification.

The BCCD finder of :mod:`~hematovision.segment.field` (``finder="lab"``) thresholds CIELAB b* at a
fixed -20. That works on BCCD's grey-white background but not on another lab's frames: with a cyan
background every pixel is "blue" and red cells become white cells; with a yellow one, or magenta
nuclei (Raabin-WBC), nuclei are missed. This finder measures what it needs from the image itself:

1. **White point.** The background is the brightest part of a smear. Dividing every pixel by its
   colour (the median of the brightest 5 %) turns a cyan, yellow or pink background grey, i.e. it
   removes the tint of the lamp, camera and mounting medium while keeping the brightness.
2. **Red-cell diameter** (when not given): a granulometry. The red-cell foreground (optical
   density above an Otsu threshold, holes filled) is opened with discs of growing radius; the
   radius by which half of the foreground has gone is the typical red-cell radius. Touching and
   oval cells shrink that median a little, which a factor measured on the tuning frames undoes.
   Every other size is a fraction of this diameter, so the finder needs no magnification setting.
3. **Nuclei.** The stain score of a pixel is its blueness (-b* after the white point) times its
   darkness (optical-density norm): nuclei are both, red cells at most one of them. The threshold
   is Otsu's, per image, over the upper half of the scores, so it falls between this image's red
   cells and its nuclei rather than at a number fitted to one lab.
4. **One cell per nucleus.** A closing of 0.2 red-cell diameters joins the lobes of a segmented
   nucleus; components with at least 0.15 diameter² of stain (platelets are smaller) and at most
   3 diameters long are candidates.
5. **Standing out.** Otsu splits even a field without a white cell; a candidate is kept only if
   it is much bluer-and-darker, or much darker, than the image's other cells, and only if the
   "stained" pixels are a minority of the cells.
6. **The cell box** grows each side of the nucleus box by a power law fitted on the tuning frames
   (``box = 1.55 d (nucleus / d)^0.64``): a small nucleus sits in a relatively wide cytoplasm (a
   neutrophil's lobes), a large round one nearly fills its cell (a lymphocyte).

Tuning (every constant above): BCCD CBC *train* frames, and a third of the `bcd` and `raabin` frames
of ``txl_pbc_multilab`` chosen by a hash of the file name (:func:`hematovision.segment.detection.is_tuning_frame`);
scores are reported on the rest (``benchmarks/wbc_detection.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# The granulometric median radius of real (oval, touching, pale-centred) red cells is 0.84 of
# half their box size; measured on the tuning frames of bcd, BCCD and raabin (5th-95th percentiles
# of the ratio 0.72-1.08).
_GRANULOMETRY_BIAS = 0.84
# Optical density that is surely not background (JPEG noise on a bright background is ~0.01).
_BACKGROUND_NOISE = 0.03


@dataclass(frozen=True)
class FinderParams:
    """Tuning of the adaptive white-cell finder (sizes are fractions of the red-cell diameter).

    Attributes:
        work_size: the longer image side the finder works at (speed; sizes are rescaled back).
        lobe_gap: closing radius that joins the lobes of one nucleus, × diameter.
        min_area: smallest stained area of a white cell's nucleus, × diameter².
        max_size: longest side of a nucleus box, × diameter (the largest nuclei measure ~2.5).
        opening: opening radius that removes thin stained rims (chromatic fringes of red cells), × diameter.
        min_threshold: lowest stain-score threshold, for images with almost no stain.
        max_stained_share: above this share of the cells' pixels stained, nothing stands out (no nucleus).
        min_score_contrast: a nucleus's median stain score is at least this many times the 95th
            percentile of the other cells' (red cells') scores ...
        min_density_contrast: ... or its median optical density this many times theirs.
        box_scale, box_power: cell box side = box_scale · d · (nucleus side / d) ** box_power.
    """

    work_size: int = 320
    lobe_gap: float = 0.2
    min_area: float = 0.15
    max_size: float = 3.0
    opening: float = 0.03
    min_threshold: float = 4.0
    max_stained_share: float = 0.5
    min_score_contrast: float = 2.3
    min_density_contrast: float = 1.65
    box_scale: float = 1.55
    box_power: float = 0.64


@dataclass(frozen=True)
class Nucleus:
    """A white cell's nucleus found by :func:`find_nuclei`, in full-image pixel coordinates.

    Attributes:
        box: (x0, y0, x1, y1) of the cell (nucleus box grown to the cell's size), clipped to the image.
        nucleus_box: (x0, y0, x1, y1) of the stained pixels.
        area: stained pixels (full resolution).
    """

    box: tuple[float, float, float, float]
    nucleus_box: tuple[float, float, float, float]
    area: float


def white_point(image: np.ndarray) -> np.ndarray:
    """The background colour of a smear: the median RGB of its brightest 5 % of pixels.

    Args:
        image: (H, W, 3) RGB, any numeric type.

    Returns:
        (3,) float64 colour (at least 1 in each channel).
    """
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    brightness = pixels.sum(axis=1)
    bright = pixels[brightness >= np.percentile(brightness, 95)]
    return np.maximum(np.median(bright, axis=0), 1.0)


def neutralize_tint(
    image: np.ndarray, white: np.ndarray | None = None, target: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Give the background a chosen hue at its own brightness (a white balance on the background).

    Args:
        image: (H, W, 3) uint8 RGB.
        white: its background colour (default :func:`white_point`).
        target: the background's RGB relative to its mean (default grey; e.g. the slightly warm
            background of the frames a fixed colour threshold was tuned on).

    Returns:
        (H, W, 3) uint8 RGB with the background's tint replaced.
    """
    white = white_point(image) if white is None else white
    gain = np.asarray(target, dtype=np.float64) * white.mean() / white
    return np.clip(np.asarray(image, dtype=np.float64) * gain + 0.5, 0, 255).astype(np.uint8)


def stain_score(image: np.ndarray, white: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel nuclear-stain score: blueness after the white point times optical density.

    Args:
        image: (H, W, 3) RGB (uint8 or float in 0-255).
        white: the background colour (default :func:`white_point`).

    Returns:
        (H, W) float32, 0 on background and red cells with no blue, largest on nuclei.
    """
    from skimage.color import rgb2lab

    pixels = np.asarray(image, dtype=np.float64)
    white = white_point(pixels) if white is None else white
    density = np.clip(-np.log10((pixels + 1.0) / (white + 1.0)), 0.0, None)
    # Lab of the white-balanced image, background mapped to a light grey (235): only the hue matters.
    balanced = np.clip(pixels / white * 235.0, 0.0, 255.0) / 255.0
    blueness = np.clip(-rgb2lab(balanced)[..., 2], 0.0, None)
    return (blueness * np.sqrt((density**2).sum(axis=2))).astype(np.float32)


def estimate_rbc_diameter(image: np.ndarray, work_size: int = 256) -> float | None:
    """Typical red-cell diameter in pixels, measured by granulometry (see the module docstring).

    Args:
        image: (H, W, 3) RGB field.
        work_size: the longer side the measurement runs at.

    Returns:
        The diameter in the image's pixels, or ``None`` when the image shows no cell-like foreground.
    """

    small, factor = _downscale(np.asarray(image), work_size)
    if min(small.shape[:2]) < 8:
        return None
    white = white_point(small)
    foreground = _cell_foreground(_density(_fill_with_background(small, white), white))
    if foreground is None:
        return None
    foreground = ndi.binary_closing(foreground, structure=_disc(1))
    foreground = ndi.binary_opening(ndi.binary_fill_holes(foreground), structure=_disc(1))
    depth = ndi.distance_transform_edt(foreground)
    total = float(foreground.sum())
    if total < 50:
        return None
    # Area left after an opening with a disc of radius r: pixels within r of a point at depth >= r.
    for radius in range(1, max(2, min(small.shape[:2]) // 2)):
        core = depth >= radius
        left = float((ndi.distance_transform_edt(~core) < radius).sum()) if core.any() else 0.0
        if left <= total / 2:
            return 2.0 * radius / _GRANULOMETRY_BIAS / factor
    return None


def find_nuclei(image: np.ndarray, rbc_diameter: float | None = None, params: FinderParams | None = None) -> list[Nucleus]:
    """White-cell nuclei and cell boxes in a smear field (the adaptive finder).

    Args:
        image: (H, W, 3) uint8 RGB field of any size, stain and tint.
        rbc_diameter: red-cell diameter in pixels; ``None`` measures it (:func:`estimate_rbc_diameter`).
        params: tuning.

    Returns:
        One :class:`Nucleus` per white cell, top to bottom; a blank or cell-free image gives ``[]``.
    """
    from skimage.filters import threshold_otsu

    params = params or FinderParams()
    image = np.asarray(image)
    height, width = image.shape[:2]
    if rbc_diameter is None:
        rbc_diameter = estimate_rbc_diameter(image)
        if rbc_diameter is None:
            return []
    small, factor = _downscale(image, params.work_size)
    if min(small.shape[:2]) < 8:
        return []
    d = rbc_diameter * factor  # diameter in work pixels
    white = white_point(small)
    small = _fill_with_background(small, white)
    score = stain_score(small, white)
    upper = score[score > np.median(score)]
    if upper.size < 10 or float(upper.max() - upper.min()) < 1e-3:
        return []
    threshold = max(params.min_threshold, float(threshold_otsu(upper)))
    stain = ndi.binary_opening(score > threshold, structure=_disc(max(1, round(params.opening * d))))
    joined = ndi.binary_closing(stain, structure=_disc(max(1, round(params.lobe_gap * d))), border_value=0) | stain
    components, count = ndi.label(joined)
    if count == 0:
        return []
    areas = np.bincount(components.ravel(), weights=stain.ravel().astype(np.float64), minlength=count + 1)
    density = _density(small, white)
    cells = _cell_foreground(density)
    if cells is None or stain.sum() > params.max_stained_share * cells.sum():
        # Most of the cells are "stained": the threshold split background from all cells (a
        # sparse field of bluish red cells), not red cells from a minority of nuclei.
        return []
    reference = cells & ~stain  # the other cells (mostly red cells): what a nucleus must stand out from
    if not reference.any():
        return []
    score_ref = max(float(np.percentile(score[reference], 95)), 1e-6)
    density_ref = max(float(np.median(density[reference])), 1e-6)
    found = []
    for index, slices in enumerate(ndi.find_objects(components), start=1):
        if slices is None or areas[index] < params.min_area * d * d:
            continue
        rows, cols = slices
        if max(rows.stop - rows.start, cols.stop - cols.start) > params.max_size * d:
            continue  # not one nucleus: stained rims of many red cells joined
        mask = (components[slices] == index) & stain[slices]
        # A nucleus stands out from the red cells by stain (blue and dark) or by darkness alone;
        # a red cell's bluish rim in a field without white cells does neither.
        if (np.median(score[slices][mask]) < params.min_score_contrast * score_ref
                and np.median(density[slices][mask]) < params.min_density_contrast * density_ref):
            continue
        nucleus = (cols.start / factor, rows.start / factor, cols.stop / factor, rows.stop / factor)
        found.append(Nucleus(
            box=_cell_box(nucleus, rbc_diameter, params, width, height),
            nucleus_box=nucleus, area=float(areas[index]) / factor**2,
        ))
    return sorted(found, key=lambda n: (n.box[1], n.box[0]))


def _cell_box(
    nucleus: tuple[float, float, float, float], d: float, params: FinderParams, width: int, height: int
) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = nucleus
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    half_w = params.box_scale * d * ((x1 - x0) / d) ** params.box_power / 2.0
    half_h = params.box_scale * d * ((y1 - y0) / d) ** params.box_power / 2.0
    # Never smaller than the nucleus itself.
    half_w, half_h = max(half_w, (x1 - x0) / 2.0), max(half_h, (y1 - y0) / 2.0)
    return max(0.0, cx - half_w), max(0.0, cy - half_h), min(float(width), cx + half_w), min(float(height), cy + half_h)


def _fill_with_background(pixels: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Paint near-black pixels (a rotated frame's constant fill, a vignette) in the background colour.

    No stained cell is that dark in every channel (a nucleus keeps its blue), and left black they
    would count as the densest "cells" of the image.
    """
    fill = pixels.max(axis=2) < 0.2 * float(white.mean())
    return np.where(fill[..., None], white, pixels) if fill.any() else pixels


def _density(pixels: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Optical-density norm relative to the background colour (0 on background)."""
    return np.sqrt((np.clip(-np.log10((pixels + 1.0) / (white + 1.0)), 0.0, None) ** 2).sum(axis=2))


def _cell_foreground(density: np.ndarray) -> np.ndarray | None:
    """Cells (red and white) vs background by Otsu on the optical density, or ``None`` if flat."""
    from skimage.filters import threshold_otsu

    # Clip the darkest 15 % (nuclei) so that Otsu separates background from red cells; in a sparse
    # field that percentile is background, so never clip below the cells' median.
    cells = density[density > _BACKGROUND_NOISE]
    if cells.size < 50:
        return None
    clipped = np.minimum(density, max(float(np.percentile(density, 85)), float(np.median(cells))))
    if float(clipped.max() - clipped.min()) < 0.02:
        return None
    return density > threshold_otsu(clipped)


def _downscale(image: np.ndarray, work_size: int) -> tuple[np.ndarray, float]:
    """(float64 image with its longer side at most ``work_size``, scale factor)."""
    from skimage.transform import rescale

    factor = min(1.0, work_size / max(image.shape[:2]))
    pixels = np.asarray(image, dtype=np.float64)
    if factor < 1.0:
        pixels = rescale(pixels, factor, channel_axis=2, anti_aliasing=True, preserve_range=True)
        factor = pixels.shape[0] / image.shape[0]
    return pixels, factor


def _disc(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius
