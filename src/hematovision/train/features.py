"""Frozen-backbone features for training: computed once, cached on disk, fed to a small head.

The feature module itself (what is pooled, and why) is ``hematovision.models.frozen``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hematovision.data.transforms import Preprocessing, dihedral_mean, normalize
from hematovision.models.frozen import DEFAULT_BACKBONE, DEFAULT_TAPS, build_frozen_features, frozen_input_spec
from hematovision.paths import hematovision_home

log = logging.getLogger(__name__)

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
