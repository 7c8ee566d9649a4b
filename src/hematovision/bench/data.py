"""The benchmark's data: which samples, how they are split into folds or test sets, and their pixels."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hematovision.bench.config import BenchConfig
from hematovision.bench.recipes import Recipe
from hematovision.data.folder import ImageFolder, Sample, load_images
from hematovision.data.sources import scan_labelled
from hematovision.data.splits import content_groups, file_digests, kfold_assignment, read_group_csv
from hematovision.data.transforms import Preprocessing, normalize
from hematovision.errors import DatasetError, HematoVisionError
from hematovision.methods.intensity import intensity_tensor

log = logging.getLogger(__name__)


@dataclass
class BenchData:
    """The samples of a benchmark and how they are split.

    Attributes:
        class_names: sorted class names (the label order).
        train: the training pool (k-fold runs split it into folds).
        tests: named fixed test sets (empty for k-fold).
        folds: fold index per training sample (k-fold only).
        groups: origin group per training sample.
        key: a short hash naming this data (caches, result files).
        digests: the sha256 of every sample's file by path (the feature caches' keys).
    """

    class_names: list[str]
    train: list[Sample]
    tests: dict[str, list[Sample]]
    folds: list[int] | None
    groups: list[str]
    key: str
    digests: dict[Path, str]


def _groups_for(folder: ImageFolder, samples: Sequence[Sample], digests: Sequence[str],
                use_origin: bool = True) -> list[str]:
    # A dataset README may ship a file->origin table; look beside the data and one level up.
    candidates = (folder.root / "provenance_sift.csv", folder.root.parent / "provenance_sift.csv") if use_origin else ()
    for candidate in candidates:
        if candidate.is_file():
            log.info("grouping folds by origin from %s", candidate)
            return content_groups(samples, read_group_csv(candidate, "file", "source_original"), digests)
    return content_groups(samples, digests=digests)


def _limit(samples: list[Sample], per_class: int | None, seed: int) -> list[Sample]:
    if per_class is None:
        return samples
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    kept = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))[:per_class]
        kept += [members[i] for i in sorted(order)]
    return kept


def prepare_data(config: BenchConfig) -> BenchData:
    """Scan the folders, choose the split and group the samples.

    Raises:
        DatasetError: bad layout, unknown classes, or too few images for k folds.
    """
    folder = scan_labelled(config.data, config.classes)
    tests: dict[str, list[Sample]] = {}
    if folder.split_names:
        if "train" not in folder.split_names:
            raise DatasetError(f"{config.data}: a split layout needs a train split; found {folder.split_names}")
        train = folder.subset("train")
        if config.folds is None and not config.test_dirs:
            tests = {split: folder.subset(split) for split in folder.split_names if split != "train"}
    else:
        train = list(folder.samples)
    for test_dir in config.test_dirs:
        test_folder = scan_labelled(test_dir, config.classes)
        tests[Path(test_dir).name.lower()] = list(test_folder.samples)
    per_class = 24 if config.quick else config.limit_per_class
    train = _limit(train, per_class, config.seed)
    class_names = sorted({sample.label for sample in train})
    for name, samples in tests.items():
        unknown = {sample.label for sample in samples} - set(class_names)
        if unknown:
            raise DatasetError(f"test set {name!r} has classes {sorted(unknown)} that training lacks ({class_names})")
    everything = train + [s for name in sorted(tests) for s in tests[name]]
    digests = dict(zip((sample.path for sample in everything), file_digests(everything)))
    folds = None
    groups = _groups_for(folder, train, [digests[s.path] for s in train], use_origin=not config.ungrouped)
    if not tests:
        k = config.folds if config.folds is not None else 10
        if config.quick:
            k = min(k, 2)
        folds = kfold_assignment([sample.label for sample in train], groups, k, config.seed)
    digest = hashlib.sha256()
    for sample in everything:
        digest.update(f"{sample.path}|{sample.label}\n".encode())
    return BenchData(class_names, train, tests, folds, groups, digest.hexdigest()[:16], digests)


class ImageCache:
    """Decoded images of all samples at each size asked for, kept in memory once loaded.

    ``border_crop`` loads at a larger size and cuts the centre, which equals cropping the
    border of the original and resizing it (up to resampling).
    """

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)
        self._arrays: dict[tuple[int, float], np.ndarray] = {}

    def get(self, size: int, border_crop: float = 0.0) -> np.ndarray:
        """(N, size, size, 3) uint8 for all samples in order."""
        key = (size, round(border_crop, 4))
        if key not in self._arrays:
            load_size = round(size / (1 - 2 * border_crop)) if border_crop else size
            loaded = load_images(self.samples, load_size, desc=f"loading images at {load_size}px")
            if len(loaded.samples) != len(self.samples):
                bad = ", ".join(str(path) for path, _ in loaded.failures[:3])
                raise DatasetError(f"{len(loaded.failures)} image(s) could not be decoded, e.g. {bad}")
            array = loaded.images
            if border_crop:
                start = (load_size - size) // 2
                array = np.ascontiguousarray(array[:, start : start + size, start : start + size])
            self._arrays[key] = array
        return self._arrays[key]


def to_tensor(images: np.ndarray, recipe: Recipe, prep: Preprocessing,
              pixel_stats: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 model inputs, by the recipe's pre-processing.

    Args:
        images: the images.
        recipe: gives ``preprocess``.
        prep: the model's mean/std (for ``"model"``).
        pixel_stats: (mean image, std image), each (S, S, 3) float32, for ``"per_pixel"``.
    """
    if recipe.preprocess == "model":
        return normalize(images, prep)
    if recipe.preprocess == "intensity":
        return intensity_tensor(images, "zscore")
    if recipe.preprocess == "per_pixel":
        if pixel_stats is None:
            raise ValueError("per-pixel standardisation needs the training set's mean and std images")
        mean, std = pixel_stats
        return torch.from_numpy((images.astype(np.float32) - mean) / std).permute(0, 3, 1, 2).contiguous()
    raise HematoVisionError(f"unknown pre-processing {recipe.preprocess!r}; use model, intensity or per_pixel")


def per_pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std images, (S, S, 3) float32, of (N, S, S, 3) training images (BCCD paper)."""
    array = images.astype(np.float64)
    std = array.std(axis=0)
    return array.mean(axis=0).astype(np.float32), np.maximum(std, 1.0).astype(np.float32)  # 1 grey level floor
