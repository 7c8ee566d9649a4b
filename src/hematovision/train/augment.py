"""Stain and optics robustness in training: the run's stain reference, and frozen mode's augmented copies.

Fine-tuning sees each training image with a new random stain and optics every epoch
(``TrainTransform(strong=True)``). Frozen mode computes each image's features once, so it cannot;
``--augment-copies K`` instead adds K augmented copies of every training image
(:func:`hematovision.data.stain.augment_stain`) whose features are cached like the originals'.
Each copy is seeded by its image's content, its number and the run's seed, so the same image
gets the same copies in any run with the same settings, and the cache can serve them again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hematovision.data.folder import Sample, load_images
from hematovision.data.stain import augment_stain, fit_stain_reference, normalize_stain
from hematovision.data.transforms import Preprocessing
from hematovision.errors import DatasetError
from hematovision.train.features import FeatureExtractor, fill_store

log = logging.getLogger(__name__)

# Names the augmentation in every copy's cache key and in the card: change it whenever
# augment_stain's output for a given seed changes, so that no stale copy is served from the cache.
AUGMENTATION = "hematovision.data.stain.augment_stain/1"
# Training images the stain reference is fitted on (a seeded sample; statistics settle long before).
STAIN_FIT_IMAGES = 200
# Augmented copies made and passed through the backbone at a time (bounds memory).
_CHUNK = 1024


def fit_training_stain(samples: Sequence[Sample], prep: Preprocessing, method: str, seed: int = 0) -> dict[str, Any]:
    """The stain reference of ``--stain-norm``, fitted on a seeded sample of the training images.

    The images are prepared as the model will see them (scale normalisation and resize), only
    without stain normalisation.

    Raises:
        DatasetError: the images give nothing to fit (all blank) or the method is unknown.
    """
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in sorted(rng.permutation(len(samples))[:STAIN_FIT_IMAGES])]
    loaded = load_images(chosen, replace(prep, stain=None), desc="stain reference")
    try:
        reference = fit_stain_reference(list(loaded.images), method, max_images=STAIN_FIT_IMAGES, seed=seed)
    except ValueError as error:
        raise DatasetError(f"--stain-norm {method}: {error}") from None
    log.info("stain reference (%s) fitted on %d training images: %s", method, len(loaded.images), reference)
    return reference


def augmented_copy(image: np.ndarray, digest: str, copy: int, strength: float, seed: int,
                   prep: Preprocessing) -> np.ndarray:
    """Copy number ``copy`` (1, 2, ...) of a prepared training image, seeded by its file's sha256.

    A run with stain normalisation sees every image normalised, so the copy is normalised again
    after its stain was changed: what stays is what normalisation cannot undo.
    """
    rng = np.random.default_rng([seed, copy, int(digest[:16], 16)])
    augmented = augment_stain(image, rng, strength)
    return normalize_stain(augmented, prep.stain) if prep.stain is not None else augmented


def copy_key(digest: str, copy: int, strength: float, seed: int) -> str:
    """A copy's key in the feature store: its image's sha256, the copy number and the augmentation settings."""
    return f"{digest}|copy={copy}|{AUGMENTATION}|strength={strength:g}|seed={seed}"


def augmented_copy_features(extractor: FeatureExtractor, images: np.ndarray, digests: Sequence[str], copies: int,
                            strength: float, seed: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """Features of ``copies`` augmented copies of each image: (copies * N, D), copy k of image i at row (k-1) * N + i.

    Copies already in the extractor's feature store are read from it; the others are made,
    passed through the backbone and stored, a chunk at a time.
    """
    n = len(images)
    keys = [copy_key(digests[i], copy, strength, seed) for copy in range(1, copies + 1) for i in range(n)]
    store = extractor.store(cache_dir)
    todo = store.missing(keys)
    if todo:
        log.info("%d augmented copies to compute (%d cached)", len(todo), len(keys) - len(todo))

    def compute(positions: list[int]) -> np.ndarray:
        batch = np.stack([augmented_copy(images[k % n], digests[k % n], k // n + 1, strength, seed, extractor.prep)
                          for k in positions])
        return extractor.extract(batch, progress=True)

    return fill_store(store, keys, compute, chunk=_CHUNK)


def copies_record(copies: int, strength: float, originals: int) -> dict[str, Any]:
    """What the card's ``data["augment_copies"]`` says about the copies the head was fitted on."""
    return {"copies": copies, "strength": strength, "augmentation": AUGMENTATION,
            "seeded_by": "file sha256, copy number and --seed", "parts": "train only (val and test untouched)",
            "train_rows": originals * (copies + 1)}
