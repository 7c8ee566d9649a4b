"""Fine-tuning any registered model: the training loop of :mod:`hematovision.train.loop` with
validation, early stopping and resumable, atomic checkpoints around it.

Images are decoded once and kept in memory at the model's input size; each epoch draws
augmented views from them. On two CPU cores that keeps the loop compute-bound.

Under ``torchrun`` the same function trains data-parallel: see :mod:`hematovision.train.distributed`
for how the global batch is split and why the result equals one process's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hematovision.data.transforms import Preprocessing, TrainTransform, normalize
from hematovision.run import LAST_FILE, MODEL_FILE, STATE_FILE, load_weights, save_weights
from hematovision.train import distributed
from hematovision.train.checkpoint import load_state, save_state
from hematovision.train.loop import Batch, evaluate, predict, train_one_epoch
from hematovision.train.optim import make_loss, make_optimizer, warmup_cosine_schedule

log = logging.getLogger(__name__)

# FinetuneConfig.loss names → loss names of hematovision.train.optim. "hinge" has always meant
# the Crammer-Singer loss here (the benchmark's recipes mean Weston-Watkins by it).
FINETUNE_LOSSES = {"cross_entropy": "cross_entropy", "hinge": "crammer_singer_hinge"}


@dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (saved in the run folder).

    Attributes:
        epochs: maximum number of epochs.
        batch_size: images per step; under torchrun the global batch, split across the processes.
        lr: peak learning rate (after a one-epoch linear warm-up, cosine decay to 1% of it).
        weight_decay: decoupled weight decay (AdamW; L2 for the other optimizers).
        optimizer: ``adamw``, ``adam``, ``rmsprop`` (torch's defaults) or ``sgd`` (Nesterov momentum 0.9).
        loss: ``cross_entropy`` or ``hinge`` (the Crammer-Singer multi-class hinge loss, for SVM heads).
        label_smoothing: for cross-entropy.
        balance: ``loss`` (inverse-frequency class weights), ``sampler`` (balanced sampling) or ``none``.
        augment: random crops, flips/rotations and colour jitter on training images.
        color_jitter: strength of the colour jitter.
        strong_augment: also zoom out, blur, lower the resolution and shift stains, for images
            from other labs and scanners (see ``TrainTransform``).
        patience: stop when validation balanced accuracy has not improved for this many epochs.
        seed: seeds weights of new layers, augmentation and batch order.
        max_steps_per_epoch: cap steps per epoch (smoke tests and quick benches).
        warmup_epochs: linear warm-up length.

    Run folders written by earlier versions also hold ``freeze_backbone_epochs`` (always 0) in
    their saved settings (``model_card.json``, ``train_state.pt``); nothing reads it back.
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


def image_batches(images: np.ndarray, prep: Preprocessing, batch_size: int = 64) -> Iterator[Tensor]:
    """Normalised channels-last (B, 3, S, S) batches of (N, S, S, 3) uint8 images, in order."""
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size], prep).contiguous(memory_format=torch.channels_last)


def predict_logits(model: nn.Module, images: np.ndarray, prep: Preprocessing, batch_size: int = 64,
                   views: int = 1) -> np.ndarray:
    """Logits for (N, S, S, 3) uint8 images already at the model's size: (N, K).

    ``views`` > 1 averages the logits of that many flips/90° rotations of each image.
    """
    return predict(model, image_batches(images, prep, batch_size), views)


def _training_batches(images: np.ndarray, labels: np.ndarray, order: np.ndarray, batch_size: int,
                      prep: Preprocessing, augment: TrainTransform | None, rng: np.random.Generator,
                      world: distributed.World = distributed.SINGLE) -> Iterator[Batch]:
    # Augmentation draws from ``rng`` batch by batch, as the loop consumes them. A distributed rank
    # walks the same global batches as every other rank and keeps its own slice of each.
    for start in range(0, len(order), batch_size):
        world.raise_if_interrupted()
        index = world.shard(order[start : start + batch_size])
        if augment is not None and len(index):
            inputs = torch.stack([augment(images[i], rng) for i in index])
        else:
            inputs = normalize(images[index], prep)
        inputs = inputs.contiguous(memory_format=torch.channels_last).to(world.device)
        yield inputs, torch.as_tensor(labels[index]).to(world.device)


def _labelled_batches(images: np.ndarray, labels: np.ndarray, prep: Preprocessing,
                      batch_size: int = 64, device: torch.device | str = "cpu") -> Iterator[Batch]:
    for start in range(0, len(images), batch_size):
        inputs = normalize(images[start : start + batch_size], prep).contiguous(memory_format=torch.channels_last)
        yield inputs.to(device), torch.as_tensor(labels[start : start + batch_size]).to(device)


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
) -> TrainResult:
    """Train ``model`` and keep the weights of its best validation epoch.

    After every epoch the run folder holds ``last.safetensors`` + ``train_state.pt``
    (what ``resume`` continues from) and ``model.safetensors`` (the best epoch so far),
    all written atomically. Ctrl-C therefore loses at most the epoch in progress.

    Under torchrun (:func:`hematovision.train.distributed.init_from_env` called first) every rank
    calls this with the same arguments; rank 0 validates and writes, and only rank 0's returned
    model is the best one (the others return their last weights).

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
    """
    world = distributed.world()
    run_dir = Path(run_dir)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    # ``rng`` orders the batches, identically on every rank; augmentation and dropout draw from
    # per-rank streams (one process: the same ``rng`` and torch seed as always).
    augment_rng = _seed_rank_streams(config.seed, world) if world.distributed else rng
    model = model.to(world.device, memory_format=torch.channels_last)
    augment = TrainTransform(prep, color_jitter=config.color_jitter, strong=config.strong_augment) if config.augment else None

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
    # The recipe of `hematovision train`: torch's RMSprop constants and Nesterov SGD.
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.optimizer, lr=config.lr,
                               weight_decay=config.weight_decay, sgd_nesterov=True, rmsprop_alpha=0.99,
                               rmsprop_eps=1e-8, fused=False)
    scheduler = warmup_cosine_schedule(optimizer, int(steps_per_epoch * config.warmup_epochs),
                                       steps_per_epoch * config.epochs)
    if config.loss not in FINETUNE_LOSSES:
        raise ValueError(f"unknown loss {config.loss!r} ({', '.join(FINETUNE_LOSSES)})")
    loss_fn = make_loss(FINETUNE_LOSSES[config.loss], class_weight=class_weight,
                        label_smoothing=config.label_smoothing)
    loss_fn = distributed.global_batch_loss(loss_fn, class_weight, world)

    history: list[dict] = []
    start_epoch, best_score, best_epoch, stale = 0, -1.0, -1, 0
    state_path = run_dir / STATE_FILE
    if resume and state_path.exists():
        state = load_state(state_path)
        load_weights(model, run_dir / LAST_FILE)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if world.distributed:
            augment_rng = _restore_rank_streams(state, config.seed, world, augment_rng)
        history, start_epoch = state["history"], state["epoch"] + 1
        best_score, best_epoch, stale = state["best_score"], state["best_epoch"], state["stale"]
        log.info("resuming after epoch %d (best so far: epoch %d)", start_epoch, best_epoch + 1)

    trained_model = world.wrap(model)  # DDP in a distributed run (same parameters as ``model``)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        if sample_prob is not None:
            order = rng.choice(len(train_images), size=steps_per_epoch * config.batch_size, p=sample_prob)
        else:
            order = rng.permutation(len(train_images))[: steps_per_epoch * config.batch_size]
        batches = _training_batches(train_images, train_labels, order, config.batch_size, prep, augment,
                                    augment_rng, world)
        try:
            trained = train_one_epoch(trained_model, batches, loss_fn, optimizer, scheduler,
                                      desc=f"epoch {epoch + 1}/{config.epochs}" if world.is_main else None,
                                      steps=steps_per_epoch)
        except FloatingPointError as error:
            raise FloatingPointError(f"{error} at epoch {epoch + 1}; lower --lr") from None
        if world.distributed:  # the epoch's mean loss over every rank's images
            total, seen = world.sum(trained["loss"] * trained["samples"], trained["samples"])
            trained["loss"] = total / max(seen, 1)
        # Rank 0 validates the whole split exactly as one process would; the others follow its result.
        val = world.broadcast(evaluate(model, _labelled_batches(val_images, val_labels, prep, device=world.device))
                              if world.is_main else None)
        row = {
            "epoch": epoch + 1,
            "train_loss": trained["loss"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val acc %.4f, val bal acc %.4f",
                 row["epoch"], row["train_loss"], row["val_loss"], row["val_accuracy"], row["val_balanced_accuracy"])
        # Balanced accuracy first, ties broken by the lower validation loss; an exact tie keeps the earlier epoch.
        score = row["val_balanced_accuracy"] - 1e-3 * row["val_loss"]
        improved = score > best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
        rank_streams = world.gather(_rank_stream_state(augment_rng)) if world.distributed else None
        if not world.is_main:
            continue
        if improved:
            save_weights(model, run_dir / MODEL_FILE)
        save_weights(model, run_dir / LAST_FILE)
        save_state(state_path, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "history": history, "epoch": epoch, "best_score": best_score,
            "best_epoch": best_epoch, "stale": stale, "config": config.to_dict(),
            **({"rank_rngs": rank_streams} if rank_streams else {}),
        })
    seconds = time.perf_counter() - started
    if world.is_main and (run_dir / MODEL_FILE).exists():
        load_weights(model, run_dir / MODEL_FILE)
    return TrainResult(model.cpu().eval(), best_epoch + 1, history, seconds)


def _seed_rank_streams(seed: int, world: distributed.World) -> np.random.Generator:
    """A distributed rank's own augmentation generator and torch seed (rank 0 keeps ``seed`` for torch)."""
    if world.rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, world.rank]).generate_state(1)[0]))
    return np.random.default_rng([seed, world.rank])


def _rank_stream_state(augment_rng: np.random.Generator) -> dict:
    return {"augment": augment_rng.bit_generator.state, "torch": torch.get_rng_state()}


def _restore_rank_streams(state: dict, seed: int, world: distributed.World,
                          augment_rng: np.random.Generator) -> np.random.Generator:
    """Each rank's saved augmentation and torch streams, when the run had this many ranks."""
    streams = state.get("rank_rngs")
    if not streams or len(streams) != world.size:
        if world.is_main:
            log.warning("resuming with %d processes (saved: %s): augmentation streams restart from the seed",
                        world.size, len(streams) if streams else 1)
        return _seed_rank_streams(seed, world)
    augment_rng.bit_generator.state = streams[world.rank]["augment"]
    torch.set_rng_state(streams[world.rank]["torch"])
    return augment_rng
