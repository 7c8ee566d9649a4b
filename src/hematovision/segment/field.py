"""Whole-field analysis of a smear image: find, crop, classify and count white cells; count red cells and platelets.

The finder is classical image processing, chosen because it needs no training data
beyond a few frames for tuning, is fast on a CPU and fails in ways that can be explained:

* **White cells** (``finder="adaptive"``, the default): :mod:`hematovision.segment.nuclei` removes
  the background's tint, measures the red-cell diameter by granulometry, thresholds a nuclear-stain
  score (blueness × optical density) per image with Otsu, joins the lobes of a nucleus and grows
  each nucleus box to its cell's size. It was tuned on BCCD and two other labs (``txl_pbc_multilab``).
* **White cells** (``finder="lab"``, the first BCCD finder, kept for comparison): white-cell nuclei
  and platelets take up the basic (blue-purple) dye; red cells and plasma do not. In CIELAB that
  shows on the blue–yellow axis: on BCCD training frames the nucleus pixels have b* ≈ -46
  (5th–95th percentile -60 … -22) while red cells and background have b* ≈ +2 (5th percentile
  -7.5). ``b* < -20`` marks stained pixels; white cells are stained components with a large area
  after a closing that joins the lobes of a segmented nucleus, boxed with a fixed margin. On
  another lab's tint (a cyan background is "blue" everywhere) this fixed threshold fails.
* **Platelets** are small stained components (``b* < -20`` once the background has the hue of
  BCCD's, where this was tuned) outside white cells.
* **Red cells** are the pinker-than-background pixels (Otsu threshold on a*, per image), holes
  filled (their pale centres), white cells removed; touching cells are split by the peaks of the
  distance transform, each peak one cell.

All sizes are expressed relative to the red-cell diameter in pixels (``rbc_diameter``), measured
in each field unless given (about 100 px on BCCD's 640x480 frames).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage as ndi

from hematovision.data.classes import WBC5
from hematovision.errors import DatasetError, HematoVisionError
from hematovision.segment.nuclei import FinderParams, estimate_rbc_diameter, find_nuclei, neutralize_tint

# Classes a found white cell may be given (the five of a differential, plus immature granulocytes).
WHITE_CELL_TYPES = (*WBC5, "ig")
_VOC_NAMES = {"wbc": "wbc", "rbc": "rbc", "platelets": "platelet", "platelet": "platelet"}
FINDERS = ("adaptive", "lab")
# Used only when a field shows nothing to measure the red-cell diameter on (blank, saturated).
_FALLBACK_RBC_DIAMETER = 100.0
# Background colour (relative to its mean) of BCCD's CBC train frames, where the platelet and
# red-cell thresholds were tuned; every field's background is given this hue first.
_TUNING_BACKGROUND = (1.005, 1.010, 0.985)


class Classifier(Protocol):
    """What the field pipeline needs from a white-cell classifier (e.g. ``hematovision.predict.Predictor``)."""

    class_names: Sequence[str]

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, K) class probabilities for N RGB uint8 crops."""
        ...


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates (x1, y1 exclusive), with a cell type."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str = "wbc"

    @property
    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    def iou(self, other: Box) -> float:
        """Intersection over union with another box."""
        width = min(self.x1, other.x1) - max(self.x0, other.x0)
        height = min(self.y1, other.y1) - max(self.y0, other.y0)
        if width <= 0 or height <= 0:
            return 0.0
        inter = width * height
        return inter / (self.area + other.area - inter)

    def as_list(self) -> list[int]:
        return [round(self.x0), round(self.y0), round(self.x1), round(self.y1)]


@dataclass
class WhiteCell:
    """A white cell found in a field.

    Attributes:
        box: the cell's box.
        nucleus_area: stained (nucleus) pixels in it.
        cell_type: the classifier's top class, or ``None`` without a classifier.
        probability: the classifier's probability of that class.
        probabilities: all class probabilities, by class name.
    """

    box: Box
    nucleus_area: int
    cell_type: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass
class FieldResult:
    """Everything found in one field.

    Attributes:
        shape: (H, W) of the image.
        white_cells: white cells with boxes (and types when classified).
        rbc_centers: (N, 2) array of (x, y) red-cell centres.
        platelets: platelet boxes.
        rbc_diameter: the red-cell diameter used (pixels), for drawing and reporting.
    """

    shape: tuple[int, int]
    white_cells: list[WhiteCell]
    rbc_centers: np.ndarray
    platelets: list[Box]
    rbc_diameter: float

    @property
    def counts(self) -> dict[str, int]:
        return {"wbc": len(self.white_cells), "rbc": len(self.rbc_centers), "platelet": len(self.platelets)}

    @property
    def message(self) -> str:
        """A one-line summary, e.g. ``1 white cell (neutrophil), 12 red cells, 2 platelets``."""
        n = len(self.white_cells)
        if n == 0:
            wbc = "no white cell found"
        else:
            types = ", ".join(c.cell_type for c in self.white_cells if c.cell_type)
            wbc = f"{n} white cell{'s' if n > 1 else ''}" + (f" ({types})" if types else "")
        rbc, platelets = len(self.rbc_centers), len(self.platelets)
        return f"{wbc}, {rbc} red cell{'' if rbc == 1 else 's'}, {platelets} platelet{'' if platelets == 1 else 's'}"

    def rbc_boxes(self) -> list[Box]:
        """A box of one red-cell diameter around each red-cell centre."""
        r = self.rbc_diameter / 2.0
        height, width = self.shape
        return [
            Box(max(0.0, x - r), max(0.0, y - r), min(width, x + r), min(height, y + r), "rbc") for x, y in self.rbc_centers
        ]


@dataclass(frozen=True)
class FieldParams:
    """Tuning of the field pipeline; the ``lab`` finder, platelet and red-cell defaults were chosen
    on BCCD's CBC training frames only, the ``adaptive`` finder's in :class:`FinderParams`.

    Sizes are fractions of the red-cell diameter ``rbc_diameter`` (areas of its square).

    Attributes:
        rbc_diameter: typical red-cell diameter in pixels (BCCD: ~100); ``None`` measures it in
            each field (:func:`hematovision.segment.nuclei.estimate_rbc_diameter`).
        finder: ``"adaptive"`` (any lab) or ``"lab"`` (the fixed-threshold BCCD finder).
        nuclei: tuning of the adaptive finder.
        stain_b_max: Lab b* below which a pixel counts as nucleus/platelet stain.
        lobe_gap: closing radius that joins nucleus lobes, × diameter.
        wbc_min_area: smallest nucleus area of a white cell, × diameter².
        box_pad: margin added on each side of the nucleus box, × diameter.
        platelet_min_area: smallest stained area of a platelet, × diameter².
        platelet_max_area: largest stained area of a platelet, × diameter².
        rbc_peak_distance: smallest distance between two red-cell centres, × diameter.
        rbc_min_radius: a distance-transform peak must be at least this deep, × diameter.
    """

    rbc_diameter: float | None = None
    finder: str = "adaptive"
    nuclei: FinderParams = FinderParams()
    stain_b_max: float = -20.0
    lobe_gap: float = 0.09
    wbc_min_area: float = 0.25
    box_pad: float = 0.15
    platelet_min_area: float = 0.015
    platelet_max_area: float = 0.2
    rbc_peak_distance: float = 0.35
    rbc_min_radius: float = 0.15

    def __post_init__(self) -> None:
        if self.finder not in FINDERS:
            raise HematoVisionError(f"unknown white-cell finder {self.finder!r}; known: {', '.join(FINDERS)}")
        if self.rbc_diameter is not None and not self.rbc_diameter > 0:
            raise HematoVisionError(f"the red-cell diameter must be positive, got {self.rbc_diameter}")

    @property
    def diameter(self) -> float:
        """The red-cell diameter in pixels (the fallback when it is still to be measured)."""
        return _FALLBACK_RBC_DIAMETER if self.rbc_diameter is None else self.rbc_diameter

    def px(self, fraction: float) -> float:
        """A length fraction of the red-cell diameter, in pixels."""
        return fraction * self.diameter

    def area(self, fraction: float) -> float:
        """An area fraction of the squared red-cell diameter, in pixels."""
        return fraction * self.diameter**2


def analyze_field(
    image: np.ndarray, params: FieldParams | None = None, classifier: Classifier | None = None
) -> FieldResult:
    """Find white cells, platelets and red cells in a smear field, and classify the white cells.

    Args:
        image: (H, W, 3) uint8 RGB field of any size.
        params: tuning (default: the adaptive finder, red-cell diameter measured in the field).
        classifier: optional white-cell classifier applied to each cell's square crop.

    Returns:
        The cells found; a blank, saturated or cell-free image gives empty lists, never an error.
    """
    params = params or FieldParams()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise HematoVisionError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if params.rbc_diameter is None:
        params = replace(params, rbc_diameter=estimate_rbc_diameter(image) or _FALLBACK_RBC_DIAMETER)
    # The adaptive pipeline finds platelets and red cells after giving the background the hue of
    # the tuning frames, so that a cyan cast is not "stain"; the lab pipeline is the first BCCD one.
    lab = _rgb_to_lab(image if params.finder == "lab" else neutralize_tint(image, target=_TUNING_BACKGROUND))
    stain = _stain_mask(lab, params)
    white_cells = find_white_cells(stain, params) if params.finder == "lab" else locate_white_cells(image, params)
    cell_boxes = [cell.box for cell in white_cells]
    platelets = find_platelets(stain, cell_boxes, params)
    rbc_centers = find_red_cells(lab, stain, cell_boxes, params)
    if classifier is not None and white_cells:
        classify_cells(image, white_cells, classifier)
    return FieldResult(
        shape=image.shape[:2], white_cells=white_cells, rbc_centers=rbc_centers, platelets=platelets,
        rbc_diameter=params.diameter,
    )


def locate_white_cells(image: np.ndarray, params: FieldParams | None = None) -> list[WhiteCell]:
    """White cells of a field with the finder ``params.finder`` (no platelets, red cells or types).

    Args:
        image: (H, W, 3) uint8 RGB field.
        params: tuning; ``rbc_diameter=None`` measures the diameter in this field.
    """
    params = params or FieldParams()
    if params.finder == "adaptive":
        return [
            WhiteCell(box=Box(*nucleus.box, "wbc"), nucleus_area=round(nucleus.area))
            for nucleus in find_nuclei(image, params.rbc_diameter, params.nuclei)
        ]
    if params.rbc_diameter is None:
        params = replace(params, rbc_diameter=estimate_rbc_diameter(image) or _FALLBACK_RBC_DIAMETER)
    return find_white_cells(_stain_mask(_rgb_to_lab(image), params), params)


def find_white_cells(stain: np.ndarray, params: FieldParams) -> list[WhiteCell]:
    """White cells from a fixed-threshold stain mask (the ``lab`` finder): large stained components, lobes joined.

    Args:
        stain: (H, W) boolean mask of stained pixels.
        params: tuning.

    Returns:
        One :class:`WhiteCell` per nucleus, box = nucleus box + margin, clipped to the image.
    """
    height, width = stain.shape
    joined = ndi.binary_closing(stain, structure=_disc(max(1, round(params.px(params.lobe_gap)))), border_value=0)
    components, count = ndi.label(joined | stain)
    if count == 0:
        return []
    areas = np.bincount(components.ravel(), weights=stain.ravel().astype(np.float64), minlength=count + 1)
    cells = []
    pad = params.px(params.box_pad)
    for index, found in enumerate(ndi.find_objects(components), start=1):
        if found is None or areas[index] < params.area(params.wbc_min_area):
            continue
        rows, cols = found
        box = Box(
            max(0.0, cols.start - pad), max(0.0, rows.start - pad),
            min(float(width), cols.stop + pad), min(float(height), rows.stop + pad), "wbc",
        )
        cells.append(WhiteCell(box=box, nucleus_area=int(areas[index])))
    return sorted(cells, key=lambda c: (c.box.y0, c.box.x0))


def find_platelets(stain: np.ndarray, exclude: Sequence[Box], params: FieldParams) -> list[Box]:
    """Platelets: stained components of platelet size whose centre is outside every white-cell box."""
    components, count = ndi.label(ndi.binary_opening(stain, structure=_disc(1)))
    if count == 0:
        return []
    areas = np.bincount(components.ravel(), minlength=count + 1)
    boxes = []
    for index, found in enumerate(ndi.find_objects(components), start=1):
        if found is None or not params.area(params.platelet_min_area) <= areas[index] <= params.area(params.platelet_max_area):
            continue
        rows, cols = found
        box = Box(cols.start, rows.start, cols.stop, rows.stop, "platelet")
        cx, cy = box.center
        if any(b.x0 <= cx < b.x1 and b.y0 <= cy < b.y1 for b in exclude):
            continue
        boxes.append(box)
    return boxes


def find_red_cells(lab: np.ndarray, stain: np.ndarray, exclude: Sequence[Box], params: FieldParams) -> np.ndarray:
    """Red-cell centres: distance-transform peaks of the pink foreground, white cells removed.

    Args:
        lab: (H, W, 3) CIELAB image.
        stain: (H, W) stained (nucleus/platelet) pixels, left out of the threshold so that a
            strongly stained nucleus does not become the "pink" class itself.
        exclude: white-cell boxes (their pixels are not red cells).
        params: tuning.

    Returns:
        (N, 2) float array of (x, y) centres.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu

    redness = lab[..., 1]
    unstained = redness[~stain]
    # A flat a* channel (blank, saturated or gray image) has no pink cells to separate.
    if unstained.size < 100 or float(np.percentile(unstained, 99) - np.percentile(unstained, 1)) < 4.0:
        return np.zeros((0, 2))
    foreground = (redness > threshold_otsu(unstained)) & ~stain
    foreground = ndi.binary_opening(foreground, structure=_disc(3))
    foreground = ndi.binary_fill_holes(foreground)
    for box in exclude:
        x0, y0, x1, y1 = box.as_list()
        foreground[y0:y1, x0:x1] = False
    depth = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(
        depth,
        min_distance=max(1, round(params.px(params.rbc_peak_distance))),
        threshold_abs=params.px(params.rbc_min_radius),
        exclude_border=False,
    )
    return peaks[:, ::-1].astype(np.float64) if len(peaks) else np.zeros((0, 2))


def classify_cells(
    image: np.ndarray, cells: list[WhiteCell], classifier: Classifier, allowed: Sequence[str] | None = WHITE_CELL_TYPES
) -> None:
    """Classify each white cell's square crop in place (type, probability, all probabilities).

    Args:
        image: (H, W, 3) uint8 field.
        cells: white cells found in it.
        classifier: gives (N, K) probabilities over its ``class_names``.
        allowed: the types a found white cell may get. A classifier trained on PBC also knows
            platelets and erythroblasts; the finder already decided the object is a white cell,
            so those classes are dropped and the rest renormalised. ``None`` keeps every class
            (also done when the classifier knows none of the allowed types).
    """
    crops = [crop_square(image, cell.box) for cell in cells]
    probabilities = np.asarray(classifier.predict(crops), dtype=np.float64)
    names = list(classifier.class_names)
    keep = [i for i, name in enumerate(names) if allowed is None or name in allowed]
    if keep:
        names = [names[i] for i in keep]
        probabilities = probabilities[:, keep]
        probabilities = probabilities / np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12)
    for cell, row in zip(cells, probabilities):
        best = int(np.argmax(row))
        cell.cell_type = names[best]
        cell.probability = float(row[best])
        cell.probabilities = {name: float(p) for name, p in zip(names, row)}


def crop_square(image: np.ndarray, box: Box) -> np.ndarray:
    """A square crop centred on the box with the box's longer side, shifted to stay inside the image.

    Classifiers are trained on square single-cell crops; a square keeps the cell's aspect ratio.
    """
    height, width = image.shape[:2]
    side = round(min(max(box.x1 - box.x0, box.y1 - box.y0), height, width))
    cx, cy = box.center
    x0 = round(min(max(cx - side / 2.0, 0), width - side))
    y0 = round(min(max(cy - side / 2.0, 0), height - side))
    return np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])


def read_voc_boxes(path: str | Path) -> list[Box]:
    """Boxes of a Pascal VOC XML file, labels mapped to ``wbc``/``rbc``/``platelet``.

    Raises:
        DatasetError: the file is missing or not VOC XML.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        raise DatasetError(f"{path}: cannot read VOC annotation ({error})") from error
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        bnd = obj.find("bndbox")
        if bnd is None or name not in _VOC_NAMES:
            continue
        x0, y0, x1, y1 = (float(bnd.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(Box(x0, y0, x1, y1, _VOC_NAMES[name]))
    return boxes


def match_boxes(pred: Sequence[Box], truth: Sequence[Box], iou_threshold: float = 0.5) -> tuple[int, int, int, list[float]]:
    """Greedy one-to-one matching by IoU (highest first), as in VOC detection scoring.

    Returns:
        (true positives, false positives, false negatives, IoUs of the matched pairs).
    """
    pairs = sorted(
        ((p.iou(t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True
    )
    used_pred, used_truth, ious = set(), set(), []
    for value, i, j in pairs:
        if value < iou_threshold:
            break
        if i in used_pred or j in used_truth:
            continue
        used_pred.add(i)
        used_truth.add(j)
        ious.append(value)
    tp = len(ious)
    return tp, len(pred) - tp, len(truth) - tp, ious


def match_points_to_boxes(points: np.ndarray, truth: Sequence[Box]) -> tuple[int, int, int]:
    """Match cell centres to ground-truth boxes: a centre matches a box it lies in (one-to-one).

    Used for red cells, whose boxes the finder does not estimate (only centres). Boxes are
    taken smallest first so that a centre in two overlapping boxes goes to the tighter one.

    Returns:
        (matched, unmatched points, unmatched boxes).
    """
    free = list(range(len(points)))
    matched = 0
    for box in sorted(truth, key=lambda b: b.area):
        cx, cy = box.center
        inside = [i for i in free if box.x0 <= points[i, 0] < box.x1 and box.y0 <= points[i, 1] < box.y1]
        if inside:
            best = min(inside, key=lambda i: (points[i, 0] - cx) ** 2 + (points[i, 1] - cy) ** 2)
            free.remove(best)
            matched += 1
    return matched, len(free), len(truth) - matched


def draw_field(image: np.ndarray, result: FieldResult) -> np.ndarray:
    """An overlay: white cells in blue with their type, platelets in green, red-cell centres as red circles.

    Returns:
        (H, W, 3) uint8 RGB image.
    """
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.asarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(canvas.size) / 240))
    radius = result.rbc_diameter * 0.4
    for x, y in result.rbc_centers:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(220, 30, 30), width=line)
    for box in result.platelets:
        draw.rectangle(box.as_list(), outline=(20, 160, 20), width=line)
    for cell in result.white_cells:
        draw.rectangle(cell.box.as_list(), outline=(20, 60, 220), width=2 * line)
        if cell.cell_type:
            label = f"{cell.cell_type} {cell.probability:.2f}"
            x0, y0 = cell.box.x0 + 2 * line, cell.box.y0 + 2 * line
            text_box = draw.textbbox((x0, y0), label)
            draw.rectangle(text_box, fill=(255, 255, 255))
            draw.text((x0, y0), label, fill=(20, 60, 220))
    return np.asarray(canvas)


def _rgb_to_lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(image)


def _stain_mask(lab: np.ndarray, params: FieldParams) -> np.ndarray:
    stain = lab[..., 2] < params.stain_b_max
    # A 1-pixel opening removes JPEG speckle along red-cell rims without eroding nuclei.
    return ndi.binary_opening(stain, structure=_disc(1))


def _disc(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius
