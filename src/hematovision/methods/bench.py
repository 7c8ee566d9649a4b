"""``hematovision bench``: the papers' methods and ours, trained and tested on the same splits.

A *cell* is one (model, fold) pair: train on the fold's training part with the model's
paper recipe, test on the held-out part, save one JSON file. Finished cells are never
recomputed, so an interrupted benchmark continues where it stopped. The summary (CSV,
Markdown, PNG) is rebuilt from whatever cells exist.

Splits: stratified k-fold (grouped by the dataset's ``provenance_sift.csv`` origin when
present, and always by file content so byte-identical images stay together), or fixed
train/test folders. Pretrained CNN parts are frozen and their outputs computed once per
image and cached (``$HEMATOVISION_HOME/bench_cache``), so each cell trains only the heads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hematovision._io import write_json, write_text
from hematovision.data.folder import (
    ImageFolder,
    Sample,
    label_indices,
    load_images,
    scan_image_folder,
)
from hematovision.data.transforms import Preprocessing, normalize
from hematovision.errors import DatasetError, HematoVisionError
from hematovision.methods.augment import random_dihedral
from hematovision.methods.balance import balanced_indices
from hematovision.methods.checkerboard import checkerboard_augment, checkerboard_pair
from hematovision.methods.intensity import intensity_tensor
from hematovision.models import PretrainedUnavailableError, create_model, get_model_info
from hematovision.paths import hematovision_home

log = logging.getLogger(__name__)

# Our own method, benchmarked beside the papers': frozen multi-stage EfficientNet features
# (hematovision.train.features) and a multinomial logistic-regression head.
OURS = "hematovision_frozen"
# Recipe tweaks selectable as ``NAME@VARIANT`` in --models (e.g. the checkerboard ablation).
VARIANTS = {
    "noaug": {"augment": []},
    "paper_cb": {"checkerboard_mode": "paper"},
    "modelnorm": {"preprocess": "model"},
    "intensity": {"preprocess": "intensity"},
}
QUICK_SIZE = 32


@dataclass(frozen=True)
class Recipe:
    """How a paper trains its model (defaults come from ``ModelInfo.extra["recipe"]``).

    Attributes:
        paper: the source, for the tables.
        input_size: square input side in pixels.
        preprocess: ``"model"`` (the model's mean/std), ``"intensity"`` (per-image z-score,
            SimpleITK-style) or ``"per_pixel"`` (training set's mean and std images).
        border_crop: fraction cut from each side before resizing (W-Net).
        optimizer: ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"sgd"``.
        lr: learning rate.
        batch_size: minibatch size.
        epochs: passes over the (augmented) training set.
        loss: ``"ce"`` (softmax cross-entropy) or ``"hinge"`` (multi-class SVM).
        augment: names from :data:`hematovision.methods.augment.AUGMENTATIONS`.
        checkerboard_mode: ``"parity"`` or ``"paper"``.
    """

    paper: str = ""
    input_size: int = 224
    preprocess: str = "model"
    border_crop: float = 0.0
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    loss: str = "ce"
    augment: tuple[str, ...] = ()
    checkerboard_mode: str = "parity"

    @classmethod
    def for_model(cls, name: str, overrides: dict | None = None) -> Recipe:
        """The registered recipe of ``name`` (each ``@VARIANT`` suffix applies a variant), then ``overrides``."""
        base, *variants = name.split("@")
        try:
            info = get_model_info(base)
        except KeyError as error:
            raise HematoVisionError(error.args[0]) from None
        values = dict(info.extra.get("recipe", {}))
        values.setdefault("input_size", info.input_size)
        for variant in variants:
            if variant not in VARIANTS:
                raise HematoVisionError(f"unknown variant {variant!r} in {name!r}; known: {', '.join(VARIANTS)}")
            values.update(VARIANTS[variant])
        values.update({key: value for key, value in (overrides or {}).items() if value is not None})
        values["augment"] = tuple(values.get("augment", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class BenchConfig:
    """Everything that defines a benchmark run (saved as ``config.json``).

    Attributes:
        models: model names (``NAME`` or ``NAME@VARIANT``; ``hematovision_frozen`` is ours).
        data: training data folder (class layout, or split layout with a train split).
        out: output folder.
        folds: k for stratified (grouped) k-fold; ``None`` for a fixed split.
        test_dirs: fixed test folders (default for a split layout: its non-train splits).
        classes: keep only these classes.
        quick: smoke run: 32 px, 1 epoch, 2 folds, at most 24 training images per class.
        epochs: override every recipe's epochs.
        image_size: override every recipe's input size.
        random_init: train models without offline ImageNet weights from random initialisation
            (labelled ``random init``) instead of skipping them.
        seed: seed of the folds and of training.
        threads: torch CPU threads.
        limit_per_class: use at most this many training images per class (``None``: all).
        ungrouped: ignore the dataset's origin groups (only byte-identical files stay together);
            shows how much random re-splits of augmented images inflate accuracy.
    """

    models: list[str]
    data: Path
    out: Path
    folds: int | None = None
    test_dirs: list[Path] = field(default_factory=list)
    classes: list[str] | None = None
    quick: bool = False
    epochs: int | None = None
    image_size: int | None = None
    random_init: bool = False
    seed: int = 0
    threads: int = 2
    limit_per_class: int | None = None
    ungrouped: bool = False


# --------------------------------------------------------------------------- data


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
    """

    class_names: list[str]
    train: list[Sample]
    tests: dict[str, list[Sample]]
    folds: list[int] | None
    groups: list[str]
    key: str


def _groups_for(folder: ImageFolder, samples: Sequence[Sample], use_origin: bool = True) -> list[str]:
    from hematovision.data.splits import content_groups, read_group_csv

    # A dataset README may ship a file->origin table; look beside the data and one level up.
    candidates = (folder.root / "provenance_sift.csv", folder.root.parent / "provenance_sift.csv") if use_origin else ()
    for candidate in candidates:
        if candidate.is_file():
            log.info("grouping folds by origin from %s", candidate)
            return content_groups(samples, read_group_csv(candidate, "file", "source_original"))
    return content_groups(samples)


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
    folder = scan_image_folder(config.data, config.classes)
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
        test_folder = scan_image_folder(test_dir, config.classes)
        tests[Path(test_dir).name.lower()] = list(test_folder.samples)
    per_class = 24 if config.quick else config.limit_per_class
    train = _limit(train, per_class, config.seed)
    class_names = sorted({sample.label for sample in train})
    for name, samples in tests.items():
        unknown = {sample.label for sample in samples} - set(class_names)
        if unknown:
            raise DatasetError(f"test set {name!r} has classes {sorted(unknown)} that training lacks ({class_names})")
    folds = None
    groups = _groups_for(folder, train, use_origin=not config.ungrouped)
    if not tests:
        k = config.folds if config.folds is not None else 10
        if config.quick:
            k = min(k, 2)
        from hematovision.data.splits import kfold_assignment

        folds = kfold_assignment([sample.label for sample in train], groups, k, config.seed)
    digest = hashlib.sha256()
    for sample in train + [s for name in sorted(tests) for s in tests[name]]:
        digest.update(f"{sample.path}|{sample.label}\n".encode())
    return BenchData(class_names, train, tests, folds, groups, digest.hexdigest()[:16])


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


# --------------------------------------------------------------------------- inputs


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


def _frozen_encoder(model: nn.Module) -> nn.Module | None:
    # A model whose encoder is entirely frozen can be trained on cached encoder outputs.
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(model, "forward_head"):
        return None
    parameters = list(encoder.parameters())
    return encoder if parameters and not any(p.requires_grad for p in parameters) else None


@torch.inference_mode()
def encode(encoder: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], images: np.ndarray,
           recipe: Recipe, prep: Preprocessing, view: int | None = None, batch_size: int = 32,
           desc: str = "encoding") -> list[np.ndarray]:
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


class FeatureStore:
    """Encoder outputs per image file on disk: computed once, reused by every run and dataset.

    Files are identified by absolute path, size and modification time, so a subset of a
    dataset (e.g. its five white-cell classes) reuses the rows of the whole set.

    Args:
        folder: where ``index.json`` (file id -> row), ``rows.npy`` and ``meta.json`` live.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index_path = folder / "index.json"
        self.index: dict[str, int] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        meta_path = folder / "meta.json"
        self.seconds_per_row = float(json.loads(meta_path.read_text())["seconds_per_row"]) if meta_path.is_file() else 0.0
        self._rows: np.ndarray | None = None

    @staticmethod
    def file_id(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def missing(self, samples: Sequence[Sample]) -> list[int]:
        """Positions of ``samples`` whose outputs are not stored yet."""
        return [i for i, sample in enumerate(samples) if self.file_id(sample.path) not in self.index]

    def add(self, samples: Sequence[Sample], rows: np.ndarray, seconds: float) -> None:
        """Store the outputs of ``samples`` (computed in ``seconds``) and save atomically."""
        if not len(samples):
            return
        existing = self.rows()
        self.index.update({self.file_id(sample.path): len(existing) + i for i, sample in enumerate(samples)})
        combined = np.concatenate([existing, rows]) if len(existing) else rows
        total = len(existing) * self.seconds_per_row + seconds
        self.seconds_per_row = total / len(combined)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / ".rows.tmp.npy"
        np.save(tmp, combined)
        tmp.replace(self.folder / "rows.npy")
        write_json(self.folder / "index.json", self.index)
        write_json(self.folder / "meta.json", {"seconds_per_row": self.seconds_per_row, "shape": list(combined.shape)})
        self._rows = combined

    def rows(self) -> np.ndarray:
        if self._rows is None:
            path = self.folder / "rows.npy"
            self._rows = np.load(path) if path.is_file() else np.zeros((0,), np.float16)
        return self._rows

    def get(self, samples: Sequence[Sample]) -> np.ndarray:
        """The stored outputs of ``samples``, in order (all must be present)."""
        return self.rows()[[self.index[self.file_id(sample.path)] for sample in samples]]


def store_for(name: str) -> FeatureStore:
    """The feature store called ``name`` under ``$HEMATOVISION_HOME/bench_cache``."""
    return FeatureStore(hematovision_home() / "bench_cache" / name)


def fill_stores(stores: Sequence[FeatureStore], samples: Sequence[Sample], images: np.ndarray,
                encoder: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], recipe: Recipe,
                prep: Preprocessing, view: int | None = None, desc: str = "encoding") -> None:
    """Compute what ``stores`` lack for ``samples`` (one encoder output per store) in one pass."""
    todo = sorted(set().union(*(store.missing(samples) for store in stores)))
    if not todo:
        return
    start = time.perf_counter()
    outputs = encode(encoder, images[todo], recipe, prep, view, desc=f"{desc} ({len(todo)} images)")
    seconds = time.perf_counter() - start
    for store, output in zip(stores, outputs):
        # A joint pass may fill rows that one of its stores already has: add only the new ones.
        lacking = set(store.missing(samples))
        keep = [position for position, i in enumerate(todo) if i in lacking]
        store.add([samples[todo[position]] for position in keep], output[keep], seconds * len(keep) / len(todo))


class LiteJointPass(nn.Module):
    """One EfficientNet-Lite0 pass giving our pooled multi-stage features and the 320-channel map.

    Our method (:class:`hematovision.train.features.PooledFeatures`) and the Lite0-based paper
    models (:class:`hematovision.models.papers.LiteEncoder`) read the same pretrained network
    at the same input, so a hook on its last block stage serves both.
    """

    def __init__(self, pooled: nn.Module) -> None:
        super().__init__()
        self.pooled = pooled
        self._map: torch.Tensor | None = None
        pooled.backbone.blocks[-1].register_forward_hook(self._keep)

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


def fill_lite0_joint(samples: Sequence[Sample], images: np.ndarray, size: int) -> tuple[FeatureStore, FeatureStore]:
    """Fill the Lite0 map store and our feature store together (one network pass per image)."""
    from hematovision.models.backbones import LITE_MEAN, LITE_STD
    from hematovision.train.features import FeatureExtractor

    extractor = FeatureExtractor("efficientnet_lite0", image_size=size)
    config = {**extractor.config, "num_features": extractor.module.num_features}
    map_store, ours_store = (store_for(name) for name in lite0_store_names(size, config))
    if map_store.missing(samples) or ours_store.missing(samples):
        joint = LiteJointPass(extractor.module).eval()
        fill_stores([ours_store, map_store], samples, images, joint, Recipe(preprocess="model"),
                    Preprocessing(size, LITE_MEAN, LITE_STD), desc="Lite0 features")
    return map_store, ours_store


# --------------------------------------------------------------------------- training


def make_optimizer(parameters: Sequence[nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over the trainable parameters.

    Adam and AdamW use the fused kernel: the same update in one pass over the weights, which
    makes W-Net (16.8 M parameters, batches of 16) train about 1.5x faster on a CPU.
    """
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=recipe.lr, fused=True)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=0.05, fused=True)
    if recipe.optimizer == "rmsprop":
        # Keras' RMSprop defaults: rho 0.9, eps 1e-7.
        return torch.optim.RMSprop(parameters, lr=recipe.lr, alpha=0.9, eps=1e-7)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=recipe.lr, momentum=0.9)
    raise HematoVisionError(f"unknown optimizer {recipe.optimizer!r}")


def make_loss(recipe: Recipe) -> nn.Module:
    """Cross-entropy, or the multi-class hinge loss of an SVM head (Weston-Watkins, margin 1)."""
    if recipe.loss == "ce":
        return nn.CrossEntropyLoss()
    if recipe.loss == "hinge":
        return nn.MultiMarginLoss(margin=1.0)
    raise HematoVisionError(f"unknown loss {recipe.loss!r}")


def fit(forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, make_batch: Callable[[np.ndarray], torch.Tensor],
        labels: np.ndarray, recipe: Recipe, seed: int, desc: str = "training") -> list[float]:
    """Train ``model`` for ``recipe.epochs`` fixed epochs; no validation set is peeked at.

    Args:
        forward: inputs -> logits (``model`` or its ``forward_head``).
        model: owner of the trainable parameters.
        make_batch: (B,) row indices -> input tensor (pre-processed, not yet augmented).
        labels: (N,) integer labels of the rows.
        recipe: optimiser, loss, batch size, epochs, augmentations.
        seed: seeds shuffling, balancing, augmentation and dropout.

    Returns:
        Mean training loss per epoch.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, recipe)
    loss_fn = make_loss(recipe)
    targets = torch.as_tensor(labels, dtype=torch.long)
    history = []
    model.train()
    # Frozen parts keep their ImageNet batch-norm statistics.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
    bar = tqdm(range(recipe.epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        order = balanced_indices(labels, rng) if "balance" in recipe.augment else rng.permutation(len(labels))
        total, count = 0.0, 0
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            inputs = make_batch(rows)
            if "rot_flip" in recipe.augment:
                inputs = random_dihedral(inputs, rng)
            loss = loss_fn(forward(inputs), targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            count += len(rows)
        history.append(total / max(1, count))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    model.eval()
    return history


@torch.inference_mode()
def predict_proba(forward: Callable[[torch.Tensor], torch.Tensor], make_batch: Callable[[np.ndarray], torch.Tensor],
                  n: int, batch_size: int = 64) -> np.ndarray:
    """(n, K) softmax probabilities (an SVM head's scores go through the softmax too)."""
    outputs = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        outputs.append(torch.softmax(forward(make_batch(rows)).float(), dim=1).numpy())
    return np.concatenate(outputs)


@torch.inference_mode()
def inference_ms(model: nn.Module, inputs: torch.Tensor, batch_size: int = 32) -> float:
    """Milliseconds per image of the whole model (encoder included) on ``inputs``, after a warm-up."""
    model.eval()
    model(inputs[: min(len(inputs), 4)])
    start = time.perf_counter()
    for first in range(0, len(inputs), batch_size):
        model(inputs[first : first + batch_size])
    return 1000 * (time.perf_counter() - start) / max(1, len(inputs))


def classification_scores(y_true: np.ndarray, y_prob: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, balanced accuracy and log loss."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        log_loss,
        precision_recall_fscore_support,
    )

    y_pred = y_prob.argmax(1)
    labels = list(range(num_classes))
    present = sorted(set(y_true.tolist()))
    # Macro averages over the classes present in this test set (a fold may lack a rare class).
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro",
                                                               zero_division=0)
    clipped = np.clip(y_prob, 1e-7, 1.0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "macro_f1": float(f1),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)),
    }


# --------------------------------------------------------------------------- one cell


@dataclass
class CellPlan:
    """Which samples a cell trains and tests on."""

    fold: str
    train_rows: np.ndarray
    tests: dict[str, np.ndarray]  # test name -> rows into the combined sample list


def _weights_tag(weights: str | None) -> str:
    return hashlib.sha256(weights.encode()).hexdigest()[:8] if weights else "none"


def _builder_accepts(name: str, keyword: str) -> bool:
    return keyword in inspect.signature(get_model_info(name).builder).parameters


def _encoded_inputs(encoder: nn.Module, base: str, recipe: Recipe, prep: Preprocessing, data: BenchData,
                    plan: CellPlan, samples: list[Sample], labels: np.ndarray, array: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Cached frozen-encoder outputs for a cell.

    Returns:
        (outputs of all samples, training inputs incl. checkerboard views, their labels,
        encoder seconds charged to this cell's training images).
    """
    from hematovision.models.papers import LiteEncoder

    info = get_model_info(base)
    train_rows = plan.train_rows
    if isinstance(encoder, LiteEncoder) and recipe.preprocess == "model" and recipe.border_crop == 0:
        store, _ = fill_lite0_joint(samples, array, recipe.input_size)  # shared with our method's pass
    else:
        store = store_for(f"{type(encoder).__name__}_{_weights_tag(info.weights)}_{recipe.input_size}_"
                          f"{recipe.preprocess}_{recipe.border_crop}")
        fill_stores([store], samples, array, encoder, recipe, prep, desc=f"{base} encoder")
    features = store.get(samples)
    inputs, fit_labels = [features[train_rows]], [labels[train_rows]]
    encode_s = store.seconds_per_row * len(train_rows)
    if "checkerboard" in recipe.augment:
        # Views are made for the whole training pool once (every fold reuses them); tests stay plain.
        pool = [samples[i] for i in range(len(data.train))]
        for view in (0, 1):
            view_store = store_for(f"{store.folder.name}_cb{view}_{recipe.checkerboard_mode}")
            fill_stores([view_store], pool, array[: len(pool)], encoder, recipe, prep, view,
                        desc=f"checkerboard view {view}")
            inputs.append(view_store.get([samples[i] for i in train_rows]))
            fit_labels.append(labels[train_rows])
            encode_s += view_store.seconds_per_row * len(train_rows)
    return features, np.concatenate(inputs), np.concatenate(fit_labels), encode_s


def run_paper_cell(name: str, data: BenchData, plan: CellPlan, samples: list[Sample], labels: np.ndarray,
                   images: ImageCache, config: BenchConfig) -> dict:
    """Train and test one registered model on one split; returns the cell's result record."""
    base = name.partition("@")[0]
    info = get_model_info(base)
    overrides = {"epochs": 1 if config.quick else config.epochs,
                 "input_size": QUICK_SIZE if config.quick else config.image_size}
    recipe = Recipe.for_model(name, overrides)
    num_classes = len(data.class_names)
    pretrained = info.offline_weights
    if info.weights and not info.offline_weights:
        if not config.random_init:
            raise PretrainedUnavailableError(
                f"{base}: ImageNet weights ({info.weights}) are not available offline; "
                "pass --random-init to train it from random initialisation (reported as such)")
        pretrained = False
    kwargs = {"input_size": recipe.input_size} if _builder_accepts(base, "input_size") else {}
    torch.manual_seed(config.seed)
    model = create_model(base, num_classes, pretrained=pretrained, **kwargs)
    prep = Preprocessing(recipe.input_size, info.mean, info.std)
    array = images.get(recipe.input_size, recipe.border_crop)
    train_rows = plan.train_rows
    train_labels = labels[train_rows]
    stats = per_pixel_stats(array[train_rows]) if recipe.preprocess == "per_pixel" else None
    encoder = _frozen_encoder(model)
    encode_s = 0.0
    if encoder is not None:
        features, train_inputs, fit_labels, encode_s = _encoded_inputs(
            encoder, base, recipe, prep, data, plan, samples, labels, array)
        forward = model.forward_head

        def make_train(rows: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(train_inputs[rows].astype(np.float32))

        def make_test(rows: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(features[rows].astype(np.float32))
    else:
        train_images = array[train_rows]
        fit_labels = train_labels
        if "checkerboard" in recipe.augment:
            train_images, fit_labels = checkerboard_augment(train_images, train_labels, recipe.checkerboard_mode)
        forward = model

        def make_train(rows: np.ndarray) -> torch.Tensor:
            return to_tensor(train_images[rows], recipe, prep, stats)

        def make_test(rows: np.ndarray) -> torch.Tensor:
            return to_tensor(array[rows], recipe, prep, stats)

    start = time.perf_counter()
    history = fit(forward, model, make_train, fit_labels, recipe, config.seed, desc=f"{name} fold {plan.fold}")
    train_s = time.perf_counter() - start + encode_s
    results = {}
    for test_name, rows in plan.tests.items():
        prob = predict_proba(forward, lambda r, rows=rows: make_test(rows[r]), len(rows))
        results[test_name] = {**classification_scores(labels[rows], prob, num_classes), "n_test": len(rows)}
    timing_rows = next(iter(plan.tests.values()))[:64]
    ms = inference_ms(model, to_tensor(array[timing_rows], recipe, prep, stats))
    return {
        "model": name, "fold": plan.fold, "paper": recipe.paper, "pretrained": pretrained,
        "init": "ImageNet" if pretrained else ("random init" if info.weights else "from scratch"),
        "recipe": asdict(recipe), "n_train": len(train_rows), "n_train_augmented": len(fit_labels),
        "params": int(sum(p.numel() for p in model.parameters())),
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "train_s": train_s, "encode_s": encode_s, "infer_ms": ms, "loss_history": history, "tests": results,
    }


def run_ours_cell(data: BenchData, plan: CellPlan, samples: list[Sample], labels: np.ndarray,
                  images: ImageCache, config: BenchConfig) -> dict:
    """Our frozen-feature method: multi-stage EfficientNet-Lite0 features + logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hematovision.train.features import FeatureExtractor

    size = QUICK_SIZE if config.quick else (config.image_size or 224)
    array = images.get(size)
    _, store = fill_lite0_joint(samples, array, size)
    features = store.get(samples).astype(np.float32)
    per_row = store.seconds_per_row
    extractor = FeatureExtractor("efficientnet_lite0", image_size=size)
    train_rows = plan.train_rows
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1 if not config.quick else 1.0, tol=1e-3,
                                                              max_iter=1000))
    with threadpool_limits(config.threads):  # BLAS threads beyond the asked-for count only contend
        head.fit(features[train_rows], labels[train_rows])
    train_s = time.perf_counter() - start + per_row * len(train_rows)
    num_classes = len(data.class_names)
    results = {}
    for test_name, rows in plan.tests.items():
        prob = np.zeros((len(rows), num_classes))
        prob[:, head.classes_] = head.predict_proba(features[rows])
        results[test_name] = {**classification_scores(labels[rows], prob, num_classes), "n_test": len(rows)}
    timing = array[next(iter(plan.tests.values()))[:64]]
    start = time.perf_counter()
    head.predict_proba(extractor.extract(timing))
    ms = 1000 * (time.perf_counter() - start) / max(1, len(timing))
    # The backbone's unused ImageNet classifier is not part of our model.
    unused = sum(p.numel() for p in getattr(extractor.module.backbone, "classifier", nn.Identity()).parameters())
    params = sum(p.numel() for p in extractor.module.parameters()) - unused + head[-1].coef_.size + head[-1].intercept_.size
    return {
        "model": OURS, "fold": plan.fold, "paper": "ours", "pretrained": True, "init": "ImageNet",
        "recipe": {"backbone": "efficientnet_lite0", "input_size": size, "head": "logistic regression, C=0.1",
                   "features": extractor.config},
        "n_train": len(train_rows), "n_train_augmented": len(train_rows), "params": int(params),
        "trainable_params": int(head[-1].coef_.size + head[-1].intercept_.size),
        "train_s": train_s, "encode_s": per_row * len(train_rows), "infer_ms": ms, "loss_history": [], "tests": results,
    }


# --------------------------------------------------------------------------- the benchmark


def cell_path(out: Path, model: str, fold: str) -> Path:
    return out / "cells" / model.replace("@", "__") / f"{fold}.json"


def plan_cells(data: BenchData) -> tuple[list[Sample], np.ndarray, list[CellPlan]]:
    """All samples (train pool then test sets), their labels and one plan per fold or fixed split."""
    samples = list(data.train)
    test_rows = {}
    for name in sorted(data.tests):
        test_rows[name] = np.arange(len(samples), len(samples) + len(data.tests[name]))
        samples += data.tests[name]
    labels = label_indices(samples, data.class_names)
    if data.folds is None:
        return samples, labels, [CellPlan("fixed", np.arange(len(data.train)), test_rows)]
    folds = np.asarray(data.folds)
    plans = [CellPlan(f"fold{k}", np.flatnonzero(folds != k), {"cv": np.flatnonzero(folds == k)})
             for k in range(int(folds.max()) + 1)]
    return samples, labels, plans


def run_bench(config: BenchConfig, force: bool = False) -> list[dict]:
    """Run every missing (model, fold) cell, then write the summary; returns the summary rows."""
    torch.set_num_threads(max(1, min(config.threads, os.cpu_count() or 1)))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in config.models:
        if name.partition("@")[0] != OURS:
            Recipe.for_model(name)  # unknown names and variants fail before any work
    data = prepare_data(config)
    samples, labels, plans = plan_cells(data)
    from hematovision.data.splits import write_split_csv

    parts = [*(f"fold{f}" for f in data.folds)] if data.folds is not None else ["train"] * len(data.train)
    parts += [name for name in sorted(data.tests) for _ in data.tests[name]]
    write_split_csv(out / "split.csv", samples, parts, data.groups + [""] * (len(samples) - len(data.train)))
    write_json(out / "config.json", {**asdict(config), "class_names": data.class_names, "data_key": data.key,
                                     "n_train_pool": len(data.train), "tests": {k: len(v) for k, v in data.tests.items()}})
    images = ImageCache(samples)
    for name in config.models:
        for plan in plans:
            path = cell_path(out, name, plan.fold)
            # Skipped cells (weights unavailable) are tried again: --random-init or a network may help now.
            if path.is_file() and not force and "skipped" not in json.loads(path.read_text()):
                continue
            log.info("bench: %s %s", name, plan.fold)
            try:
                if name == OURS:
                    record = run_ours_cell(data, plan, samples, labels, images, config)
                else:
                    record = run_paper_cell(name, data, plan, samples, labels, images, config)
            except PretrainedUnavailableError as error:
                log.warning("skipping %s: %s", name, error)
                record = {"model": name, "fold": plan.fold, "skipped": str(error)}
            record["class_names"] = data.class_names
            write_json(path, record)
    rows = summarize(out, config.models)
    write_summary(out, rows, config)
    return rows


def summarize(out: Path, models: Sequence[str] | None = None) -> list[dict]:
    """One row per (model, test set): mean and std over the finished folds."""
    records: dict[tuple[str, str], list[dict]] = defaultdict(list)
    skipped: dict[str, str] = {}
    order: list[str] = list(models or [])
    for path in sorted((out / "cells").glob("*/*.json")):
        record = json.loads(path.read_text())
        if record["model"] not in order:
            order.append(record["model"])
        if "skipped" in record:
            skipped[record["model"]] = record["skipped"]
            continue
        for test_name, scores in record["tests"].items():
            records[(record["model"], test_name)].append({**record, **scores})
    rows = []
    for model in order:
        if model in skipped and not any(key[0] == model for key in records):
            rows.append({"model": model, "test": "-", "skipped": skipped[model]})
        for (name, test_name), cells in sorted(records.items()):
            if name != model:
                continue
            row = {"model": model, "test": test_name, "paper": cells[0].get("paper", ""), "init": cells[0].get("init", ""),
                   "folds_done": len(cells), "n_test": sum(c["n_test"] for c in cells)}
            for metric in ("accuracy", "precision", "recall", "macro_f1", "balanced_accuracy", "log_loss"):
                values = np.array([c[metric] for c in cells])
                row[metric] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            for key in ("params", "trainable_params", "train_s", "infer_ms", "n_train_augmented"):
                row[key] = float(np.mean([c[key] for c in cells]))
            rows.append(row)
    return rows


def _fmt(row: dict, metric: str) -> str:
    value = 100 * row[metric]
    return f"{value:.2f} ± {100 * row[metric + '_std']:.2f}" if row["folds_done"] > 1 else f"{value:.2f}"


def summary_markdown(rows: Sequence[dict], title: str = "") -> str:
    """The summary as a Markdown table (percentages; ± is the std over folds)."""
    lines = [f"### {title}", ""] if title else []
    header = ("| model | init | test | folds | accuracy % | precision % | recall % | macro-F1 % | log loss | params | "
              "train s | ms/img |")
    lines += [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | not run | - | 0 | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | {row['init']} | {row['test']} | {row['folds_done']} | {_fmt(row, 'accuracy')} | "
            f"{_fmt(row, 'precision')} | {_fmt(row, 'recall')} | {_fmt(row, 'macro_f1')} | {row['log_loss']:.3f} | "
            f"{row['params'] / 1e6:.2f} M | {row['train_s']:.0f} | {row['infer_ms']:.1f} |")
    notes = [f"- {row['model']}: {row['skipped']}" for row in rows if "skipped" in row]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_summary(out: Path, rows: Sequence[dict], config: BenchConfig | None = None) -> None:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out``."""
    import csv
    import io

    columns = ["model", "test", "paper", "init", "folds_done", "n_test", "accuracy", "accuracy_std", "precision",
               "precision_std", "recall", "recall_std", "macro_f1", "macro_f1_std", "balanced_accuracy",
               "balanced_accuracy_std", "log_loss", "log_loss_std", "params", "trainable_params", "train_s",
               "infer_ms", "n_train_augmented", "skipped"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(out / "results.csv", buffer.getvalue())
    title = f"{config.data}" if config else ""
    write_text(out / "results.md", summary_markdown(rows, title))
    done = [row for row in rows if "skipped" not in row]
    if done:
        _plot(out / "results.png", done)


def _plot(path: Path, rows: Sequence[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hematovision._io import atomic_write

    labels = [f"{row['model']} ({row['test']})" for row in rows]
    figure, axis = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    axis.barh(range(len(rows)), [100 * row["macro_f1"] for row in rows],
              xerr=[100 * row["macro_f1_std"] for row in rows], color="#4c72b0")
    axis.set_yticks(range(len(rows)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("macro-F1 % (mean ± std over folds)")
    axis.set_xlim(0, 100)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


__all__ = ["OURS", "VARIANTS", "BenchConfig", "Recipe", "classification_scores", "run_bench", "summarize",
           "summary_markdown"]
