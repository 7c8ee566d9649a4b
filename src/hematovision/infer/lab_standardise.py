"""Test-time lab standardisation: a per-lab run standardises another lab's cells on their own statistics.

A run trained with ``hematovision train --lab-standardise`` standardised each training lab's pooled
features with that lab's own class-balanced mean and standard deviation
(:func:`class_balanced_moments`), so its head learnt what is left once a
lab's stain and optics are taken out of the features' offset and scale. A new lab's cells get the same
treatment from the cells themselves, without labels:

1. the plain mean and standard deviation of the lab's pooled features;
2. three rounds of: predict with the current statistics, then re-estimate them class-balanced with the
   predicted probabilities as class weights, so that a lab with many neutrophils is not standardised
   as if neutrophils were the average cell.

``hematovision evaluate`` does this for a folder when the run is a per-lab run, the folder's lab-shift
score warns (the training labs' own images keep the run's statistics, each routed to its own lab's
by the head: :class:`~hematovision.models.frozen.LabRoutedLinear`) and the folder has at least
:data:`MIN_IMAGES` readable images; ``adapt --unlabelled`` stores such statistics in a new run.
It needs the final layer's inputs to be the standardised features, i.e. a linear (logreg) head; the
routed head takes the labs' average standardisation, so :func:`restandardise` undoes it exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np

from hematovision.evaluate.metrics import softmax
from hematovision.infer.shift import SHIFT_BATCH

if TYPE_CHECKING:
    from torch import nn

    from hematovision.models.frozen import FrozenClassifier
    from hematovision.run import ModelCard

MIN_IMAGES = SHIFT_BATCH  # fewer cells give statistics too noisy to standardise ~2000 features with
ITERATIONS = 3  # rounds of predict-then-re-estimate (the class mix settles after two or three)


def class_balanced_moments(features: np.ndarray, class_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A lab's feature statistics as if every class had as many cells: the per-lab standardisation.

    Labs differ in their mix of cells (BCCD's crops are 59 % neutrophils, PBC's 32 %), and a plain
    mean would move with the mix as much as with the stain. The mean here is the average of the class
    means; the standard deviation is the images' spread around that mean.

    Args:
        features: (N, D) pooled features of one lab's images.
        class_weights: (N, K) each image's weight for each class: one-hot labels when training, the
            head's probabilities on a new lab. Classes with less than one image's weight in all are
            left out of the average (a lab may lack a class).

    Returns:
        (D,) mean and (D,) standard deviation, float32; a feature constant on the lab keeps scale 1.
    """
    x = np.asarray(features, dtype=np.float64)
    weights = np.asarray(class_weights, dtype=np.float64)
    mass = weights.sum(axis=0)
    present = mass >= 1.0
    if not present.any():  # fewer images than classes' worth of weight: the plain mean
        mean = x.mean(axis=0)
    else:
        class_means = (weights[:, present] / mass[present]).T @ x
        mean = class_means.mean(axis=0)
    std = np.sqrt(((x - mean) ** 2).mean(axis=0))
    return mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def applies(card: ModelCard) -> bool:
    """Whether the run standardises each lab on its own (a frozen per-lab run with a linear head)."""
    head = card.frozen
    return card.mode == "frozen" and head is not None and head.standardisation == "per_lab" and head.hidden == 0


def lab_moments(pooled: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """A lab's class-balanced feature statistics, its classes estimated by the head itself.

    Args:
        pooled: (N, D) the lab's pooled backbone features.
        weight, bias: (K, D) and (K,) the linear head that takes the standardised features.
        iterations: rounds of predict-then-re-estimate.

    Returns:
        (D,) mean and standard deviation, float32.
    """
    x = np.asarray(pooled, dtype=np.float64)
    mean, std = class_balanced_moments(x, np.ones((len(x), 1)))  # one class: the plain statistics
    for _ in range(iterations):
        probabilities = softmax(((x - mean) / std) @ weight.T + bias)
        mean, std = class_balanced_moments(x, probabilities)
    return mean, std


def _linear_head(model: nn.Module) -> tuple[FrozenClassifier, np.ndarray, np.ndarray]:
    """The frozen classifier and its linear head's (K, D) weight and (K,) bias, float64."""
    classifier = cast("FrozenClassifier", model)
    head = cast("nn.Linear", classifier.head)
    return (classifier, head.weight.detach().numpy().astype(np.float64),
            head.bias.detach().numpy().astype(np.float64))


def head_moments(model: nn.Module, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lab_moments` of a lab's pooled features, its classes estimated by the run's own linear head."""
    _, weight, bias = _linear_head(model)
    return lab_moments(pooled, weight, bias)


def restandardise(model: nn.Module, head_inputs: np.ndarray) -> np.ndarray:
    """A lab's cells re-scored on the lab's own statistics: (N, K) logits.

    Args:
        model: the frozen classifier (``feature_mean``, ``feature_std``, a linear ``head``).
        head_inputs: (N, D) its final layer's inputs for the lab's cells, as inference gives them.
    """
    classifier, weight, bias = _linear_head(model)
    run_mean = classifier.feature_mean.detach().numpy().astype(np.float64)
    run_std = classifier.feature_std.detach().numpy().astype(np.float64)
    pooled = np.asarray(head_inputs, dtype=np.float64) * run_std + run_mean  # the standardisation is undone exactly
    mean, std = lab_moments(pooled, weight, bias)
    logits: np.ndarray = ((pooled - mean) / std) @ weight.T + bias
    return logits


def routed_shares(model: nn.Module, labs: list[str], head_inputs: np.ndarray) -> dict[str, float] | None:
    """Which training lab's statistics a routed head scored each image on, as shares of the images.

    Args:
        model: the frozen classifier; ``None`` is returned unless its head routes (:class:`LabRoutedLinear`).
        labs: the card's ``frozen.head.routing.labs``, in the head's order.
        head_inputs: (N, D) the final layer's inputs of the images, as inference gives them.

    Returns:
        Lab → share, and ``none`` for the images that kept the labs' average.
    """
    import torch

    from hematovision.models.frozen import LabRoutedLinear

    head = getattr(model, "head", None)
    if not isinstance(head, LabRoutedLinear) or not len(head_inputs):
        return None
    with torch.no_grad():
        routes = head.routed(torch.as_tensor(np.asarray(head_inputs), dtype=torch.float32))[1].numpy()
    shares = {lab: float((routes == i).mean()) for i, lab in enumerate(labs)}
    shares["none"] = float((routes < 0).mean())
    return shares
