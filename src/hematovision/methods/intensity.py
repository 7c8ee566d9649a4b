"""Intensity normalisation as SimpleITK does it (HematoVision paper's pre-processing).

SimpleITK is a large optional dependency, so its two usual filters are reproduced in
numpy, channel by channel (SimpleITK's filters take scalar images; an RGB image is
normalised per channel):

* ``"zscore"``: ``sitk.Normalize`` (NormalizeImageFilter): subtract the mean, divide by
  the standard deviation. ITK's StatisticsImageFilter uses the unbiased (n - 1) variance.
* ``"rescale"``: ``sitk.RescaleIntensity`` (RescaleIntensityImageFilter): map [min, max]
  linearly onto [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

METHODS = ("zscore", "rescale")


def normalize_intensity(images: np.ndarray, method: str = "zscore") -> np.ndarray:
    """Normalise each image and channel by its own statistics.

    Args:
        images: (H, W, C) or (N, H, W, C) array (any numeric dtype).
        method: ``"zscore"`` or ``"rescale"``.

    Returns:
        float32 array of the same shape. Constant channels become 0.
    """
    if method not in METHODS:
        raise ValueError(f"intensity method must be one of {METHODS}, got {method!r}")
    array = np.asarray(images, dtype=np.float64)
    axes = (-3, -2)  # the two spatial axes, per image and channel
    if method == "zscore":
        count = array.shape[-3] * array.shape[-2]
        mean = array.mean(axis=axes, keepdims=True)
        std = array.std(axis=axes, keepdims=True, ddof=1 if count > 1 else 0)
        out = (array - mean) / np.where(std > 0, std, 1.0)
    else:
        low = array.min(axis=axes, keepdims=True)
        span = array.max(axis=axes, keepdims=True) - low
        out = (array - low) / np.where(span > 0, span, 1.0)
    return out.astype(np.float32)


def intensity_tensor(images: np.ndarray, method: str = "zscore") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 tensor, intensity-normalised per image."""
    return torch.from_numpy(normalize_intensity(images, method)).permute(0, 3, 1, 2).contiguous()
