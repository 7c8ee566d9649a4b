"""What defines a benchmark run: :class:`BenchConfig`, and the name of our own method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Our own method, benchmarked beside the papers': the frozen multi-stage EfficientNet-Lite0 features
# and class-balanced logistic-regression head of ``hematovision train --mode frozen``.
OURS = "hematovision_frozen"
# Input side of every model in a --quick smoke run.
QUICK_SIZE = 32


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run (saved as ``config.json``).

    Attributes:
        models: model names (``NAME`` or ``NAME@VARIANT``; ``hematovision_frozen`` is ours).
        data: training data folder (class layout, or split layout with a train split).
        out: output folder.
        folds: k for stratified (grouped) k-fold; ``None`` for a fixed split.
        test_dirs: fixed test folders (default for a split layout: its non-train splits).
        classes: keep only these classes.
        quick: smoke run: 32 px, 1 epoch, 2 folds, at most 24 training images per class.
        epochs: override every recipe's epochs.
        image_size: override every recipe's input size.
        random_init: train models without offline ImageNet weights from random initialisation
            (labelled ``random init``) instead of skipping them.
        seed: seed of the folds and of training.
        threads: torch CPU threads.
        limit_per_class: use at most this many training images per class (``None``: all).
        ungrouped: ignore the dataset's origin groups (only byte-identical files stay together);
            shows how much random re-splits of augmented images inflate accuracy.
    """

    models: list[str]
    data: Path
    out: Path
    folds: int | None = None
    test_dirs: list[Path] = field(default_factory=list)
    classes: list[str] | None = None
    quick: bool = False
    epochs: int | None = None
    image_size: int | None = None
    random_init: bool = False
    seed: int = 0
    threads: int = 2
    limit_per_class: int | None = None
    ungrouped: bool = False
