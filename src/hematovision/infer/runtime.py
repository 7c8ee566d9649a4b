"""The network at inference: (logits, features) in one pass, with the run's test-time views.

PyTorch, ONNX Runtime and OpenVINO give the same two outputs for the same uint8 images, so the
predictor, the export check, the review-policy calibration and the server all score a run
the way it was trained and calibrated: a frozen run averages its features over the card's
views before the head, a fine-tuned run averages its logits.

This module is the PyTorch side; the exported runtimes (ONNX Runtime, OpenVINO), which need no
torch, are :mod:`hematovision.infer.exported`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from hematovision.data.transforms import Preprocessing, dihedral_mean, normalize
from hematovision.errors import HematoVisionError
from hematovision.infer.exported import Forward


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final linear layer (the last ``nn.Linear`` in module order).

    Raises:
        HematoVisionError: the model has no linear layer.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise HematoVisionError(f"{type(model).__name__} has no final linear layer to take features from")
    return linears[-1]


def view_logits(model: nn.Module, batch: Tensor, views: int) -> Tensor:
    """Logits averaged over ``views`` dihedral views, the way the run was calibrated.

    A frozen classifier (one with ``features`` and ``forward_head``) averages its features
    before the head, as its head was fitted on averaged features; other models average logits.
    """
    if views > 1 and hasattr(model, "forward_head") and hasattr(model, "features"):
        # Found by duck typing; nn.Module.__getattr__ is typed Tensor | Module, so name what they are.
        features = cast(nn.Module, model.features)
        forward_head = cast(Callable[[Tensor], Tensor], model.forward_head)
        return forward_head(dihedral_mean(features, batch, views))
    return dihedral_mean(model, batch, views)


class LogitsAndFeatures(nn.Module):
    """Wrap a classifier so that it returns ``(logits, features)`` over the run's views.

    ``features`` is the input of the final linear layer, captured with a forward hook, so
    any architecture works without knowing its internals. With several views it is the
    mean over the views (for a frozen run, the head's one input of averaged features).

    Args:
        model: classifier taking (N, 3, H, W) and returning logits (N, K).
        views: dihedral views (1, 2, 4 or 8) averaged per image.
    """

    def __init__(self, model: nn.Module, views: int = 1) -> None:
        super().__init__()
        if views not in (1, 2, 4, 8):
            raise ValueError(f"views must be 1, 2, 4 or 8, got {views}")
        self.model = model
        self.views = views
        self._classifier = [classifier_layer(model)]  # a list: not registered as a second child

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        # The hook lives only for this call, so the wrapped model is left as it was.
        handle = self._classifier[0].register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            logits = view_logits(self.model, x, self.views)
        finally:
            handle.remove()
        if not captured:
            raise HematoVisionError("the final linear layer was not called in forward()")
        return logits, torch.stack([f.flatten(1) for f in captured]).mean(0)


def torch_forward(model: nn.Module, prep: Preprocessing, views: int = 1) -> Forward:
    """(N, S, S, 3) uint8 → (logits, features) with PyTorch."""
    wrapped = LogitsAndFeatures(model, views).eval()

    def forward(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, features = wrapped(normalize(np.ascontiguousarray(images), prep))
        return logits.numpy(), features.numpy()

    return forward
