"""Training-set transforms the papers' recipes name, by name.

* ``checkerboard``: every image plus its two checkerboard images (HematoVision paper).
* ``rot_flip``: a random one of the 8 rotations/flips of every sample (CNN-RNN paper).
* ``balance``: every class at the same count in each epoch (CNN-RNN paper).
"""

from __future__ import annotations

import numpy as np
import torch

from hematovision.data.transforms import dihedral
from hematovision.methods.balance import balanced_indices
from hematovision.methods.checkerboard import checkerboard_augment


def random_dihedral(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Apply an independent random rotation/flip to each (C, H, W) sample of an (N, C, H, W) batch."""
    choices = rng.integers(0, 8, size=len(batch))
    out = batch.clone()
    for index in np.unique(choices):
        rows = torch.from_numpy(np.flatnonzero(choices == index))
        out[rows] = dihedral(batch[rows], int(index))
    return out


AUGMENTATIONS = {
    "checkerboard": checkerboard_augment,
    "rot_flip": random_dihedral,
    "balance": balanced_indices,
}
