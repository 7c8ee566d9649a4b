"""Frozen pretrained encoders: their outputs computed once per image file and kept in feature stores.

Every store is a :class:`hematovision.train.features.FeatureStore` under
``$HEMATOVISION_HOME/bench_cache``, keyed by file content, so every fold, every run and every
dataset holding the same files reuses the rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from hematovision.bench.data import to_tensor
from hematovision.bench.recipes import Recipe
from hematovision.data.transforms import Preprocessing
from hematovision.methods.checkerboard import checkerboard_pair
from hematovision.paths import hematovision_home
from hematovision.train.features import FeatureExtractor, FeatureStore

Encoder = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]


def frozen_encoder(model: nn.Module) -> nn.Module | None:
    """``model.encoder`` if it is entirely frozen and the model has ``forward_head``, else ``None``.

    Such a model can be trained on cached encoder outputs.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(model, "forward_head"):
        return None
    parameters = list(encoder.parameters())
    return encoder if parameters and not any(p.requires_grad for p in parameters) else None


@torch.inference_mode()
def encode(encoder: Encoder, images: np.ndarray, recipe: Recipe, prep: Preprocessing, view: int | None = None,
           batch_size: int = 32, desc: str = "encoding") -> list[np.ndarray]:
    """Frozen encoder outputs of (N, S, S, 3) uint8 images, each output as float16 (N, ...).

    Args:
        encoder: a frozen module returning one tensor or a tuple of tensors.
        images: the images.
        recipe: gives the pre-processing.
        prep: the model's mean/std.
        view: ``None`` for the images themselves, 0 or 1 for their checkerboard images
            (made batch by batch, so no holed copy of the whole set is held).
    """
    from tqdm.auto import tqdm

    if isinstance(encoder, nn.Module):
        # channels-last convolutions run about 1.7x faster on CPU for EfficientNet.
        encoder = encoder.eval().to(memory_format=torch.channels_last)
    outputs: list[list[np.ndarray]] = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = images[start : start + batch_size]
        if view is not None:
            batch = np.stack([checkerboard_pair(image, recipe.checkerboard_mode)[view] for image in batch])
        result = encoder(to_tensor(batch, recipe, prep).contiguous(memory_format=torch.channels_last))
        parts = result if isinstance(result, tuple) else (result,)
        outputs.append([part.to(torch.float16).numpy() for part in parts])
    return [np.concatenate([batch[i] for batch in outputs]) for i in range(len(outputs[0]))] if outputs else []


def store_for(name: str) -> FeatureStore:
    """The feature store called ``name`` under ``$HEMATOVISION_HOME/bench_cache``."""
    return FeatureStore(hematovision_home() / "bench_cache" / name)


def fill_stores(stores: Sequence[FeatureStore], keys: Sequence[str], images: np.ndarray, encoder: Encoder,
                recipe: Recipe, prep: Preprocessing, view: int | None = None, desc: str = "encoding") -> None:
    """Compute what ``stores`` lack of the images with file digests ``keys`` (one output per store), in one pass."""
    todo = sorted(set().union(*(store.missing(keys) for store in stores)))
    if not todo:
        return
    start = time.perf_counter()
    outputs = encode(encoder, images[todo], recipe, prep, view, desc=f"{desc} ({len(todo)} images)")
    seconds = time.perf_counter() - start
    for store, output in zip(stores, outputs):
        # A joint pass may fill rows that one of its stores already has: add only the new ones.
        lacking = set(store.missing(keys))
        keep = [position for position, i in enumerate(todo) if i in lacking]
        store.add([keys[todo[position]] for position in keep], output[keep], seconds * len(keep) / len(todo))


class LiteJointPass(nn.Module):
    """One EfficientNet-Lite0 pass giving our pooled multi-stage features and the 320-channel map.

    Our method (:class:`hematovision.models.frozen.PooledFeatures`) and the Lite0-based paper
    models (:class:`hematovision.models.papers.LiteEncoder`) read the same pretrained network
    at the same input, so a hook on its last block stage serves both.
    """

    def __init__(self, pooled: nn.Module) -> None:
        super().__init__()
        self.pooled = pooled
        self._map: torch.Tensor | None = None
        # nn.Module.__getattr__ is typed Tensor | Module; a timm EfficientNet's blocks are a Sequential of stages.
        last_stage: nn.Module = cast(nn.Sequential, pooled.backbone.blocks)[-1]
        last_stage.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._map = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pooled(x)
        assert self._map is not None
        return features, self._map


def lite0_store_names(size: int, extractor_config: dict) -> tuple[str, str]:
    """Store names of the Lite0 map and of our pooled features at ``size`` px ("model" normalisation).

    Our features are named by the extractor's config, so a change in
    :mod:`hematovision.train.features` (taps, pooling) never mixes old and new vectors.
    """
    digest = hashlib.sha256(json.dumps(extractor_config, sort_keys=True).encode()).hexdigest()[:10]
    return f"lite0map_{size}_model", f"ours_lite0_{size}_{digest}"


def fill_lite0_joint(keys: Sequence[str], images: np.ndarray, size: int,
                     extractor: FeatureExtractor | None = None) -> tuple[FeatureStore, FeatureStore]:
    """Fill the Lite0 map store and our feature store together (one network pass per image).

    Args:
        keys: the file digest of each image.
        images: (N, size, size, 3) uint8.
        size: the input side.
        extractor: our feature extractor at ``size`` (built here if not given).
    """
    extractor = extractor or FeatureExtractor("efficientnet_lite0", image_size=size)
    config = {**extractor.config, "num_features": extractor.module.num_features}
    map_store, ours_store = (store_for(name) for name in lite0_store_names(size, config))
    if map_store.missing(keys) or ours_store.missing(keys):
        joint = LiteJointPass(extractor.module).eval()
        fill_stores([ours_store, map_store], keys, images, joint, Recipe(preprocess="model"),
                    extractor.prep, desc="Lite0 features")
    return map_store, ours_store
