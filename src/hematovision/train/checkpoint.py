"""Resumable fine-tuning state (optimizer, scheduler, epoch, history, RNG), saved atomically.

The run folder's other files (weights, card, split) belong to :mod:`hematovision.run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hematovision._io import atomic_write


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save resumable training state atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load training state saved by :func:`save_state`."""
    return torch.load(path, map_location="cpu", weights_only=False)
