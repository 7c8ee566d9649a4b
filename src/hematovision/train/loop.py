"""The training loop: :func:`train_one_epoch` and :func:`evaluate`, in the spirit of torchvision's
``references/classification/train.py``.

Both take a model and an iterable of ``(inputs, targets)`` batches, already tensors, and return
plain floats. Everything else (which images, in what order, augmented how; when to stop; what
to save) belongs to the caller: :func:`hematovision.train.finetune.finetune` adds validation,
early stopping and checkpoints; the benchmark (:mod:`hematovision.bench.cells`) runs its
papers' recipes for fixed epochs without validation. Nothing here reads a global setting, so a
distributed run can wrap the model and shard the batches without a second loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hematovision.data.transforms import dihedral_mean
from hematovision.train.optim import LossFn

Batch = tuple[Tensor, Tensor]


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    desc: str | None = None,
    steps: int | None = None,
) -> dict[str, float]:
    """One pass over ``batches``: forward, loss, backward, optimizer step (and scheduler step).

    Args:
        model: maps inputs to (B, K) logits; its parameters the optimizer holds are trained.
        batches: ``(inputs, targets)`` pairs, targets (B,) class indices.
        loss_fn: ``loss_fn(logits, targets) -> scalar`` (see :func:`~hematovision.train.optim.make_loss`).
        optimizer: the optimizer.
        scheduler: stepped after every optimizer step when given.
        desc: show a progress bar with this title (``None``: no bar).
        steps: the number of batches, for the progress bar.

    Returns:
        ``loss`` (mean training loss per sample), ``samples`` and ``lr`` (after the last step).

    Raises:
        FloatingPointError: the loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    model.train()
    # Frozen parts (every parameter fixed) keep their pretrained batch-norm statistics.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()

    total_loss, seen = 0.0, 0
    bar = tqdm(batches, total=steps, desc=desc, unit="step", disable=desc is None)
    for inputs, targets in bar:
        loss = loss_fn(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()}")
        total_loss += loss.item() * len(targets)
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
    return {"loss": total_loss / max(seen, 1), "samples": float(seen), "lr": float(optimizer.param_groups[0]["lr"])}


@torch.inference_mode()
def predict(model: nn.Module, inputs: Iterable[Tensor], views: int = 1) -> np.ndarray:
    """(N, K) float32 logits of ``model`` in eval mode over batches of inputs.

    Args:
        model: maps (B, ...) inputs to (B, K) logits.
        inputs: the input batches.
        views: > 1 averages the logits of that many flips/90° rotations of each image.
    """
    model.eval()
    outputs = [dihedral_mean(model, batch, views).float().numpy() for batch in inputs]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch], views: int = 1) -> dict[str, float]:
    """Loss and accuracy of ``model`` on labelled batches, in eval mode without gradients.

    Args:
        model: maps (B, ...) inputs to (B, K) logits.
        batches: ``(inputs, targets)`` pairs.
        views: > 1 averages the logits of that many flips/90° rotations of each image.

    Returns:
        ``loss`` (unweighted cross-entropy), ``accuracy`` and ``balanced_accuracy``.
    """
    from sklearn.metrics import balanced_accuracy_score

    model.eval()
    outputs, targets = [], []
    for inputs, target in batches:
        outputs.append(dihedral_mean(model, inputs, views).float().cpu())  # a no-op on the CPU
        targets.append(target.cpu())
    logits, labels = torch.cat(outputs), torch.cat(targets)
    predicted = logits.argmax(dim=1).numpy()
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((predicted == labels.numpy()).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels.numpy(), predicted)),
    }
