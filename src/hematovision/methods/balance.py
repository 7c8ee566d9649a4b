"""Class balancing by oversampling (CNN-RNN paper: classes brought to equal counts).

The paper balanced its training set by adding rotated and flipped copies of the rarer
classes. Here each epoch draws an index list with every class at the same count; the
random rotation/flip applied to every training sample turns the repeats into new views.
"""

from __future__ import annotations

import numpy as np


def balanced_indices(labels: np.ndarray, rng: np.random.Generator, per_class: int | None = None) -> np.ndarray:
    """Indices into ``labels`` with exactly ``per_class`` entries of every class, shuffled.

    Each class is repeated whole as often as it fits, and the remainder is a random
    subset drawn without replacement, so no sample is used more than once more than another
    of its class.

    Args:
        labels: (N,) integer labels.
        rng: the random generator.
        per_class: target count per class (default: the largest class's count).

    Returns:
        (K * per_class,) int64 indices.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 0:
        return np.zeros(0, np.int64)
    target = int(per_class if per_class is not None else counts.max())
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        repeats, remainder = divmod(target, len(members))
        chosen += [np.tile(members, repeats), rng.choice(members, remainder, replace=False)]
    indices = np.concatenate(chosen).astype(np.int64)
    rng.shuffle(indices)
    return indices
