"""Fine-tuning any registered model: a plain epoch loop with resumable, atomic checkpoints.

Images are decoded once and kept in memory at the model's input size; each epoch draws
augmented views from them. On two CPU cores that keeps the loop compute-bound.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hematovision.data.transforms import Preprocessing, TrainTransform, dihedral_mean, normalize
from hematovision.train.checkpoint import MODEL_FILE, STATE_FILE, load_state, load_weights, save_state, save_weights

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (saved in the run folder).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: images per step.
        lr: peak learning rate (after a one-epoch linear warm-up, cosine decay to 1% of it).
        weight_decay: decoupled weight decay (AdamW).
        optimizer: ``adamw``, ``adam``, ``rmsprop`` or ``sgd``.
        loss: ``cross_entropy`` or ``hinge`` (multi-class, Crammer-Singer style, for SVM heads).
        label_smoothing: for cross-entropy.
        balance: ``loss`` (inverse-frequency class weights), ``sampler`` (balanced sampling) or ``none``.
        augment: random crops, flips/rotations and colour jitter on training images.
        color_jitter: strength of the colour jitter.
        strong_augment: also zoom out, blur, lower the resolution and shift stains, for images
            from other labs and scanners (see ``TrainTransform``).
        patience: stop when validation balanced accuracy has not improved for this many epochs.
        freeze_backbone_epochs: train only the classifier for this many first epochs.
        seed: seeds weights of new layers, augmentation and batch order.
        max_steps_per_epoch: cap steps per epoch (smoke tests and quick benches).
        warmup_epochs: linear warm-up length.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.02
    optimizer: str = "adamw"
    loss: str = "cross_entropy"
    label_smoothing: float = 0.1
    balance: str = "loss"
    augment: bool = True
    color_jitter: float = 0.15
    strong_augment: bool = False
    patience: int = 4
    freeze_backbone_epochs: int = 0
    seed: int = 0
    max_steps_per_epoch: int | None = None
    warmup_epochs: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`finetune` returns: the best model (by validation), its epoch and the history."""

    model: nn.Module
    best_epoch: int
    history: list[dict]
    seconds: float


def multiclass_hinge_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Crammer-Singer multi-class hinge loss: max(0, 1 + max_{j≠y} s_j − s_y)."""
    true_score = logits.gather(1, target[:, None])
    margins = (1.0 + logits - true_score).scatter(1, target[:, None], 0.0)
    loss = margins.clamp_min(0.0).max(dim=1).values
    if weight is not None:
        return (loss * weight[target]).sum() / weight[target].sum()
    return loss.mean()


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up to 1 over the first ``warmup_steps`` steps, then cosine decay from 1 down to
    0.01 (reached at ``total_steps``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adamw, adam, rmsprop, sgd)")


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the final classifier (timm's ``get_classifier`` or a ``classifier``/``fc``/``head`` attribute)."""
    head = None
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
    for name in ("classifier", "fc", "head"):
        if head is None and isinstance(getattr(model, name, None), nn.Module):
            head = getattr(model, name)
    return list(head.parameters()) if isinstance(head, nn.Module) else []


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, prep: Preprocessing, batch_size: int = 64,
                   input_fn: Callable[[np.ndarray], Tensor] | None = None, views: int = 1) -> np.ndarray:
    """Logits for (N, S, S, 3) uint8 images already at the model's size: (N, K).

    ``views`` > 1 averages the logits of that many flips/90° rotations of each image.
    """
    model.eval()
    to_input = input_fn or (lambda batch: normalize(batch, prep))
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_input(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
        outputs.append(dihedral_mean(model, batch, views).float().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def finetune(
    model: nn.Module,
    prep: Preprocessing,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    num_classes: int,
    config: FinetuneConfig,
    run_dir: str | Path,
    resume: bool = False,
    train_transform: Callable[[np.ndarray, np.random.Generator], Tensor] | None = None,
    input_fn: Callable[[np.ndarray], Tensor] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` and keep the weights of its best validation epoch.

    After every epoch the run folder holds ``last.safetensors`` + ``train_state.pt``
    (what ``resume`` continues from) and ``model.safetensors`` (the best epoch so far),
    all written atomically. Ctrl-C therefore loses at most the epoch in progress.

    Args:
        model: any ``nn.Module`` mapping normalised (N, 3, S, S) inputs to logits.
        prep: preprocessing of the model (size, mean, std).
        train_images: (N, S, S, 3) uint8 at ``prep.image_size``.
        train_labels: (N,) integer labels.
        val_images: (M, S, S, 3) uint8; early stopping and the best epoch use it.
        val_labels: (M,) integer labels.
        num_classes: number of classes K.
        config: training settings.
        run_dir: folder for checkpoints.
        resume: continue from ``run_dir/train_state.pt`` if it exists.
        train_transform: override of the augmentation, ``fn(image, rng) -> (3, S, S) tensor``.
        input_fn: override of the evaluation input mapping, ``fn(uint8 batch) -> (N, 3, S, S)``.
        on_epoch_end: called with each epoch's history row.
    """
    from sklearn.metrics import balanced_accuracy_score
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = model.to(memory_format=torch.channels_last)
    augment = train_transform or (TrainTransform(prep, color_jitter=config.color_jitter, strong=config.strong_augment) if config.augment else None)
    to_input = input_fn or (lambda batch: normalize(batch, prep))

    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    class_weight = None
    if config.balance == "loss":
        class_weight = torch.tensor(counts.sum() / np.maximum(counts, 1) / num_classes, dtype=torch.float32)
    sample_prob = None
    if config.balance == "sampler":
        sample_prob = (1.0 / np.maximum(counts, 1))[train_labels]
        sample_prob /= sample_prob.sum()

    steps_per_epoch = math.ceil(len(train_images) / config.batch_size)
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(steps_per_epoch * config.warmup_epochs)
    optimizer = _optimizer(config.optimizer, [p for p in model.parameters() if p.requires_grad], config.lr, config.weight_decay)

    def lr_factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history: list[dict] = []
    start_epoch, best_score, best_epoch, stale = 0, -1.0, -1, 0
    state_path = run_dir / STATE_FILE
    if resume and state_path.exists():
        state = load_state(state_path)
        load_weights(model, run_dir / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
        best_score, best_epoch, stale = state["best_score"], state["best_epoch"], state["stale"]
        log.info("resuming after epoch %d (best so far: epoch %d)", start_epoch, best_epoch + 1)

    head_params = {id(p) for p in classifier_parameters(model)}
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        frozen_phase = epoch < config.freeze_backbone_epochs and bool(head_params)
        for parameter in model.parameters():
            if id(parameter) not in head_params:
                parameter.requires_grad_(not frozen_phase)
        model.train()
        if sample_prob is not None:
            order = rng.choice(len(train_images), size=steps_per_epoch * config.batch_size, p=sample_prob)
        else:
            order = rng.permutation(len(train_images))[: steps_per_epoch * config.batch_size]
        epoch_loss, seen = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step")
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            if len(index) == 0:
                break
            if augment is not None:
                inputs = torch.stack([augment(train_images[i], rng) for i in index])
            else:
                inputs = to_input(train_images[index])
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            target = torch.as_tensor(train_labels[index])
            logits = model(inputs)
            if config.loss == "hinge":
                loss = multiclass_hinge_loss(logits, target, class_weight)
            else:
                loss = F.cross_entropy(logits, target, weight=class_weight, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
            epoch_loss += loss.item() * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{epoch_loss / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        val_logits = predict_logits(model, val_images, prep, input_fn=to_input)
        val_target = torch.as_tensor(val_labels)
        val_loss = float(F.cross_entropy(torch.as_tensor(val_logits), val_target))
        val_pred = val_logits.argmax(axis=1)
        row = {
            "epoch": epoch + 1,
            "train_loss": epoch_loss / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": float((val_pred == val_labels).mean()),
            "val_balanced_accuracy": float(balanced_accuracy_score(val_labels, val_pred)),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val acc %.4f, val bal acc %.4f",
                 row["epoch"], row["train_loss"], val_loss, row["val_accuracy"], row["val_balanced_accuracy"])
        # Ties go to the later epoch: same validation score after more training usually generalises better.
        score = row["val_balanced_accuracy"] - 1e-3 * val_loss
        if score > best_score:
            best_score, best_epoch, stale = score, epoch, 0
            save_weights(model, run_dir / MODEL_FILE)
        else:
            stale += 1
        save_weights(model, run_dir / "last.safetensors")
        save_state(state_path, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "history": history, "epoch": epoch, "best_score": best_score,
            "best_epoch": best_epoch, "stale": stale, "config": config.to_dict(),
        })
        if on_epoch_end:
            on_epoch_end(row)
    seconds = time.perf_counter() - started
    if (run_dir / MODEL_FILE).exists():
        load_weights(model, run_dir / MODEL_FILE)
    return TrainResult(model.eval(), best_epoch + 1, history, seconds)
