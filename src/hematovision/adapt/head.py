"""Few-shot adaptation: the final layer refitted on a lab's labelled cells, by cross-validation.

With k labelled cells per class, what pays is chosen on the lab's own cells, not assumed:

* **normalisation**: the source run's (``source``) or re-estimated on the lab's cells (``lab``, see
  :mod:`hematovision.adapt.normalise`);
* **head**: the source head as it is; or the final linear layer refitted on the lab's cells with a
  penalty ``prior/2 * ||W - W_anchor||^2``, anchored either at the source head (a multinomial
  logistic regression warm-started and regularised towards what the source lab taught it; a class
  without labelled cells keeps its source row, pushed down only where the lab's cells are of other
  classes) or at zero (a new head, plain L2; a class without labelled cells is then never
  predicted). Which anchor pays depends on how far the lab is from the source and how good the
  source head is: on Zheng's cells (k = 20) the new head won, on BCCD's the two tied.

Every combination is scored by out-of-fold predictions (leave-one-out up to 12 cells, else
stratified 5-fold): balanced accuracy first, then the negative log-likelihood after a fitted
temperature. The winner is refitted on all cells; its out-of-fold logits give the temperature and
the review policy's confidence threshold, so both are calibrated on cells the head did not see.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hematovision.evaluate.metrics import fit_temperature, softmax

log = logging.getLogger(__name__)

PRIOR_STRENGTHS = (1.0, 0.1, 0.01)  # per mean loss; the source head's own is ~1/(C n) = 0.01-0.001
ANCHORS = ("source", "zero")  # what the refitted head is pulled towards
LEAVE_ONE_OUT_UP_TO = 12  # cells; above it, stratified 5-fold (fewer fits: each candidate is fitted per fold)

# Features of all cells, given the indices of the cells whose statistics a normalisation may use.
FeatureMaker = Callable[[np.ndarray], np.ndarray]


@dataclass
class HeadChoice:
    """The chosen normalisation and head, and how every candidate did.

    Attributes:
        norm: ``source`` or ``lab``.
        anchor: ``source`` (the refitted head is pulled towards the source head) or ``zero`` (a new head).
        prior: the penalty towards the anchor; ``None``: the source head unchanged.
        weight, bias: the final layer's (K, D) weight and (K,) bias, fitted on all cells.
        features: (N, D) the cells' final-layer inputs under the chosen normalisation.
        oof_logits: (N, K) out-of-fold logits of the chosen candidate.
        folds: how the cells were split, in words.
        candidates: each candidate's out-of-fold balanced accuracy and NLL.
    """

    norm: str
    anchor: str
    prior: float | None
    weight: np.ndarray
    bias: np.ndarray
    features: np.ndarray
    oof_logits: np.ndarray
    folds: str
    candidates: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        """The choice in words."""
        norm = "the lab's normalisation" if self.norm == "lab" else "the source normalisation"
        if self.prior is None:
            head = "the source head"
        elif self.anchor == "source":
            head = f"the source head refitted on the lab's cells (prior {self.prior:g} towards it)"
        else:
            head = f"a new head fitted on the lab's cells (L2 {self.prior:g})"
        return f"{norm} + {head}"


def choose_head(makers: dict[str, FeatureMaker], labels: np.ndarray, weight0: np.ndarray, bias0: np.ndarray,
                seed: int = 0) -> HeadChoice:
    """Score every (normalisation, head) candidate by cross-validation and refit the best on all cells.

    Args:
        makers: per normalisation name, the features of all cells given the training indices.
        labels: (N,) class indices.
        weight0, bias0: the source head's final layer, (K, D) and (K,).
        seed: seeds the folds.
    """
    from sklearn.metrics import balanced_accuracy_score

    heads: list[tuple[str, float | None]] = [("source", None)]
    heads += [(anchor, prior) for anchor in ANCHORS for prior in PRIOR_STRENGTHS]
    folds, how = fold_indices(labels, seed)
    everything = np.arange(len(labels))
    best: tuple[float, int] | None = None
    results = []
    for norm, make in makers.items():
        fold_features = [make(train) for train, _ in folds]
        for anchor, prior in heads:
            oof = _out_of_fold(fold_features, folds, labels, anchor, prior, weight0, bias0)
            with warnings.catch_warnings():  # a class the model knows but the lab's cells lack is predicted
                warnings.simplefilter("ignore", UserWarning)
                balanced = float(balanced_accuracy_score(labels, oof.argmax(1)))
            nll = _calibrated_nll(oof, labels)
            results.append({"norm": norm, "anchor": anchor, "prior": prior, "balanced_accuracy": round(balanced, 4),
                            "nll": round(nll, 4), "_oof": oof})
            score = balanced - 1e-3 * nll
            # Strictly better only: on a tie the earlier (simpler, closer to the source) candidate stays.
            if best is None or score > best[0] + 1e-9:
                best = (score, len(results) - 1)
    assert best is not None
    chosen = results[best[1]]
    features = makers[chosen["norm"]](everything)
    weight, bias = _head_for(features, labels, chosen["anchor"], chosen["prior"], weight0, bias0)
    choice = HeadChoice(chosen["norm"], chosen["anchor"], chosen["prior"], weight, bias, features, chosen["_oof"], how,
                        [{k: v for k, v in r.items() if k != "_oof"} for r in results])
    log.info("few-shot choice: %s (%s)", choice.describe(), how)
    return choice


def refit_on_folds(choice: HeadChoice, makers: dict[str, FeatureMaker], labels: np.ndarray,
                   folds: Sequence[tuple[np.ndarray, np.ndarray]], weight0: np.ndarray, bias0: np.ndarray) -> np.ndarray:
    """Out-of-fold logits (N, K) of the chosen candidate on other ``folds``, refitted on each fold's training cells.

    Scores the head-only choice on the folds of another candidate (the fine-tune's), so that the two
    are compared on the same held-out cells after training on the same number of cells.
    """
    make = makers[choice.norm]
    return _out_of_fold([make(train) for train, _ in folds], folds, labels, choice.anchor, choice.prior, weight0, bias0)


def _out_of_fold(fold_features: Sequence[np.ndarray], folds: Sequence[tuple[np.ndarray, np.ndarray]],
                 labels: np.ndarray, anchor: str, prior: float | None, weight0: np.ndarray, bias0: np.ndarray
                 ) -> np.ndarray:
    """Out-of-fold logits (N, K) of one candidate head; ``fold_features[i]``: all cells' features for fold i."""
    oof = np.zeros((len(labels), len(bias0)))
    for (train, test), features in zip(folds, fold_features):
        weight, bias = _head_for(features[train], labels[train], anchor, prior, weight0, bias0)
        oof[test] = features[test] @ weight.T + bias
    return oof


def _head_for(features: np.ndarray, labels: np.ndarray, anchor: str, prior: float | None, weight0: np.ndarray,
              bias0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One candidate's final layer fitted on ``features``: the source head as it is when ``prior`` is None."""
    if prior is None:
        return weight0, bias0
    return fit_linear(features, labels, *_anchors(weight0, bias0)[anchor], prior)


def _anchors(weight0: np.ndarray, bias0: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"source": (weight0, bias0), "zero": (np.zeros_like(weight0), np.zeros_like(bias0))}


def fit_linear(features: np.ndarray, labels: np.ndarray, weight0: np.ndarray, bias0: np.ndarray, prior: float,
               max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced multinomial logistic regression pulled towards ``(weight0, bias0)``.

    Minimises ``sum_i w_i CE(W f_i + b, y_i) + prior/2 (||W - W0||^2 + ||b - b0||^2)`` with
    class-balanced weights ``w`` summing to 1, starting from ``(weight0, bias0)`` (L-BFGS).

    Returns:
        ``(weight, bias)``, (K, D) and (K,) float32.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(y, minlength=len(bias0)).double()
    sample_weight = 1.0 / counts[y]
    sample_weight /= sample_weight.sum()
    w0 = torch.as_tensor(weight0, dtype=torch.float64)
    b0 = torch.as_tensor(bias0, dtype=torch.float64)
    weight, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.cross_entropy(x @ weight.T + bias, y, reduction="none") * sample_weight).sum()
        loss = loss + prior / 2 * (((weight - w0) ** 2).sum() + ((bias - b0) ** 2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float().numpy(), bias.detach().float().numpy()


def _calibrated_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    probs = softmax(logits, fit_temperature(logits, labels))
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fold_indices(labels: np.ndarray, seed: int, folds: int = 5, leave_one_out_up_to: int = LEAVE_ONE_OUT_UP_TO
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Cross-validation folds over the lab's cells, and how they were made, in words: leave-one-out
    up to ``leave_one_out_up_to`` cells, else stratified ``folds``-fold."""
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold

    n = len(labels)
    if n <= leave_one_out_up_to:
        return list(LeaveOneOut().split(labels)), f"leave-one-out over {n} cells"
    with warnings.catch_warnings():  # a class with fewer than `folds` cells is simply absent from some folds
        warnings.simplefilter("ignore", UserWarning)
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), labels))
    return splits, f"stratified {folds}-fold over {n} cells"


def threshold_and_temperature(oof_logits: np.ndarray, labels: np.ndarray, target_accuracy: float
                              ) -> tuple[float, float, dict]:
    """The temperature and the review policy's confidence threshold, from out-of-fold logits.

    Returns:
        ``(temperature, threshold, info)``; ``info`` has the out-of-fold coverage and accuracy of
        the cells the threshold accepts.
    """
    from hematovision.export.calibrate import confidence_threshold_for

    temperature = fit_temperature(oof_logits, labels)
    probs = softmax(oof_logits, temperature)
    threshold, coverage, accepted = confidence_threshold_for(probs.max(1), probs.argmax(1) == labels, target_accuracy)
    return temperature, threshold, {"coverage": coverage, "accepted_accuracy": accepted,
                                    "target_accuracy": target_accuracy}


def summarise(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Headline metrics of predictions on the lab's cells."""
    from hematovision.evaluate.metrics import classification_metrics

    metrics = classification_metrics(labels, probs, class_names)
    return {key: round(metrics[key], 4) if isinstance(metrics[key], float) else metrics[key]
            for key in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")}
