"""The one optimizer, learning-rate schedule and loss factory of every HematoVision training loop.

Callers state their recipe's numbers explicitly: ``hematovision train`` (fine-tuning) and the
papers' recipes of ``hematovision bench`` differ in weight decay, Nesterov momentum, RMSprop's
constants and Adam's kernel, and each keeps its own (see ``finetune.py`` and ``bench/recipes.py``).

Losses by name (the two hinge losses are different objectives and keep different names):

* ``cross_entropy``: softmax cross-entropy, optional class weights and label smoothing.
* ``crammer_singer_hinge``: ``max(0, 1 + max_{j≠y} s_j − s_y)`` per sample, the largest margin
  violation only (Crammer & Singer 2001); class weights give a weighted mean.
* ``weston_watkins_hinge``: ``Σ_{j≠y} max(0, 1 − s_y + s_j) / K`` per sample, every violation
  (Weston & Watkins 1999; ``torch.nn.MultiMarginLoss`` with margin 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
LOSSES = ("cross_entropy", "crammer_singer_hinge", "weston_watkins_hinge")
# SGD's momentum is the same for every caller, so it is not a parameter.
SGD_MOMENTUM = 0.9

LossFn = Callable[[Tensor, Tensor], Tensor]


def make_optimizer(
    parameters: Iterable[nn.Parameter],
    name: str,
    *,
    lr: float,
    weight_decay: float,
    sgd_nesterov: bool,
    rmsprop_alpha: float,
    rmsprop_eps: float,
    fused: bool,
) -> torch.optim.Optimizer:
    """An optimizer over ``parameters``; every setting where the callers differ is an argument.

    Args:
        parameters: the trainable parameters.
        name: ``adamw``, ``adam``, ``rmsprop`` or ``sgd`` (momentum :data:`SGD_MOMENTUM`).
        lr: learning rate.
        weight_decay: decoupled for AdamW, L2 added to the gradient for the others.
        sgd_nesterov: Nesterov momentum for SGD.
        rmsprop_alpha: RMSprop's smoothing constant (torch 0.99, Keras ``rho`` 0.9).
        rmsprop_eps: RMSprop's epsilon (torch 1e-8, Keras 1e-7).
        fused: Adam/AdamW's fused kernel: the same update in one pass over the weights (about
            1.5x faster for W-Net's 16.8 M parameters on a CPU); ``False`` leaves torch's default.

    Raises:
        ValueError: an unknown ``name``.
    """
    params = list(parameters)
    kernel = True if fused else None  # None: torch's own choice
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=kernel)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=kernel)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, nesterov=sgd_nesterov, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} ({', '.join(OPTIMIZERS)})")


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up to 1 over the first ``warmup_steps`` steps, then cosine decay from 1 down to
    0.01 (reached at ``total_steps``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine_factor` as a scheduler stepped once per optimizer step."""

    # A plain function (not a callable object): LambdaLR then leaves it out of its state_dict,
    # as in the train_state.pt files written before this module existed.
    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def crammer_singer_hinge_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Crammer-Singer multi-class hinge loss: max(0, 1 + max_{j≠y} s_j − s_y), averaged.

    Args:
        logits: (N, K) class scores.
        target: (N,) class indices.
        weight: (K,) class weights; the mean is then weighted by each sample's class weight.
    """
    true_score = logits.gather(1, target[:, None])
    margins = (1.0 + logits - true_score).scatter(1, target[:, None], 0.0)
    loss = margins.clamp_min(0.0).max(dim=1).values
    if weight is not None:
        return (loss * weight[target]).sum() / weight[target].sum()
    return loss.mean()


def make_loss(name: str, *, class_weight: Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
    """The training loss ``loss(logits, target) -> scalar`` called ``name`` (see :data:`LOSSES`).

    Args:
        name: ``cross_entropy``, ``crammer_singer_hinge`` or ``weston_watkins_hinge``.
        class_weight: (K,) class weights (cross-entropy and Crammer-Singer).
        label_smoothing: cross-entropy only; the hinge losses have no smoothing.

    Raises:
        ValueError: an unknown name, or class weights with the Weston-Watkins loss (nothing
            uses that combination, and torch weights its terms differently from the others).
    """
    if name == "cross_entropy":
        # F.cross_entropy is looked up at call time, as the loops always did.
        return lambda logits, target: F.cross_entropy(logits, target, weight=class_weight,
                                                      label_smoothing=label_smoothing)
    if name == "crammer_singer_hinge":
        return lambda logits, target: crammer_singer_hinge_loss(logits, target, class_weight)
    if name == "weston_watkins_hinge":
        if class_weight is not None:
            raise ValueError("the Weston-Watkins hinge loss takes no class weights here")
        return nn.MultiMarginLoss(margin=1.0)
    raise ValueError(f"unknown loss {name!r} ({', '.join(LOSSES)})")
