"""Grad-CAM heat maps: where in the image the model looked for its answer.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the channels of a late convolutional
feature map by the mean gradient of the class score and keeps the positive part. The
feature map is found generically: a ``gradcam_layer`` attribute on the model (a module
or a dotted name) wins; otherwise it is the last module, in execution order, whose
output is a 4-D map larger than 1x1 (for timm's EfficientNet that is ``bn2``, the
activated ``conv_head`` output; for ``tiny_cnn`` it is ``features``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def find_target_layer(model: nn.Module, input_size: int = 64) -> nn.Module:
    """The module whose output Grad-CAM uses.

    A ``gradcam_layer`` attribute (module or dotted name) on the model or any submodule
    wins; otherwise a probe pass finds the last module with a spatial 4-D output.

    Args:
        model: an image classifier taking (N, 3, H, W).
        input_size: side of the probe image used to find the last spatial output.

    Raises:
        ValueError: the model has no 4-D output larger than 1x1 (not a CNN).
    """
    # A model (or a wrapped part of it, e.g. a frozen backbone) may name its layer itself.
    for module in model.modules():
        layer = getattr(module, "gradcam_layer", None)
        if isinstance(layer, nn.Module):
            return layer
        if isinstance(layer, str) and layer:
            return module.get_submodule(layer)
    seen: list[nn.Module] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] > 1 and output.shape[-2] > 1:
            seen.append(module)

    handles = [module.register_forward_hook(record) for module in model.modules() if module is not model]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no spatial feature map for Grad-CAM")
    return seen[-1]


class GradCAM:
    """Grad-CAM for a classifier; reusable across calls.

    Args:
        model: classifier taking normalised (N, 3, H, W) and returning logits (N, K).
        layer: the feature-map module; found with :func:`find_target_layer` when ``None``.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None) -> None:
        self.model = model
        self.layer = layer if layer is not None else find_target_layer(model)

    def __call__(self, inputs: Tensor, targets: list[int] | Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps for a batch.

        Args:
            inputs: normalised images (N, 3, H, W).
            targets: class index per image; the predicted class when ``None``.

        Returns:
            ``(cams, logits)``: heat maps (N, H, W) float32 in [0, 1] at the input size
            (all zeros where the class has no positive evidence), and the logits (N, K).
        """
        captured: dict[str, Tensor] = {}

        def keep(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            captured["maps"] = output
            # torch leaves Tensor.register_hook unannotated.
            output.register_hook(lambda grad: captured.__setitem__("grads", grad))  # type: ignore[no-untyped-call]

        handle = self.layer.register_forward_hook(keep)
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.enable_grad():
                inputs = inputs.detach().requires_grad_(True)  # gradients flow even if all weights are frozen
                logits = self.model(inputs)
                if targets is None:
                    targets = logits.argmax(dim=1)
                index = torch.as_tensor(targets, dtype=torch.long).view(-1, 1)
                # Images are independent in eval mode, so one backward gives every image its own gradient.
                logits.gather(1, index).sum().backward()
        finally:
            handle.remove()
            self.model.train(was_training)
            self.model.zero_grad(set_to_none=True)
        maps, grads = captured["maps"].detach(), captured["grads"].detach()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cams = torch.relu((weights * maps).sum(dim=1, keepdim=True))
        cams = nn.functional.interpolate(cams, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cams.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        return (cams / peak).numpy().astype(np.float32), logits.detach().numpy()


def jet(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] values (H, W) to RGB uint8 (H, W, 3) with the classic jet colour map."""
    v = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map over an image.

    Args:
        image: RGB uint8 (H, W, 3).
        cam: heat map (h, w) in [0, 1]; resized to the image when sizes differ.
        alpha: weight of the heat map colours.

    Returns:
        RGB uint8 (H, W, 3).
    """
    if cam.shape != image.shape[:2]:
        from PIL import Image

        resized = Image.fromarray(cam.astype(np.float32), mode="F").resize(
            (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
        )
        cam = np.asarray(resized)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * jet(cam).astype(np.float32)
    return blended.clip(0, 255).round().astype(np.uint8)
