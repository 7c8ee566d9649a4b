"""The lab-shift score: how unlike the training labs a batch of images is.

Another lab's microscope, camera, stain and magnification move every feature the network
computes; a single cell may still look typical, a whole batch of them does not. The score is
computed from the features the model already has (the input of its final linear layer, the
``features`` output of :class:`~hematovision.infer.runtime.LogitsAndFeatures`):

* each feature is standardised with its mean and standard deviation over the training split,
  ``z = (f - mean) / std``; an image's score is its mean squared standardised feature,
  ``mean_d min(z_d^2, 100)`` (about 1 for a typical training image, whatever the dimension). The
  cap at 10 standard deviations keeps a few features that were nearly constant in training (a
  pretrained backbone has such channels) from deciding the score alone: on PBC validation images
  the uncapped mean is 0.9 for the median image but 23 on average;
* a batch's score is the mean of its images' scores. A moved stain or magnification shifts and
  stretches the features, and the score grows with both.

Runs trained since 2026-12-04 score each image **class-conditionally**: its squared standardised
distance to the *nearest training class mean*, in within-class standard deviations (the diagonal
form of Lee et al.'s Mahalanobis score, NeurIPS 2018). Another lab's cells can sit between the
classes, no farther from the overall mean than the training cells are: a network fine-tuned on 20
Zheng cells per class saw BCCD's crops (42 % right) at a plain score of 0.83, below its own lab's
0.90, and did not warn; their distance to the nearest class is 3.4 against 1.7 for its lab's new
cells. A batch of one class stays near that class's mean, so a folder of lymphocytes does not warn.
Cards with ``class_means`` use it; older cards keep the plain score.

The warning threshold is calibrated when the run is trained (``hematovision train`` stores it in
``card.shift``): the 99th percentile of the score over batches of 32 held-out images of the
training labs (the validation split), half of them drawn at random and half from one class each
(a folder of one cell type, or a sample with many lymphocytes, must not warn). A batch of n
images is compared with the threshold's margin over the in-lab mean scaled by ``sqrt(32 / n)``, since
a batch's mean varies less the more images it holds: widened below 32 images, narrowed above, down to
the margin of :data:`NARROWEST_BATCH` images (a lab's own slides drift from session to session, so a
folder of thousands is not held to a thousandth of the spread). A mildly shifted lab then warns when
it brings a whole folder: 500 Raabin cells score 1.10 on the recommended model, under its batch-of-32
threshold of 1.24 and over the 1.02 of 256 images (its own labs' test cells: PBC 0.66). Runs trained
before the score existed have no ``card.shift`` and never warn.

For a frozen run the final layer's input is already standardised (``feature_mean``/``feature_std``
of :class:`~hematovision.models.frozen.FrozenClassifier`), so its reference is 0 and 1 and the card
stores no vectors; ``hematovision adapt`` re-estimates that standardisation on a lab's cells,
which brings the lab's score back towards 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor, nn

SHIFT_BATCH = 32  # images per calibration batch: a typical upload or a slide's differential
NARROWEST_BATCH = 256  # beyond this many images the threshold narrows no further (see the module docstring)
SHIFT_QUANTILE = 0.99  # of in-lab batch scores: about 1 in 100 in-lab batches of 32 warns
Z2_CAP = 100.0  # squared standardised features are capped at 10 standard deviations
METHOD = "mean over the final layer's inputs of the squared standardised feature (capped at 100)"
METHOD_CLASSES = ("class-conditional: mean over the final layer's inputs of the squared distance to the nearest "
                  "training class mean, in within-class standard deviations (capped at 100)")
MIN_CLASS_IMAGES = 2  # a class mean and spread need at least this many training images
_STANDARDISED_TOLERANCE = 1e-3  # a reference this close to (0, 1) is stored without its vectors


@dataclass(frozen=True)
class LabShift:
    """The lab-shift score of one batch of images.

    Attributes:
        score: the batch's mean image score (about 1 for images like the training ones).
        threshold: the calibrated threshold for a batch of this size (``None``: not calibrated).
        n_images: images in the batch.
    """

    score: float
    threshold: float | None
    n_images: int

    @property
    def shifted(self) -> bool:
        """Whether the batch is above the threshold."""
        return self.threshold is not None and self.score > self.threshold

    def message(self) -> str:
        """The warning, in words a lab understands (empty when the batch is not shifted)."""
        if not self.shifted:
            return ""
        return (f"these images differ from the training data (lab-shift score {self.score:.2f}, threshold "
                f"{self.threshold:.2f}, {self.n_images} image(s)): the microscope, camera, stain or magnification "
                "is probably another lab's; expect lower accuracy; run `hematovision adapt` to fit the model "
                "to this lab")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: score, threshold, images, whether it warns, and the warning."""
        return {"score": round(self.score, 4), "threshold": None if self.threshold is None else round(self.threshold, 4),
                "n_images": self.n_images, "shifted": self.shifted, "message": self.message() or None}


@dataclass(frozen=True)
class ShiftReference:
    """Training-feature statistics and the calibrated threshold (what ``card.shift`` holds).

    Attributes:
        mean: (D,) training mean of each feature; ``None``: 0 (features already standardised).
        std: (D,) training standard deviation; ``None``: 1.
        image_score_mean: the mean image score over held-out in-lab images.
        threshold: the batch score above which a batch of :attr:`batch` images warns.
        batch: the calibration batch size.
        class_means: (K, D) the training classes' mean standardised features (``None``: the plain score).
        class_std: (D,) the within-class standard deviation of the standardised features.
    """

    mean: np.ndarray | None
    std: np.ndarray | None
    image_score_mean: float
    threshold: float | None
    batch: int = SHIFT_BATCH
    class_means: np.ndarray | None = None
    class_std: np.ndarray | None = None

    @classmethod
    def standardised(cls) -> ShiftReference:
        """The reference of features standardised on the training split, without a threshold.

        A frozen run's linear head takes such features, so its score can be computed even when its
        card predates ``card.shift`` (``hematovision adapt`` reports it; nothing warns).
        """
        return cls(None, None, 1.0, None)

    @classmethod
    def from_card(cls, shift: Mapping[str, Any] | None) -> ShiftReference | None:
        """The reference in ``card.shift``; ``None`` when the card has none or it is unusable."""
        if not shift or "threshold" not in shift:
            return None
        try:
            mean = None if shift.get("mean") is None else np.asarray(shift["mean"], dtype=np.float32)
            std = None if shift.get("std") is None else np.asarray(shift["std"], dtype=np.float32)
            threshold = None if shift["threshold"] is None else float(shift["threshold"])
            class_means = (None if shift.get("class_means") is None
                           else np.asarray(shift["class_means"], dtype=np.float32))
            class_std = None if shift.get("class_std") is None else np.asarray(shift["class_std"], dtype=np.float32)
            reference = cls(mean, std, float(shift.get("image_score_mean", 1.0)), threshold,
                            int(shift.get("batch", SHIFT_BATCH)), class_means, class_std)
        except (TypeError, ValueError):
            return None
        if std is not None and (mean is None or mean.shape != std.shape or not (std > 0).all()):
            return None
        if (class_means is None) != (class_std is None):
            return None
        if class_means is not None and class_std is not None and (
                class_means.ndim != 2 or class_std.ndim != 1 or class_means.shape[1] != class_std.shape[0]
                or not len(class_means) or not (class_std > 0).all()
                or (std is not None and std.shape != class_std.shape)):
            return None
        return reference

    def image_scores(self, features: np.ndarray) -> np.ndarray:
        """Each image's mean squared standardised feature; (N, D) → (N,) float64."""
        z = np.asarray(features, dtype=np.float64)
        if self.mean is not None and self.std is not None:
            if z.shape[1] != self.mean.shape[0]:
                raise ValueError(f"features have {z.shape[1]} dimensions, the shift reference {self.mean.shape[0]}")
            z = (z - self.mean) / self.std
        if self.class_means is None or self.class_std is None:
            scores: np.ndarray = np.minimum(z**2, Z2_CAP).mean(axis=1)
            return scores
        if z.shape[1] != self.class_std.shape[0]:
            raise ValueError(f"features have {z.shape[1]} dimensions, the shift reference {self.class_std.shape[0]}")
        nearest = np.full(len(z), np.inf)
        for centre in self.class_means.astype(np.float64):
            nearest = np.minimum(nearest, np.minimum(((z - centre) / self.class_std) ** 2, Z2_CAP).mean(axis=1))
        return nearest

    def threshold_for(self, n_images: int) -> float | None:
        """The threshold for a batch of ``n_images``: its margin over the in-lab mean scaled by ``sqrt(batch / n)``,
        for n up to :data:`NARROWEST_BATCH`."""
        if self.threshold is None or n_images < 1:
            return None
        widen = math.sqrt(self.batch / min(n_images, max(self.batch, NARROWEST_BATCH)))
        return self.image_score_mean + (self.threshold - self.image_score_mean) * widen

    def assess(self, image_scores: Sequence[float] | np.ndarray) -> LabShift | None:
        """The batch's :class:`LabShift` from its images' scores; ``None`` for an empty batch."""
        scores = np.asarray(image_scores, dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        if not len(scores):
            return None
        return LabShift(float(scores.mean()), self.threshold_for(len(scores)), len(scores))


@dataclass
class ShiftMonitor:
    """Collects image scores over several calls (a folder predicted in batches, a sample's fields).

    Attributes:
        reference: the run's :class:`ShiftReference`.
        scores: the image scores seen since the last :meth:`reset`.
        keep_features: also keep the features themselves (:meth:`features`).
    """

    reference: ShiftReference
    scores: list[float] = field(default_factory=list)
    keep_features: bool = False
    _features: list[np.ndarray] = field(default_factory=list)

    def update(self, features: np.ndarray) -> np.ndarray:
        """Score (N, D) features, remember the scores (and the features when :attr:`keep_features`) and return them."""
        scores = self.reference.image_scores(features)
        self.scores.extend(float(s) for s in scores)
        if self.keep_features:  # test-time lab standardisation re-scores them (evaluate)
            self._features.append(np.asarray(features, dtype=np.float32))
        return scores

    def features(self) -> np.ndarray:
        """The (N, D) features seen since the last :meth:`reset`, when :attr:`keep_features` was on."""
        return np.concatenate(self._features) if self._features else np.zeros((0, 0), np.float32)

    def result(self) -> LabShift | None:
        """The lab-shift of every image seen; ``None`` when none was."""
        return self.reference.assess(self.scores)

    def reset(self) -> None:
        """Forget the images seen."""
        self.scores.clear()
        self._features.clear()


def fit_reference(
    train_features: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray | None = None,
    test_features: np.ndarray | None = None,
    batch: int = SHIFT_BATCH,
    quantile: float = SHIFT_QUANTILE,
    n_batches: int = 2000,
    seed: int = 0,
    train_labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """The ``card.shift`` of a run: training statistics and the threshold from held-out batches.

    Args:
        train_features: (N, D) final-layer inputs of training images (the reference statistics).
        val_features: (M, D) the same for held-out in-lab images (the threshold).
        val_labels: (M,) their classes: half the calibration batches are then drawn from one class
            each; without labels all are drawn at random.
        test_features: (T, D) optional: how often random test batches warn is recorded.
        batch: calibration batch size.
        quantile: of the calibration batches' scores.
        n_batches: batches drawn (with replacement, so a small validation split works).
        seed: seeds the batches.
        train_labels: (N,) classes of the training images: the score is then class-conditional.

    Returns:
        A JSON-ready dict for ``card.shift``.
    """
    reference, mean, std = _reference(train_features, batch, train_labels)
    rng = np.random.default_rng(seed)
    val_scores = reference.image_scores(val_features)
    threshold, drawn = _calibrate(val_scores, val_labels, batch, quantile, n_batches, rng)
    shift = _record(f"train split, {len(train_features)} images", val_scores, batch, quantile, threshold,
                    f"val split ({len(val_scores)} images): {drawn} batches of {batch}")
    if test_features is not None and len(test_features):
        test_scores = reference.image_scores(test_features)
        test_batches = _random_batch_scores(test_scores, np.arange(len(test_scores)), batch, n_batches, rng)
        shift["test_batches_over_threshold"] = round(float((test_batches > threshold).mean()), 4)
        shift["test_image_score_mean"] = round(float(test_scores.mean()), 6)
    return _with_vectors(shift, reference, mean, std)


def fit_reference_out_of_fold(
    features: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    held_out_labels: np.ndarray | None = None,
    batch: int = SHIFT_BATCH,
    quantile: float = SHIFT_QUANTILE,
    n_batches: int = 2000,
    seed: int = 0,
    labels: np.ndarray | None = None,
    fold_labels: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """``card.shift`` of a network trained on a few cells with none held out (``adapt``'s fine-tuning).

    The reference statistics are the final network's features of all its cells. The threshold comes
    from the cross-validation folds: each fold's network scores its held-out cells against the
    statistics of its own training cells, which is how the final network sees new cells of the lab
    (its own training cells would score lower, and the threshold would warn on the lab itself).

    Args:
        features: (N, D) the final network's final-layer inputs of the cells it was trained on.
        folds: per fold, (features of its training cells, features of its held-out cells), both from
            the network trained on that fold.
        held_out_labels: classes of the held-out cells, in the order of ``folds``.
        labels, fold_labels: classes of ``features`` and of each fold's training cells: the score is
            then class-conditional (both or neither).
    """
    if (labels is None) != (fold_labels is None):
        raise ValueError("give labels and fold_labels together")
    reference, mean, std = _reference(features, batch, labels)
    each = fold_labels if fold_labels is not None else [None] * len(folds)
    scores = np.concatenate([_reference(train, batch, train_labels)[0].image_scores(held_out)
                             for (train, held_out), train_labels in zip(folds, each)])
    threshold, drawn = _calibrate(scores, held_out_labels, batch, quantile, n_batches, np.random.default_rng(seed))
    shift = _record(f"the {len(features)} cells the network was fine-tuned on", scores, batch, quantile, threshold,
                    f"{len(folds)} cross-validation folds ({len(scores)} held-out cells, each scored by the "
                    f"network trained without it): {drawn} batches of {batch}")
    return _with_vectors(shift, reference, mean, std)


def _reference(train_features: np.ndarray, batch: int,
               labels: np.ndarray | None = None) -> tuple[ShiftReference, np.ndarray, np.ndarray]:
    """The reference of these training features, with their mean and std (for the card).

    With ``labels``, the classes with at least :data:`MIN_CLASS_IMAGES` images give the class means
    and the within-class spread (the root mean of the classes' variances) of the standardised features.
    """
    train = np.asarray(train_features, dtype=np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)  # a feature constant in training keeps scale 1 (as the frozen head does)
    standardised = bool(np.abs(mean).max() < _STANDARDISED_TOLERANCE and np.abs(std - 1).max() < _STANDARDISED_TOLERANCE)
    class_means = class_std = None
    if labels is not None:
        z = (train - mean) / std
        labels = np.asarray(labels)
        groups = [z[labels == c] for c in np.unique(labels) if (labels == c).sum() >= MIN_CLASS_IMAGES]
        if groups:
            class_means = np.stack([g.mean(axis=0) for g in groups]).astype(np.float32)
            spread = np.sqrt(np.mean([g.var(axis=0) for g in groups], axis=0))
            class_std = np.where(spread < 1e-6, 1.0, spread).astype(np.float32)
    reference = ShiftReference(None if standardised else mean.astype(np.float32),
                               None if standardised else std.astype(np.float32), 1.0, None, batch,
                               class_means, class_std)
    return reference, mean, std


def _calibrate(scores: np.ndarray, labels: np.ndarray | None, batch: int, quantile: float, n_batches: int,
               rng: np.random.Generator) -> tuple[float, str]:
    """The threshold over held-out batch scores (half random, half single-class when labelled), and how drawn."""
    groups = [np.arange(len(scores))]
    if labels is not None:
        groups += [np.flatnonzero(np.asarray(labels) == c) for c in np.unique(labels)]
    mixed = _random_batch_scores(scores, groups[0], batch, n_batches // 2 if len(groups) > 1 else n_batches, rng)
    single = [_random_batch_scores(scores, groups[1 + int(rng.integers(len(groups) - 1))], batch, 1, rng)
              for _ in range(n_batches - len(mixed))]
    threshold = float(np.quantile(np.concatenate([mixed, *single]), quantile))
    drawn = f"{len(mixed)} random and {len(single)} single-class" if single else f"{len(mixed)} random"
    return threshold, drawn


def _record(reference: str, held_out_scores: np.ndarray, batch: int, quantile: float, threshold: float,
            calibrated_on: str) -> dict[str, Any]:
    """The JSON-ready ``card.shift`` entries every reference has."""
    return {"method": METHOD, "reference": reference, "image_score_mean": round(float(held_out_scores.mean()), 6),
            "batch": batch, "quantile": quantile, "threshold": round(threshold, 6), "calibrated_on": calibrated_on}


def _with_vectors(shift: dict[str, Any], reference: ShiftReference, mean: np.ndarray,
                  std: np.ndarray) -> dict[str, Any]:
    if reference.mean is not None:  # not already standardised: the card keeps the statistics
        shift["mean"] = [float(f"{v:.6g}") for v in mean]
        shift["std"] = [float(f"{v:.6g}") for v in std]
    if reference.class_means is not None and reference.class_std is not None:
        shift["method"] = METHOD_CLASSES
        shift["class_means"] = [[float(f"{v:.5g}") for v in row] for row in reference.class_means]
        shift["class_std"] = [float(f"{v:.5g}") for v in reference.class_std]
    return shift


def _random_batch_scores(scores: np.ndarray, pool: np.ndarray, batch: int, n_batches: int,
                         rng: np.random.Generator) -> np.ndarray:
    index = pool[rng.integers(0, len(pool), size=(n_batches, batch))]
    means: np.ndarray = scores[index].mean(axis=1)
    return means


def head_inputs(model: nn.Module, pooled: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The final linear layer's inputs from a frozen classifier's pooled features (no backbone pass).

    Args:
        model: a :class:`~hematovision.models.frozen.FrozenClassifier` (it has ``forward_head``).
        pooled: (N, D) pooled backbone features, as cached by training.

    Returns:
        (N, D') float32: what :class:`~hematovision.infer.runtime.LogitsAndFeatures` returns as features.
    """
    import torch  # only here: the score itself (ShiftReference, ShiftMonitor) is numpy, used without torch

    from hematovision.infer.runtime import classifier_layer

    forward_head = getattr(model, "forward_head", None)
    if forward_head is None:
        raise TypeError(f"{type(model).__name__} has no forward_head; it is not a frozen classifier")
    captured: list[Tensor] = []
    handle = classifier_layer(model).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        with torch.inference_mode():
            for start in range(0, len(pooled), batch_size):
                forward_head(torch.as_tensor(np.asarray(pooled[start:start + batch_size]), dtype=torch.float32))
    finally:
        handle.remove()
    if not captured:
        return np.zeros((0, classifier_layer(model).in_features), np.float32)
    with torch.inference_mode():
        return torch.cat([c.flatten(1) for c in captured]).numpy()
