"""Figures of evaluation results (matplotlib is imported here only, with the Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from hematovision._io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts in each cell."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 1.0 + 0.7 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                        color="white" if normalised[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title or "Confusion matrix")
    return _save(fig, path)


def plot_per_class_recall(per_class: dict, path: Path, title: str = "") -> Path:
    """Horizontal bars of recall per class, with the support in the label."""
    plt = _pyplot()
    names = list(per_class)
    recall = [per_class[name]["recall"] for name in names]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1))
    ax.barh(range(len(names)), recall, color="#4c72b0")
    ax.set_yticks(range(len(names)), [f"{name} (n={per_class[name]['support']})" for name in names])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    for i, value in enumerate(recall):
        inside = value > 0.15  # a long bar holds its label in white; a short one has it in black beside it
        ax.text(min(value, 0.9), i, f"{value:.3f}", va="center", ha="right" if inside else "left",
                color="white" if inside else "black")
    ax.set_xlabel("recall")
    ax.set_title(title or "Per-class recall")
    return _save(fig, path)


def plot_reliability(bins: dict, path: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = [(lo + hi) / 2 for lo, hi in zip(bins["lower"], bins["upper"])]
    width = bins["upper"][0] - bins["lower"][0]
    accuracy = [0 if np.isnan(a) else a for a in bins["accuracy"]]
    ax.bar(centers, accuracy, width=width, edgecolor="black", color="#55a868", label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title or "Reliability diagram")
    return _save(fig, path)


def plot_training_curves(history: Sequence[dict], path: Path) -> Path:
    """Train/val loss and val accuracy per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    left.plot(epochs, [row["val_loss"] for row in history], label="val")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    right.plot(epochs, [row["val_accuracy"] for row in history], label="val accuracy")
    right.plot(epochs, [row["val_balanced_accuracy"] for row in history], label="val balanced accuracy")
    right.set_xlabel("epoch")
    right.legend()
    fig.suptitle("Training curves")
    return _save(fig, path)
