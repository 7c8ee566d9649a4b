"""Label-free adaptation: the statistics a network normalises with, re-estimated on a lab's cells.

Another lab's stain and optics move the features a network computes; the head then sees inputs
unlike the ones it was fitted on. Re-estimating the normalisation statistics on the new lab's
images puts them back where the head expects them, without a single label:

* a **frozen** run standardises its pooled backbone features with ``feature_mean``/``feature_std``
  (:class:`~hematovision.models.frozen.FrozenClassifier`) before the head; they are replaced by the
  lab's own mean and standard deviation (the per-feature alignment of CORAL, without the full
  covariance, which a few hundred cells cannot estimate in ~2000 dimensions);
* a **fine-tuned** run's batch-norm layers get the lab's running statistics (AdaBN, Li et al. 2016;
  Tsutsui et al. 2023 found batch-norm statistics to be where a WBC classifier breaks across labs).

Optionally (:func:`minimise_entropy`) the affine part of that normalisation is then tuned to make
the predictions confident and diverse (information maximisation, as in TENT/SHOT); off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hematovision.data.transforms import Preprocessing, dihedral, dihedral_mean, normalize
from hematovision.infer.runtime import torch_forward
from hematovision.infer.shift import head_inputs


def is_frozen(model: nn.Module) -> bool:
    """Whether ``model`` is a frozen classifier (pooled features, standardisation, head)."""
    return hasattr(model, "feature_mean") and hasattr(model, "forward_head") and hasattr(model, "features")


def _batches(images: np.ndarray, prep: Preprocessing, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        yield normalize(images[start:start + batch_size], prep)


@torch.inference_mode()
def pooled_features(model: nn.Module, images: np.ndarray, prep: Preprocessing, views: int,
                    batch_size: int = 32) -> np.ndarray:
    """A frozen run's pooled backbone features of prepared images, averaged over its views: (N, D)."""
    module = model.features
    outputs = [dihedral_mean(module, batch, views).numpy() for batch in _batches(images, prep, batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, int(model.feature_mean.shape[0])), np.float32)


@torch.inference_mode()
def head_outputs(model: nn.Module, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A frozen run's (logits, final-layer inputs) from pooled features, with its current standardisation."""
    logits = model.forward_head(torch.as_tensor(pooled, dtype=torch.float32)).numpy()
    return logits, head_inputs(model, pooled)


def final_outputs(model: nn.Module, images: np.ndarray, prep: Preprocessing, views: int,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Any run's (logits, final-layer inputs) of prepared images, as inference computes them."""
    forward = torch_forward(model, prep, views)
    outputs = [forward(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def lab_standardisation(pooled: np.ndarray, source_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lab's per-feature mean and standard deviation; a feature constant on the lab's cells keeps the source's scale."""
    mean = pooled.mean(axis=0)
    std = pooled.std(axis=0)
    return mean.astype(np.float32), np.where(std < 1e-6, source_std, std).astype(np.float32)


def set_standardisation(model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
    """Replace a frozen run's feature standardisation."""
    with torch.no_grad():
        model.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        model.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers (with running statistics)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: np.ndarray, prep: Preprocessing, views: int,
                    batch_size: int = 32) -> int:
    """AdaBN: every batch-norm layer's running statistics re-estimated on the lab's images.

    Each image is seen in each of the run's views (flips/rotations do not change its stain, and
    give the statistics more samples). The statistics are the plain average over the batches
    (``momentum=None``), so the order of the images does not matter.

    Returns:
        The number of batch-norm layers re-estimated (0: the model has none; nothing changed).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()  # only the batch-norm layers: dropout and the rest stay in eval mode
    try:
        for batch in _batches(images, prep, batch_size):
            for view in range(views):
                model(dihedral(batch, view))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return len(layers)


def minimise_entropy(logits_of: Callable[[np.ndarray], Tensor], parameters: list[Tensor], n: int, epochs: int,
                     temperature: float = 1.0, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Tune ``parameters`` so that predictions on the lab's cells are confident and diverse.

    The loss is the mean prediction entropy minus the entropy of the mean prediction (information
    maximisation): confidence alone would be met by giving every cell the same class.

    Args:
        logits_of: the logits of the cells at the given indices, differentiable in ``parameters``.
        parameters: what is tuned (the normalisation's affine part).
        n: number of cells.
        epochs: passes over the cells.

    Returns:
        The loss after each epoch.
    """
    optimizer = torch.optim.Adam(parameters, lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        total = 0.0
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            probs = F.softmax(logits_of(index) / temperature, dim=1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
            mean = probs.mean(0)
            diversity = -(mean * mean.clamp_min(1e-12).log()).sum()
            loss = entropy - diversity
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / max(n, 1))
    return losses


def frozen_entropy_parameters(model: nn.Module, pooled: np.ndarray) -> tuple[Callable[[np.ndarray], Tensor], list[Tensor],
                                                                           Callable[[], None]]:
    """For :func:`minimise_entropy` on a frozen run: its standardisation as trainable tensors.

    Returns:
        ``(logits_of, parameters, commit)``; ``commit()`` writes the tuned values into the model.
    """
    inputs = torch.as_tensor(pooled, dtype=torch.float32)
    mean = model.feature_mean.detach().clone().requires_grad_(True)
    log_std = model.feature_std.detach().clone().log().requires_grad_(True)
    head = model.head
    for parameter in head.parameters():
        parameter.requires_grad_(False)

    def logits_of(index: np.ndarray) -> Tensor:
        out: Tensor = head((inputs[index] - mean) / log_std.exp())
        return out

    def commit() -> None:
        set_standardisation(model, mean.detach().numpy(), log_std.detach().exp().numpy())

    return logits_of, [mean, log_std], commit


def batchnorm_entropy_parameters(model: nn.Module, images: np.ndarray, prep: Preprocessing
                                 ) -> tuple[Callable[[np.ndarray], Tensor], list[Tensor]]:
    """For :func:`minimise_entropy` on a fine-tuned run: its batch-norm scales and shifts (TENT)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters: list[Tensor] = []
    for layer in batchnorm_layers(model):
        for parameter in (layer.weight, layer.bias):
            if parameter is not None:
                parameter.requires_grad_(True)
                parameters.append(parameter)
    model.eval()  # the running statistics stay the lab's (from adapt_batchnorm)

    def logits_of(index: np.ndarray) -> Tensor:
        out: Tensor = model(normalize(images[index], prep))
        return out

    return logits_of, parameters
