"""Frozen-backbone features for training: computed once, cached on disk, fed to a small head.

:class:`FeatureStore` is the one feature cache: ``hematovision train --mode frozen`` keeps its
features there (``$HEMATOVISION_HOME/features``), and the benchmark keeps its frozen encoders'
outputs there (``$HEMATOVISION_HOME/bench_cache``). The feature module itself (what is pooled,
and why) is ``hematovision.models.frozen``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hematovision._io import atomic_write, sha256_file, write_json
from hematovision.data.transforms import Preprocessing, dihedral_mean, normalize
from hematovision.models.frozen import DEFAULT_BACKBONE, DEFAULT_TAPS, build_frozen_features, frozen_input_spec
from hematovision.paths import hematovision_home
from hematovision.train.distributed import world

log = logging.getLogger(__name__)

# What a store's index is keyed by; stores written before it was recorded keyed by path|size|mtime.
_KEYS = "sha256"


class FeatureStore:
    """Features of image files on disk, one row per file, keyed by the file's sha256.

    One folder per feature configuration holds ``rows.npy`` (the rows, any shape after the first
    axis, any dtype), ``index.json`` (sha256 → row) and ``meta.json`` (seconds of computation per
    row, for timing tables). Keying by content lets a subset of a dataset (e.g. its five
    white-cell classes), a copy of it or another dataset with the same files reuse the rows.

    Args:
        folder: the store's folder (created at the first :meth:`add`).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path, meta_path = self.folder / "index.json", self.folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.index: dict[str, int] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        self.seconds_per_row = float(meta.get("seconds_per_row", 0.0))
        self._rows: np.ndarray | None = None
        if self.index and meta.get("keys") != _KEYS:
            self.index = _index_by_content(self.index)
            self._save_index()

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions in ``keys`` whose rows are not stored yet (the first position of a repeated key)."""
        seen: set[str] = set()
        positions = []
        for position, key in enumerate(keys):
            if key not in self.index and key not in seen:
                seen.add(key)
                positions.append(position)
        return positions

    def add(self, keys: Sequence[str], rows: np.ndarray, seconds: float, persist: bool = True) -> None:
        """Store ``rows`` (computed in ``seconds``) under ``keys`` and save atomically.

        Args:
            persist: write to disk; ``False`` keeps the rows in memory only (the ranks of a
                distributed run other than rank 0, which writes them).
        """
        if not len(keys):
            return
        existing = self.rows()
        self.index.update({key: len(existing) + i for i, key in enumerate(keys)})
        combined = np.concatenate([existing, rows]) if len(existing) else rows
        self.seconds_per_row = (len(existing) * self.seconds_per_row + seconds) / len(combined)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.save would append ".npy" to the name
                np.save(handle, combined)

        self._rows = combined
        if persist:
            atomic_write(self.folder / "rows.npy", save)
            self._save_index()

    def rows(self) -> np.ndarray:
        """All stored rows, in storage order."""
        if self._rows is None:
            path = self.folder / "rows.npy"
            self._rows = np.load(path) if path.is_file() else np.zeros((0,), np.float16)
        return self._rows

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The stored rows of ``keys``, in order (all must be present)."""
        return self.rows()[[self.index[key] for key in keys]]

    def _save_index(self) -> None:
        write_json(self.folder / "index.json", self.index)
        write_json(self.folder / "meta.json", {"seconds_per_row": self.seconds_per_row, "keys": _KEYS,
                                               "shape": list(self.rows().shape)})


def fill_store(store: FeatureStore, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray],
               chunk: int | None = None) -> np.ndarray:
    """The rows of ``keys``, computing the missing ones with ``compute(positions)``, a chunk at a time.

    Under ``torchrun`` the processes share the work: rank 0 says which rows are missing, each rank
    computes its contiguous slice of every chunk, and the slices are gathered in order, so every
    rank ends with the same rows one process would compute. Rank 0 alone writes the store; the
    others keep the new rows in memory (their copy of the store must already hold what rank 0's
    holds: ``$HEMATOVISION_HOME`` on one machine or on shared storage).

    Args:
        compute: positions in ``keys`` → their rows, (len(positions), ...); called with an empty
            list never.
        chunk: rows per chunk (``None``: all at once); each chunk is stored before the next.
    """
    current = world()
    todo = current.broadcast(store.missing(keys))
    step = chunk or max(1, len(todo))
    for start in range(0, len(todo), step):
        positions = todo[start : start + step]
        started = time.perf_counter()
        mine = [int(i) for i in current.shard(np.asarray(positions))]
        rows = compute(mine) if mine else None
        if current.distributed:
            rows = np.concatenate([part for part in current.gather(rows) if part is not None])
        assert rows is not None
        store.add([keys[i] for i in positions], rows, time.perf_counter() - started, persist=current.is_main)
    return store.get(keys)


def _index_by_content(index: dict[str, int]) -> dict[str, int]:
    # A store written before content keys: re-key each row by the sha256 of its file if the file is
    # still there unchanged (same size and modification time); rows of other files are dropped.
    by_content = {}
    for key, row in index.items():
        try:
            path, size, mtime_ns = key.rsplit("|", 2)
            stat = Path(path).stat()
            unchanged = (stat.st_size, stat.st_mtime_ns) == (int(size), int(mtime_ns))
        except (ValueError, OSError):
            continue
        if unchanged:
            by_content[sha256_file(path)] = row
    log.info("feature store re-keyed by file content: %d of %d rows kept", len(by_content), len(index))
    return by_content


class FeatureExtractor:
    """Compute (and cache) frozen ImageNet features of images.

    Args:
        backbone: registry name of a model with ImageNet weights, or several joined by ``+``.
        image_size: input side in pixels.
        taps: extra stages to pool (EfficientNet only).
        tta: number of dihedral views (1, 2, 4 or 8) averaged per image; flips and 90° rotations
            do not change a cell's class, so averaging them steadies the features.
        batch_size: images per forward pass.
        prep: the full preprocessing the images went through (scale and stain normalisation
            included), when it is more than the backbone's plain resize; it keys the cache.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, image_size: int | None = None,
                 taps: Sequence[int] = DEFAULT_TAPS, tta: int = 1, batch_size: int = 32,
                 prep: Preprocessing | None = None) -> None:
        native_size, mean, std = frozen_input_spec(backbone)
        self.backbone_name = backbone
        self.prep = prep or Preprocessing(image_size or native_size, mean, std)
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

    def store(self, cache_dir: str | Path | None = None) -> FeatureStore:
        """The feature store of this configuration (default ``$HEMATOVISION_HOME/features/<config hash>``)."""
        key = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]
        return FeatureStore(Path(cache_dir) if cache_dir else hematovision_home() / "features" / key)

    def extract_cached(self, images: np.ndarray, file_hashes: Sequence[str], cache_dir: str | Path | None = None) -> np.ndarray:
        """Like :meth:`extract`, but each image's features are cached on disk by file content and config.

        Args:
            images: (N, S, S, 3) uint8.
            file_hashes: the sha256 of each image's file.
            cache_dir: cache folder (default: see :meth:`store`).
        """
        store = self.store(cache_dir)
        if not store.missing(file_hashes):
            log.info("features loaded from cache %s", store.folder)
        return fill_store(store, file_hashes, lambda positions: self.extract(images[positions], progress=True))
