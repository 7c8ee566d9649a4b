"""Classification metrics as pure functions of (y_true, y_prob), computed with scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the confidence-vs-accuracy gap, averaged over equal-width confidence bins.

    Args:
        y_true: (N,) integer labels.
        y_prob: (N, K) probabilities.
        n_bins: number of bins on [0, 1].
    """
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 joins the first bin.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram."""
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    result: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for b in range(n_bins):
        in_bin = bins == b
        result["lower"].append(float(edges[b]))
        result["upper"].append(float(edges[b + 1]))
        result["count"].append(float(in_bin.sum()))
        result["confidence"].append(float(confidence[in_bin].mean()) if in_bin.any() else float("nan"))
        result["accuracy"].append(float(correct[in_bin].mean()) if in_bin.any() else float("nan"))
    return result


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> dict:
    """Every classification metric HematoVision reports.

    Args:
        y_true: (N,) integer labels indexing ``class_names``.
        y_prob: (N, K) predicted probabilities, K = len(class_names).
        class_names: names of the K classes.

    Returns:
        A JSON-ready dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``macro_precision``,
        ``macro_recall``, ``log_loss``, ``roc_auc_ovr`` (macro; ``None`` when a class is absent),
        ``ece``, ``n_images``, ``per_class`` (precision/recall/f1/support per class name),
        ``confusion_matrix`` (rows = true class) and ``class_names``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    labels = list(range(len(class_names)))
    y_pred = y_prob.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = np.unique(y_true)
    try:
        auc = float(skm.roc_auc_score(y_true, y_prob, multi_class="ovr", labels=labels)) if len(present) == len(labels) else None
    except ValueError:
        auc = None
    # Balanced accuracy and macro averages are over the classes present in y_true, as in scikit-learn.
    return {
        "n_images": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_precision": float(skm.precision_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_recall": float(skm.recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "log_loss": float(skm.log_loss(y_true, np.clip(y_prob, 1e-12, 1.0), labels=labels)),
        "roc_auc_ovr": auc,
        "ece": expected_calibration_error(y_true, y_prob),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }


def metrics_by_group(y_true: Sequence[int] | np.ndarray, y_prob: np.ndarray, class_names: Sequence[str],
                     groups: Sequence[str]) -> dict[str, dict]:
    """Headline metrics (images, accuracy, balanced accuracy, macro-F1, ECE) of each group, e.g. each source lab.

    Args:
        groups: (N,) the group of each row.
    """
    y_true, y_prob = np.asarray(y_true, dtype=np.int64), np.asarray(y_prob, dtype=np.float64)
    names = np.asarray(groups, dtype=object)
    result = {}
    for name in sorted(set(groups)):
        rows = names == name
        full = classification_metrics(y_true[rows], y_prob[rows], class_names)
        result[name] = {key: full[key] for key in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "ece")}
    return result


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)``.

    Guo et al. 2017: one scalar fitted on validation data fixes most over-confidence
    without changing any prediction.
    """
    from scipy.optimize import minimize_scalar

    y_true = np.asarray(y_true, dtype=np.int64)

    def nll(log_t: float) -> float:
        prob = softmax(logits, float(np.exp(log_t)))
        return float(-np.log(np.clip(prob[np.arange(len(y_true)), y_true], 1e-12, 1.0)).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))
