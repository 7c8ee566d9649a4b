"""Frozen mode: a small head fitted in seconds on cached backbone features.

The classifier module (:class:`~hematovision.models.frozen.FrozenClassifier`) lives with the
models, since inference needs it; fitting it is training, and lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hematovision.infer.lab_standardise import class_balanced_moments
from hematovision.infer.morphology import MorphologyExpert
from hematovision.models.frozen import FrozenClassifier, LabRoutedLinear, lab_routing

log = logging.getLogger(__name__)


# Hidden width of the ``mlp`` head.
MLP_HIDDEN = 512
# Of a training lab's own image scores: its limit for routing (LabRoutedLinear). 0.95 rather than 0.99:
# left out of training, BCCD's and Zheng's cells were routed to the other small lab 42 % and 24 % of the
# time instead of 64 % and 68 %, while 94 % of the validation images still went to their own lab (97.5 %)
# and the in-lab test splits scored the same within 0.003 (docs/labs.md).
ROUTE_QUANTILE = 0.95


def head_hidden(head: str) -> int:
    """Hidden width of a frozen head: :data:`MLP_HIDDEN` for ``mlp``, 0 (linear) for ``logreg``."""
    return MLP_HIDDEN if head == "mlp" else 0


def fit_frozen_classifier(
    features: nn.Module,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    head: str = "logreg",
    seed: int = 0,
    sources: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[FrozenClassifier, dict]:
    """The frozen classifier of ``hematovision train --mode frozen``, its head fitted on cached features.

    Args:
        features: the frozen feature module the features came from (kept in the classifier so
            that it predicts from images).
        train_features, val_features: (N, D) and (M, D) features.
        train_labels, val_labels: (N,) and (M,) integer labels.
        num_classes: K.
        head: ``logreg`` or ``mlp`` (see :func:`fit_head`).
        seed: seeds the MLP head.
        sources: per-lab standardisation (``train --lab-standardise``): the lab of each training and
            each validation row (see :func:`fit_head`).

    Returns:
        The classifier and the head's summary (see :func:`fit_head`).
    """
    # A per-lab linear head routes each image to its training lab's statistics (LabRoutedLinear).
    routed_labs = len(np.unique(sources[0])) if sources is not None and head == "logreg" else 0
    classifier = FrozenClassifier(features, train_features.shape[1], num_classes, hidden=head_hidden(head),
                                  routed_labs=routed_labs)
    summary = fit_head(classifier, train_features, train_labels, val_features, val_labels, num_classes,
                       head=head, seed=seed, sources=sources)
    return classifier, summary


def fit_head(
    classifier: FrozenClassifier,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    head: str = "logreg",
    seed: int = 0,
    c_grid: Sequence[float] = (0.02, 0.05, 0.2),
    sources: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Fit the head on cached features; the regularisation is chosen on validation data.

    The features are standardised first: with the training split's mean and standard deviation, or,
    given ``sources`` (the lab of each training and validation row), each lab with its own
    class-balanced statistics (:func:`~hematovision.infer.lab_standardise.class_balanced_moments`, fitted on
    its training rows). The head then learns what is left once each lab's stain and optics have been
    taken out of the features' offset and scale, and a new lab is standardised the same way on its
    own cells (``evaluate``, ``adapt --unlabelled``). The classifier standardises an image with the
    labs' average statistics, and a linear head then routes each image that fits one training lab's
    statistics to that lab's standardisation (:class:`~hematovision.models.frozen.LabRoutedLinear`);
    an image of another lab keeps the average.

    ``logreg``: multinomial logistic regression (scikit-learn, class-balanced), the C with the best
    validation balanced accuracy. ``mlp``: one hidden layer trained with AdamW, dropout and label
    smoothing, keeping the epoch with the best validation balanced accuracy.

    Returns:
        A summary dict (chosen hyper-parameters, validation score, seconds).
    """
    started = time.perf_counter()
    (mean, std), train_z, val_z = _standardised(train_features, train_labels, val_features, num_classes, sources)
    classifier.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    classifier.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))
    if head == "logreg":
        summary = _fit_logreg(classifier.head, train_z, train_labels, val_z, val_labels, c_grid)
    elif head == "mlp":
        summary = _fit_mlp(classifier.head, train_z, train_labels, val_z, val_labels, num_classes, seed)
    else:
        raise ValueError(f"unknown head {head!r} (logreg, mlp)")
    if sources is not None:
        summary["standardisation"] = "per_lab"
        summary["labs"] = sorted(str(name) for name in np.unique(sources[0]))
        if isinstance(classifier.head, LabRoutedLinear):
            summary["routing"] = _fit_routing(classifier.head, mean, std, train_features, train_labels,
                                              val_features, num_classes, *sources)
    summary["seconds"] = time.perf_counter() - started
    log.info("head %s fitted in %.1fs: %s", head, summary["seconds"], summary)
    return summary


def _standardised(train: np.ndarray, labels: np.ndarray, val: np.ndarray, num_classes: int,
                  sources: tuple[np.ndarray, np.ndarray] | None) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """The (mean, std) a head keeps and the standardised training and validation rows: the training
    split's statistics, or, given ``sources``, each lab's own (:func:`_per_lab_standardised`)."""
    if sources is not None:
        return _per_lab_standardised(train, labels, val, num_classes, *sources)
    mean = train.mean(axis=0)
    # A feature constant over the training images (Lite's ReLU6 channels often sit at 0) keeps the
    # scale 1, as scikit-learn's StandardScaler does: dividing by ~0 would turn its first change at
    # prediction time into a value of ~1e6, which wrecks an MLP head and the OOD score.
    std = train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return (mean, std), (train - mean) / std, (val - mean) / std


def _lab_moments(train: np.ndarray, labels: np.ndarray, num_classes: int, train_labs: np.ndarray
                 ) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Each training lab's class-balanced (mean, std), fitted on its training rows, by lab (sorted)."""
    one_hot = np.eye(num_classes)[labels]
    return {lab: class_balanced_moments(train[train_labs == lab], one_hot[train_labs == lab])
            for lab in np.unique(train_labs)}


def _fit_routing(head: LabRoutedLinear, mean: np.ndarray, std: np.ndarray, train: np.ndarray, labels: np.ndarray,
                 val: np.ndarray, num_classes: int, train_labs: np.ndarray, val_labs: np.ndarray) -> dict[str, Any]:
    """Set a routed head's lab maps and limits; what the card records of them.

    A lab's limit is the :data:`ROUTE_QUANTILE` of its own training and validation images' scores on its
    statistics, so about one in twenty of a training lab's images falls back to the average.
    """
    moments = _lab_moments(train, labels, num_classes, train_labs)
    labs = list(moments)
    scale, offset = lab_routing(*(torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (
        mean, std, np.stack([moments[lab][0] for lab in labs]), np.stack([moments[lab][1] for lab in labs]))))

    def averaged(rows: np.ndarray) -> torch.Tensor:  # what the head takes: the labs' average standardisation
        return torch.as_tensor((rows - mean) / std, dtype=torch.float32)

    with torch.no_grad():
        head.lab_scale.copy_(scale)
        head.lab_offset.copy_(offset)
        limits = [float(np.quantile(head.lab_scores(averaged(np.concatenate(
            [train[train_labs == lab], val[val_labs == lab]])))[1][:, i].numpy(), ROUTE_QUANTILE))
            for i, lab in enumerate(labs)]
        head.lab_limit.copy_(torch.as_tensor(limits, dtype=torch.float32))
        _, routes = head.routed(averaged(val))
    own = np.array([labs.index(lab) for lab in val_labs]) if len(val_labs) else np.zeros(0, int)
    return {"labs": [str(lab) for lab in labs], "limits": [round(x, 4) for x in limits], "quantile": ROUTE_QUANTILE,
            "val_routed_to_own_lab": round(float((routes.numpy() == own).mean()), 4) if len(own) else None}


def _per_lab_standardised(train: np.ndarray, labels: np.ndarray, val: np.ndarray, num_classes: int,
                          train_labs: np.ndarray, val_labs: np.ndarray
                          ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Each lab's rows standardised with that lab's class-balanced training statistics.

    Returns:
        The labs' average (mean, std) for the classifier (the root mean of each lab's variance
        around the average mean), and the standardised training and validation rows.
    """
    moments = _lab_moments(train, labels, num_classes, train_labs)
    mean = np.mean([m for m, _ in moments.values()], axis=0)
    std = np.sqrt(np.mean([s**2 + (m - mean) ** 2 for m, s in moments.values()], axis=0))
    average = (mean, std)

    def standardise(rows: np.ndarray, labs: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape, np.float64)
        for lab in np.unique(labs):
            m, s = moments.get(lab, average)  # a lab with no training rows: the average
            out[labs == lab] = (rows[labs == lab] - m) / s
        return out

    return average, standardise(train, train_labs), standardise(val, val_labs)


def fit_morphology(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray,
                   num_classes: int, sources: tuple[np.ndarray, np.ndarray] | None = None,
                   c_grid: Sequence[float] = (0.1, 1.0, 10.0)) -> tuple[MorphologyExpert, dict]:
    """The morphology expert of ``train --morphology`` (:mod:`hematovision.infer.morphology`).

    Args:
        train, val: (N, F) and (M, F) cell measurements (NaN rows: no cell found, filled with the
            training mean).
        sources: per-lab standardisation, as for :func:`fit_head`.

    Returns:
        The expert and a summary (C chosen on validation balanced accuracy, cells without a measurement).
    """
    from sklearn.linear_model import LogisticRegression

    fill = np.nanmean(train, axis=0)
    fill = np.where(np.isnan(fill), 0.0, fill)
    train_f, val_f = (np.where(np.isnan(x), fill, x) for x in (train, val))
    (mean, std), train_z, val_z = _standardised(train_f, train_labels, val_f, num_classes, sources)
    best = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(train_z, train_labels)
        score = _balanced_accuracy(val_labels, model.predict(val_z))
        if best is None or score > best[0]:
            best = (score, c, model)
    score, c, model = best
    weight, bias = _class_rows(model, num_classes)
    expert = MorphologyExpert(np.asarray(mean, np.float64), np.asarray(std, np.float64), weight, bias,
                              standardisation="training" if sources is None else "per_lab")
    summary = {"C": c, "val_balanced_accuracy": score,
               "not_measured": {"train": int(np.isnan(train).any(axis=1).sum()), "val": int(np.isnan(val).any(axis=1).sum())}}
    log.debug("morphology expert fitted: %s", summary)
    return expert, summary


def _class_rows(model: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted scikit-learn logistic regression as (K, D) weights and (K,) biases, one row per class.

    Two classes give a single row (class 1 against class 0): it becomes two rows of half that
    logit each, which softmax turns into the same probabilities (copying the one row into both left
    every class the same logit: a constant head). A class absent from the training labels gets no say.
    """
    coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
    if coef.shape[0] == 1 and len(model.classes_) == 2:
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    weight, bias = np.zeros((num_classes, coef.shape[1])), np.full(num_classes, -30.0)
    weight[model.classes_], bias[model.classes_] = coef, intercept
    return weight, bias


def _balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, predictions))


def _fit_logreg(linear: nn.Module, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                c_grid: Sequence[float]) -> dict:
    from sklearn.linear_model import LogisticRegression

    best = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        model.fit(x, y)
        score = _balanced_accuracy(val_y, model.predict(val_x))
        if best is None or score > best[0]:
            best = (score, c, model)
    score, c, model = best
    weight, bias = _class_rows(model, linear.weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return {"head": "logreg", "C": c, "val_balanced_accuracy": score}


def _fit_mlp(mlp: nn.Module, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             num_classes: int, seed: int, epochs: int = 60, batch_size: int = 128) -> dict:
    import torch.nn.functional as F

    torch.manual_seed(seed)
    # The head's initial weights too: they were drawn when the network was built, from whatever state
    # the global generator had then, which made the same seed give test accuracies from 0.949 to 0.966.
    for module in mlp.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    rng = np.random.default_rng(seed)
    inputs, targets = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    val_inputs = torch.as_tensor(val_x, dtype=torch.float32)
    counts = np.bincount(y, minlength=num_classes)
    weight = torch.as_tensor(len(y) / np.maximum(counts, 1) / num_classes, dtype=torch.float32)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    best_score, best_state, best_epoch = -1.0, None, 0
    for epoch in range(epochs):
        mlp.train()
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            batch = F.dropout(inputs[index], 0.2)  # input dropout: the features are strongly correlated
            loss = F.cross_entropy(mlp(batch), targets[index], weight=weight, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        mlp.eval()
        with torch.no_grad():
            score = _balanced_accuracy(val_y, mlp(val_inputs).argmax(1).numpy())
        if score >= best_score:
            best_score, best_epoch = score, epoch
            best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(best_state)
    return {"head": "mlp", "epochs": epochs, "best_epoch": best_epoch + 1, "val_balanced_accuracy": best_score}
