"""The morphology expert: what a hematologist reads off a cell, measured so that no lab's stain sets it.

A network's features carry the lab: its stain, camera and optics move every one of them. The
measurements here are taken from the cell's own masks (:func:`hematovision.data.scale.cell_masks`) and
are ratios against the same image: the nucleus's share of the cell, how many lobes it has, how round
and how thick it is; the hue of nucleus and cytoplasm as each channel's share of their absorbance
(against the image's own background), how dark the cytoplasm is against the nucleus, how grainy
each is. A lymphocyte's round nucleus filling the cell, a neutrophil's thin lobes, an eosinophil's
red-orange grainy cytoplasm, a basophil's dark granules look alike in every lab.

A run trained with ``hematovision train --lab-standardise --morphology`` keeps a small logistic head
on these measurements in its card (:class:`MorphologyExpert`), standardised per lab like the network's
head. It joins when a lab's cells are scored on that lab's own statistics: ``evaluate`` re-scoring
another lab's folder, and every prediction of a run that ``adapt --unlabelled`` fitted to a lab
(:attr:`MorphologyExpert.lab`). Its log-probabilities are then added to the network's (a product of
experts, weight :data:`DEFAULT_WEIGHT`): ``(1 - w) * log_softmax(network) + w * log_softmax(morphology)``.
On the training labs' own cells the network speaks alone (fused, the recommended model's test split
gained on PBC and lost on BCCD and Zheng: docs/labs.md). The cells are measured after scale
normalisation and before stain normalisation (:func:`prepare_measured`): the network sees Reinhard's
pixels, the expert the lab's own colours.

Numpy, scipy and scikit-image only: inference through an exported backend still needs no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage as ndi

from hematovision.data.transforms import Preprocessing, resize
from hematovision.infer.lab_standardise import class_balanced_moments, lab_moments

WORK_SIDE = 112
"""The scale-normalised image is measured at this side: at ``--cell-scale 0.38`` the cell is ~43 pixels wide."""

FEATURES = (
    "nucleus_share", "nucleus_pieces", "nucleus_pieces_eroded", "nucleus_solidity", "nucleus_eccentricity",
    "nucleus_perimeter_ratio", "cell_solidity", "cell_eccentricity", "nucleus_to_cell_length",
    "nucleus_thickness_max", "nucleus_thickness_mean",
    "nucleus_hue_r", "nucleus_hue_g", "nucleus_hue_b", "cytoplasm_hue_r", "cytoplasm_hue_g", "cytoplasm_hue_b",
    "cytoplasm_to_nucleus_density", "cytoplasm_spread", "nucleus_spread", "cytoplasm_dark_tail",
    "cytoplasm_grain", "nucleus_grain",
)
"""The measurements, in the order of a feature vector (all dimensionless)."""

DEFAULT_WEIGHT = 0.5
"""The expert's share of the fused log-probabilities. Chosen leave-one-lab-out on PBC, BCCD and Zheng
(0.3, 0.5 and 0.7 tried; docs/labs.md), not on a run's own validation split: the expert is for other
labs' cells, and in-lab the network is the better half."""


def cell_features(pixels: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` of the white cell in one scale-normalised image; NaN when no cell is found.

    Args:
        pixels: (S, S, 3) uint8, the cell after scale normalisation, in the lab's own colours (see
            :func:`prepare_measured`); resized to :data:`WORK_SIDE` here when it has another side.
    """
    from hematovision.data.scale import cell_masks

    masks = cell_masks(resize(np.asarray(pixels), WORK_SIDE))
    out = np.full(len(FEATURES), np.nan)
    if masks is None or masks.nucleus.sum() < 4 or masks.cell.sum() < 4:
        return out
    from skimage.measure import regionprops

    nucleus, cell, density = masks.nucleus, masks.cell, masks.density
    cytoplasm = cell & ~nucleus
    nucleus_area = float(nucleus.sum())
    shape_n = regionprops(nucleus.astype(np.uint8))[0]  # type: ignore[no-untyped-call]
    shape_c = regionprops(cell.astype(np.uint8))[0]  # type: ignore[no-untyped-call]
    eroded = ndi.binary_erosion(nucleus, structure=np.ones((3, 3), bool), iterations=2)
    thickness = ndi.distance_transform_edt(nucleus)
    root = np.sqrt(nucleus_area)
    total = density.sum(axis=2)
    n_density = density[nucleus].mean(axis=0)
    has_cytoplasm = cytoplasm.sum() > 3
    c_density = density[cytoplasm].mean(axis=0) if has_cytoplasm else np.zeros(3)
    n_total = max(float(total[nucleus].mean()), 1e-6)
    c_total = total[cytoplasm] if has_cytoplasm else np.zeros(1)
    detail = np.abs(total - ndi.gaussian_filter(total, 1.5))  # granules: fine absorbance detail
    out[:] = [
        nucleus_area / cell.sum(), ndi.label(nucleus)[1], ndi.label(eroded)[1],
        shape_n.solidity, shape_n.eccentricity, shape_n.perimeter**2 / (4 * np.pi * nucleus_area),
        shape_c.solidity, shape_c.eccentricity, shape_n.axis_major_length / max(shape_c.axis_major_length, 1.0),
        thickness.max() / root, thickness[nucleus].mean() / root,
        *_hue(n_density), *_hue(c_density), c_density.sum() / max(n_density.sum(), 1e-6),
        c_total.std() / n_total, total[nucleus].std() / n_total, np.percentile(c_total, 90) / n_total,
        detail[cytoplasm].mean() / n_total if has_cytoplasm else 0.0, detail[nucleus].mean() / n_total,
    ]
    return out


class Measured(NamedTuple):
    """A prepared image with its cell's measurements: what the predictor scores when its expert is in use."""

    pixels: np.ndarray
    measured: np.ndarray


def pixels_of(item: np.ndarray | Measured) -> np.ndarray:
    """The network's input pixels of a prepared image, measured or not."""
    return item.pixels if isinstance(item, Measured) else item


def prepare_measured(image: np.ndarray, prep: Preprocessing) -> Measured:
    """A decoded image → the network's input pixels and the cell's :data:`FEATURES`.

    The cell is measured after scale normalisation and before stain normalisation
    (:meth:`~hematovision.data.transforms.Preprocessing.rescale`): the measurements are ratios within
    the image, and Reinhard's per-channel mapping moves what the cell finder and the hues see (leave
    one lab out, fused: a mean balanced accuracy of 0.68 measured in the lab's own colours, 0.63 in
    Reinhard's; docs/labs.md).
    """
    scaled = prep.rescale(image)
    return Measured(prep.finish(scaled), cell_features(scaled))


def measure(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The :data:`FEATURES` of a decoded image's cell, as :func:`prepare_measured` takes them."""
    return cell_features(prep.rescale(image))


def measure_files(paths: Sequence[Path], prep: Preprocessing, desc: str = "measuring cells") -> np.ndarray:
    """(N, F) measurements of image files (decoded again: prepared pixels have lost the lab's colours)."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs installed

    from hematovision.data.images import load_rgb

    rows = [measure(load_rgb(path), prep) for path in tqdm(paths, desc=desc, unit="img")]
    return np.stack(rows) if rows else np.zeros((0, len(FEATURES)))


def _hue(density: np.ndarray) -> np.ndarray:
    """Each channel's share of the absorbance: the colour without its strength."""
    return np.asarray(density / max(float(density.sum()), 1e-6))


@dataclass
class MorphologyExpert:
    """A linear head on standardised :data:`FEATURES`, fused with the network's logits.

    Attributes:
        mean, std: (F,) the standardisation (per-lab runs: the labs' average, as the network's head).
        weight, bias: (K, F) and (K,) the head.
        fusion: the expert's share ``w`` of the fused log-probabilities.
        standardisation: ``per_lab`` (each training lab on its own statistics) or ``training``.
        lab: the lab whose statistics ``mean`` and ``std`` are (set by ``adapt --unlabelled``): the
            expert is then fused into every prediction. ``None``: the training labs' average, and the
            expert joins only when ``evaluate`` re-scores another lab on its own statistics.
    """

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    fusion: float = DEFAULT_WEIGHT
    standardisation: str = "training"
    lab: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weight": self.weight.tolist(), "bias": self.bias.tolist(), "fusion": self.fusion,
                "standardisation": self.standardisation, "lab": self.lab}

    @classmethod
    def from_dict(cls, data: dict[str, Any], num_classes: int) -> MorphologyExpert:
        """Read the card's ``morphology`` section; ``ValueError`` says what is wrong with it."""
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError("its features are not the ones this version measures")
        try:
            mean, std, weight, bias = (np.asarray(data[key], dtype=np.float64) for key in ("mean", "std", "weight", "bias"))
            lab = data.get("lab")
            expert = cls(mean, std, weight, bias, fusion=float(data["fusion"]), standardisation=str(data["standardisation"]),
                         lab=None if lab is None else str(lab))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"it is incomplete or not numeric ({error})") from None
        f = len(FEATURES)
        shapes = (expert.mean.shape, expert.std.shape, expert.weight.shape, expert.bias.shape)
        if shapes != ((f,), (f,), (num_classes, f), (num_classes,)):
            raise ValueError(f"its arrays have shapes {shapes}, expected {(f,)}, {(f,)}, {(num_classes, f)}, {(num_classes,)}")
        arrays = (expert.mean, expert.std, expert.weight, expert.bias)
        if not all(np.isfinite(a).all() for a in arrays) or (expert.std <= 0).any():
            raise ValueError("it holds non-finite numbers or a non-positive scale")
        if not 0.0 < expert.fusion <= 1.0 or expert.standardisation not in ("per_lab", "training"):
            raise ValueError(f"fusion {expert.fusion} or standardisation {expert.standardisation!r} is out of range")
        return expert

    def filled(self, features: np.ndarray) -> np.ndarray:
        """NaN measurements (no cell found) become the training mean: the expert then adds no opinion."""
        x = np.asarray(features, dtype=np.float64)
        return np.where(np.isnan(x), self.mean, x)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, K) the expert's logits."""
        return np.asarray(((self.filled(features) - self.mean) / self.std) @ self.weight.T + self.bias)

    def on_lab(self, features: np.ndarray, lab: str | None = None) -> MorphologyExpert:
        """This expert standardised on a lab's own cells: class-balanced with its own predicted classes
        for a per-lab expert (as the network's features, :func:`~hematovision.infer.lab_standardise.lab_moments`),
        else the cells' plain statistics."""
        filled = self.filled(features)
        mean, std = (lab_moments(filled, self.weight, self.bias) if self.standardisation == "per_lab"
                     else class_balanced_moments(filled, np.ones((len(filled), 1))))
        return replace(self, mean=np.asarray(mean, np.float64), std=np.asarray(std, np.float64), lab=lab)

    def fuse(self, network_logits: np.ndarray, features: np.ndarray,
             expert_logits: np.ndarray | None = None) -> np.ndarray:
        """The fused logits: ``(1 - w) * log_softmax(network) + w * log_softmax(expert)``."""
        own = self.logits(features) if expert_logits is None else expert_logits
        return np.asarray((1.0 - self.fusion) * _log_softmax(network_logits) + self.fusion * _log_softmax(own),
                          dtype=np.float32)


def expert_of(section: dict[str, Any] | None, num_classes: int) -> MorphologyExpert | None:
    """The expert of a card's ``morphology`` section (validated with the card), ``None`` without one."""
    return MorphologyExpert.from_dict(section, num_classes) if section else None


def fused_expert(section: dict[str, Any] | None, num_classes: int) -> MorphologyExpert | None:
    """The expert to fuse into every prediction: only one holding a lab's own statistics (:attr:`MorphologyExpert.lab`)."""
    expert = expert_of(section, num_classes)
    return expert if expert is not None and expert.lab is not None else None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.asarray(z - np.log(np.exp(z).sum(axis=1, keepdims=True)))
