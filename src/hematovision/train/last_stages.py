"""Training a backbone's last stages and a new head on a few hundred cells or fewer.

The loop behind few-shot adaptation (``adapt --data``, :mod:`hematovision.adapt.finetune`) and behind a
frozen run's few-shot start (``train --few-shot-start``). What is trained, and why:

* the last :data:`STAGES` stages, the final 1x1 convolution and a new classifier learn; the earlier
  stages stay frozen, with their batch-norm statistics (a hundred cells cannot re-estimate them);
* every step sees the cells under random dihedral views and stain and optics changes
  (:func:`hematovision.data.stain.augment_stain`), so a few cells stand for a lab's variation; the
  cells are already scale- and stain-normalised by the run's preprocessing, so no zoom crops;
* a fixed number of optimisation steps, whatever the number of cells, so the time is bounded
  (250 steps: about two minutes on 2 CPU cores at 224 px); classes are weighted by their inverse frequency.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from hematovision.data.transforms import Preprocessing, dihedral, normalize
from hematovision.errors import HematoVisionError

log = logging.getLogger(__name__)

STAGES = 4  # trainable stages at the end of the backbone (EfficientNet-Lite0 has 7)
STEPS = 250  # optimisation steps per fit (about 40 epochs of 100 cells)
BATCH = 16
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-2
LABEL_SMOOTHING = 0.1


@dataclass(frozen=True)
class FineTuneSettings:
    """How a last-stages fine-tune trains (recorded in the card: the adapted run's, or the few-shot start's)."""

    stages: int = STAGES
    steps: int = STEPS
    batch_size: int = BATCH
    learning_rate: float = LEARNING_RATE
    weight_decay: float = WEIGHT_DECAY
    label_smoothing: float = LABEL_SMOOTHING


def can_finetune(backbone: str) -> str | None:
    """Why a run with this backbone cannot be fine-tuned on a lab's cells, or ``None`` when it can."""
    if "+" in backbone:
        return (f"its backbone {backbone} joins several networks' features; few-shot fine-tuning needs one "
                "network (train with a single --backbone)")
    if not backbone.startswith("efficientnet_lite"):
        return f"few-shot fine-tuning knows EfficientNet-Lite backbones, not {backbone}"
    return None


def fine_tune(start: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, prep: Preprocessing,
              settings: FineTuneSettings, seed: int, progress: str | None = None) -> nn.Module:
    """Train a copy of ``start``'s last stages and a new head on prepared ``images`` (N, S, S, 3) uint8."""
    from hematovision.data.stain import augment_stain

    if len(images) == 0:
        raise HematoVisionError("no labelled cells to fine-tune on")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = copy.deepcopy(start)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    trainable = _trainable_modules(model, settings.stages)
    for parameter in model.parameters():
        parameter.requires_grad = False
    parameters = [p for module in trainable for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad = True
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    weights *= (counts > 0).sum() / weights.sum()
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32),
                                  label_smoothing=settings.label_smoothing)
    model.eval()
    for module in trainable:  # the frozen stages keep their batch-norm statistics; the trained ones learn theirs
        module.train()
    order = np.zeros(0, dtype=np.int64)
    started = time.perf_counter()
    for _ in tqdm(range(settings.steps), desc=progress or "fine-tuning", unit="step", leave=False,
                  disable=progress is None):
        if len(order) < settings.batch_size:
            order = np.concatenate([order, rng.permutation(len(images))])
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        views = [augment_stain(images[i], rng) for i in batch]
        inputs = normalize(np.stack(views), prep)
        inputs = torch.stack([dihedral(x, int(rng.integers(0, 8))) for x in inputs])
        loss = loss_fn(model(inputs), torch.as_tensor(labels[batch], dtype=torch.long))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for parameter in model.parameters():
        parameter.requires_grad = True
    log.debug("fine-tuned on %d cells in %.0f s", len(images), time.perf_counter() - started)
    return model.eval()


def _trainable_modules(model: nn.Module, stages: int) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not 1 <= stages <= len(blocks):
        raise HematoVisionError(f"cannot fine-tune the last {stages} stages of {type(model).__name__}")
    head = [getattr(model, name) for name in ("conv_head", "bn2", "classifier") if hasattr(model, name)]
    return [*blocks[-stages:], *head]
