"""Frozen-backbone features: computed once, cached on disk, fed to a small head.

For EfficientNet-style timm models the feature vector concatenates global-average-pooled
maps from several late stages and the final 1280-channel head. Mid-level stages carry the
texture and granule detail that separates white-cell types; the last stage alone is tuned
to ImageNet objects. Other backbones fall back to their pooled final features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hematovision.data.transforms import Preprocessing, dihedral_mean, normalize
from hematovision.models import create_model, get_model_info
from hematovision.paths import hematovision_home

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
# Stages of timm's EfficientNet whose pooled outputs join the final features (0-based block stages).
DEFAULT_TAPS = (2, 3, 4, 5)


class PooledFeatures(nn.Module):
    """A frozen backbone returning pooled multi-stage features, shape (N, D).

    Args:
        backbone: a timm EfficientNet (``conv_stem``/``blocks``/``conv_head``) or any timm model.
        taps: block-stage indices whose pooled outputs are concatenated before the final features.
        tap_std: also pool the spatial standard deviation of each tapped map. Granules and
            chromatin show up as texture, which a mean alone averages away.
    """

    def __init__(self, backbone: nn.Module, taps: Sequence[int] = DEFAULT_TAPS, tap_std: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.tap_std = tap_std
        self.is_efficientnet = all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"))
        self.taps = tuple(taps) if self.is_efficientnet else ()

    @property
    def gradcam_layer(self) -> nn.Module | None:
        """The module whose output is the last spatial feature map (Grad-CAM looks for this)."""
        return self.backbone.bn2 if self.is_efficientnet else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.is_efficientnet:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        backbone = self.backbone
        x = backbone.bn1(backbone.conv_stem(x))
        pooled = []
        for index, stage in enumerate(backbone.blocks):
            x = stage(x)
            if index in self.taps:
                pooled.append(x.mean(dim=(2, 3)))
                if self.tap_std:
                    pooled.append(x.std(dim=(2, 3), correction=0))  # finite for 1x1 maps too
        x = backbone.bn2(backbone.conv_head(x))
        pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    @property
    def num_features(self) -> int:
        with torch.no_grad():
            return int(self(torch.zeros(1, 3, 64, 64)).shape[1])


class ConcatFeatures(nn.Module):
    """Several frozen backbones side by side: each sees the input at its own native size.

    Args:
        branches: :class:`PooledFeatures` modules sharing one input normalisation.
        sizes: input side of each branch; the input is resized (bilinear) where it differs.
    """

    def __init__(self, branches: Sequence[PooledFeatures], sizes: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.sizes = [int(size) for size in sizes]

    @property
    def gradcam_layer(self) -> nn.Module | None:
        return self.branches[0].gradcam_layer

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for branch, size in zip(self.branches, self.sizes):
            view = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            outputs.append(branch(view))
        return torch.cat(outputs, dim=1)


def backbone_names(backbone: str) -> list[str]:
    """``"a+b"`` → ``["a", "b"]``: frozen mode can concatenate several backbones' features."""
    return [name.strip() for name in backbone.split("+") if name.strip()]


def frozen_input_spec(backbone: str) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) of a possibly combined frozen backbone: the largest native size."""
    infos = [get_model_info(name) for name in backbone_names(backbone)]
    if len({(info.mean, info.std) for info in infos}) > 1:
        raise ValueError(f"backbones in {backbone!r} normalise their inputs differently; combine ones that match")
    return max(info.input_size for info in infos), infos[0].mean, infos[0].std


def build_frozen_features(backbone: str, taps: Sequence[int], pretrained: bool) -> nn.Module:
    """The frozen feature module for one backbone name or a ``+``-joined combination."""
    names = backbone_names(backbone)
    branches = [PooledFeatures(create_model(name, num_classes=1000, pretrained=pretrained), taps) for name in names]
    if len(branches) == 1:
        return branches[0]
    return ConcatFeatures(branches, [get_model_info(name).input_size for name in names])


class FeatureExtractor:
    """Compute (and cache) frozen ImageNet features of images.

    Args:
        backbone: registry name of a model with ImageNet weights, or several joined by ``+``.
        image_size: input side in pixels.
        taps: extra stages to pool (EfficientNet only).
        tta: number of dihedral views (1, 2, 4 or 8) averaged per image; flips and 90° rotations
            do not change a cell's class, so averaging them steadies the features.
        batch_size: images per forward pass.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None,
                 taps: Sequence[int] = DEFAULT_TAPS, tta: int = 1, batch_size: int = 32) -> None:
        native_size, mean, std = frozen_input_spec(backbone)
        self.backbone_name = backbone
        self.prep = Preprocessing(image_size or native_size, mean, std)
        self.taps = tuple(taps)
        if tta not in (1, 2, 4, 8):
            raise ValueError(f"tta must be 1, 2, 4 or 8, got {tta}")
        self.tta = tta
        self.batch_size = batch_size
        self.module = build_frozen_features(backbone, self.taps, pretrained=True).eval().to(memory_format=torch.channels_last)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @property
    def config(self) -> dict:
        """What determines the features; part of every cache key and model card."""
        return {"backbone": self.backbone_name, "preprocessing": self.prep.to_dict(), "taps": list(self.taps), "tta": self.tta}

    @torch.inference_mode()
    def extract(self, images: np.ndarray | Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        """Features of RGB uint8 images (resized to ``image_size`` where needed): (N, D) float32."""
        from tqdm.auto import tqdm

        from hematovision.data.transforms import resize

        size = self.prep.image_size
        if not isinstance(images, np.ndarray) or images.shape[1:3] != (size, size):
            images = np.stack([resize(image, size) for image in images])
        outputs = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="features", unit="batch", disable=not progress):
            batch = normalize(images[start : start + self.batch_size], self.prep).contiguous(memory_format=torch.channels_last)
            outputs.append(dihedral_mean(self.module, batch, self.tta).numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, self.module.num_features), np.float32)

    def extract_cached(self, images: np.ndarray, file_hashes: Sequence[str], cache_dir: str | Path | None = None) -> np.ndarray:
        """Like :meth:`extract`, but each image's features are cached on disk by content and config.

        Args:
            images: (N, S, S, 3) uint8.
            file_hashes: a content hash per image (e.g. sha256 of the file).
            cache_dir: cache folder (default ``$HEMATOVISION_HOME/features``).
        """
        key = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(cache_dir) if cache_dir else hematovision_home() / "features" / key
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256("".join(file_hashes).encode()).hexdigest()[:24]
        path = folder / f"{digest}.npy"
        if path.exists():
            features = np.load(path)
            if len(features) == len(images):
                log.info("features loaded from cache %s", path)
                return features
        features = self.extract(images, progress=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, features)
        tmp.replace(path)
        return features
