"""Run-folder files: weights as safetensors, a JSON model card, and resumable training state.

Every file is written to a temporary name and renamed, so an interrupted run leaves the
previous complete file in place, never a half-written one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hematovision._io import atomic_write, sha256_file, write_json
from hematovision.errors import HematoVisionError

MODEL_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
STATE_FILE = "train_state.pt"
CARD_FORMAT = 1


def save_weights(model: nn.Module, path: str | Path) -> str:
    """Save ``model``'s state dict as safetensors, atomically; returns its sha256."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return sha256_file(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into ``model``; a clear error when they belong to another model."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HematoVisionError(f"weight file not found: {path}")
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise HematoVisionError(
            f"{path} does not fit this model ({first}); it was saved for a different backbone or class list"
        ) from error
    return model


def write_card(run_dir: str | Path, card: dict[str, Any]) -> Path:
    """Write ``model_card.json`` (adds the format version and the weight file's sha256)."""
    run_dir = Path(run_dir)
    card = {"format": CARD_FORMAT, **card}
    weights = run_dir / MODEL_FILE
    if weights.exists():
        card["files"] = {MODEL_FILE: {"sha256": sha256_file(weights)}}
    return write_json(run_dir / CARD_FILE, card)


def read_card(run_dir: str | Path) -> dict[str, Any]:
    """Read a run folder's model card, checking it exists and is ours."""
    path = Path(run_dir) / CARD_FILE
    if not path.is_file():
        raise HematoVisionError(f"{run_dir} is not a HematoVision run folder (no {CARD_FILE}); train one with 'hematovision train'")
    card = json.loads(path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise HematoVisionError(f"{path}: unsupported model card format {card.get('format')!r}")
    return card


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Save resumable training state (optimizer, scheduler, epoch, history, RNG) atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load training state saved by :func:`save_state`."""
    return torch.load(path, map_location="cpu", weights_only=False)
