"""One benchmark cell: a (model, fold) pair trained on the fold's training part and tested on the rest.

A paper's model trains with its recipe in the training loop of :mod:`hematovision.train.loop`
(fixed epochs, no validation); our row is fitted by the code of ``hematovision train --mode frozen``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from hematovision.bench.config import OURS, QUICK_SIZE, BenchConfig
from hematovision.bench.data import BenchData, ImageCache, per_pixel_stats, to_tensor
from hematovision.bench.encoders import fill_lite0_joint, fill_stores, frozen_encoder, store_for
from hematovision.bench.recipes import Recipe
from hematovision.data.folder import Sample, label_indices
from hematovision.data.splits import carve_validation
from hematovision.data.transforms import Preprocessing
from hematovision.evaluate.metrics import classification_metrics, fit_temperature, softmax
from hematovision.methods.augment import random_dihedral
from hematovision.methods.balance import balanced_indices
from hematovision.methods.checkerboard import checkerboard_augment
from hematovision.models import PretrainedUnavailableError, create_model, get_model_info
from hematovision.train.features import FeatureExtractor
from hematovision.train.frozen import fit_frozen_classifier
from hematovision.train.loop import Batch, predict, train_one_epoch

log = logging.getLogger(__name__)


@dataclass
class CellPlan:
    """Which samples a cell trains and tests on."""

    fold: str
    train_rows: np.ndarray
    tests: dict[str, np.ndarray]  # test name -> rows into the combined sample list


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


class HeadOnly(nn.Module):
    """``model.forward_head`` as a module, to train and run a model's head on cached encoder outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # nn.Module.__getattr__ is typed Tensor | Module; forward_head is a timm model method.
        forward_head = cast(Callable[[torch.Tensor], torch.Tensor], self.model.forward_head)
        return forward_head(features)


def fit(model: nn.Module, make_batch: Callable[[np.ndarray], torch.Tensor], labels: np.ndarray, recipe: Recipe,
        seed: int, desc: str = "training") -> list[float]:
    """Train ``model`` for ``recipe.epochs`` fixed epochs; no validation set is peeked at.

    Args:
        model: maps inputs to logits (a whole model, or :class:`HeadOnly`).
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
    optimizer = recipe.make_optimizer(p for p in model.parameters() if p.requires_grad)
    loss_fn = recipe.make_loss()
    targets = torch.as_tensor(labels, dtype=torch.long)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            inputs = make_batch(rows)
            if "rot_flip" in recipe.augment:
                inputs = random_dihedral(inputs, rng)
            yield inputs, targets[rows]

    history = []
    bar = tqdm(range(recipe.epochs), desc=desc, unit="epoch", leave=False)
    for _ in bar:
        order = balanced_indices(labels, rng) if "balance" in recipe.augment else rng.permutation(len(labels))
        history.append(train_one_epoch(model, batches(order), loss_fn, optimizer)["loss"])
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    model.eval()
    return history


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
    """The table's scores, taken from :func:`hematovision.evaluate.metrics.classification_metrics`.

    Accuracy, macro precision/recall/F1 over the classes present in ``y_true`` (a fold may lack a
    rare class), balanced accuracy and log loss.
    """
    metrics = classification_metrics(y_true, y_prob, [str(k) for k in range(num_classes)])
    return {"accuracy": metrics["accuracy"], "precision": metrics["macro_precision"],
            "recall": metrics["macro_recall"], "macro_f1": metrics["macro_f1"],
            "balanced_accuracy": metrics["balanced_accuracy"], "log_loss": metrics["log_loss"]}


def _test_scores(logits_of: Callable[[np.ndarray], np.ndarray], plan: CellPlan, labels: np.ndarray,
                 num_classes: int, temperature: float = 1.0) -> dict[str, dict]:
    # An SVM head's scores go through the softmax too.
    results = {}
    for test_name, rows in plan.tests.items():
        prob = softmax(logits_of(rows), temperature)
        results[test_name] = {**classification_scores(labels[rows], prob, num_classes), "n_test": len(rows)}
    return results


def _weights_tag(weights: str | None) -> str:
    return hashlib.sha256(weights.encode()).hexdigest()[:8] if weights else "none"


def _builder_accepts(name: str, keyword: str) -> bool:
    return keyword in inspect.signature(get_model_info(name).builder).parameters


def _encoded_inputs(encoder: nn.Module, base: str, recipe: Recipe, prep: Preprocessing, data: BenchData,
                    plan: CellPlan, keys: list[str], labels: np.ndarray, array: np.ndarray,
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
        store, _ = fill_lite0_joint(keys, array, recipe.input_size)  # shared with our method's pass
    else:
        store = store_for(f"{type(encoder).__name__}_{_weights_tag(info.weights)}_{recipe.input_size}_"
                          f"{recipe.preprocess}_{recipe.border_crop}")
        fill_stores([store], keys, array, encoder, recipe, prep, desc=f"{base} encoder")
    features = store.get(keys)
    inputs, fit_labels = [features[train_rows]], [labels[train_rows]]
    encode_s = store.seconds_per_row * len(train_rows)
    if "checkerboard" in recipe.augment:
        # Views are made for the whole training pool once (every fold reuses them); tests stay plain.
        pool = keys[: len(data.train)]
        for view in (0, 1):
            view_store = store_for(f"{store.folder.name}_cb{view}_{recipe.checkerboard_mode}")
            fill_stores([view_store], pool, array[: len(pool)], encoder, recipe, prep, view,
                        desc=f"checkerboard view {view}")
            inputs.append(view_store.get([keys[i] for i in train_rows]))
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
    encoder = frozen_encoder(model)
    encode_s = 0.0
    if encoder is not None:
        keys = [data.digests[sample.path] for sample in samples]
        features, train_inputs, fit_labels, encode_s = _encoded_inputs(
            encoder, base, recipe, prep, data, plan, keys, labels, array)
        trained: nn.Module = HeadOnly(model)

        def make_train(rows: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(train_inputs[rows].astype(np.float32))

        def make_test(rows: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(features[rows].astype(np.float32))
    else:
        train_images = array[train_rows]
        fit_labels = train_labels
        if "checkerboard" in recipe.augment:
            train_images, fit_labels = checkerboard_augment(train_images, train_labels, recipe.checkerboard_mode)
        trained = model

        def make_train(rows: np.ndarray) -> torch.Tensor:
            return to_tensor(train_images[rows], recipe, prep, stats)

        def make_test(rows: np.ndarray) -> torch.Tensor:
            return to_tensor(array[rows], recipe, prep, stats)

    start = time.perf_counter()
    history = fit(trained, make_train, fit_labels, recipe, config.seed, desc=f"{name} fold {plan.fold}")
    train_s = time.perf_counter() - start + encode_s

    def logits_of(rows: np.ndarray) -> np.ndarray:
        return predict(trained, (make_test(rows[first : first + 64]) for first in range(0, len(rows), 64)))

    results = _test_scores(logits_of, plan, labels, num_classes)
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
    """Our method, fitted by the code of ``hematovision train --mode frozen`` on the cached Lite0 features.

    As that command does with given training folders, a validation part (15%, stratified, whole
    origin groups) is carved out of the fold's training part; the class-balanced logistic-regression
    head is fitted on the rest with its C chosen on the validation part, which also calibrates the
    temperature of the reported probabilities.
    """
    from threadpoolctl import threadpool_limits

    size = QUICK_SIZE if config.quick else (config.image_size or 224)
    array = images.get(size)
    keys = [data.digests[sample.path] for sample in samples]
    extractor = FeatureExtractor("efficientnet_lite0", image_size=size)
    _, store = fill_lite0_joint(keys, array, size, extractor)
    features = store.get(keys).astype(np.float32)
    train_rows = plan.train_rows
    parts = np.array(carve_validation([samples[i].label for i in train_rows], [data.groups[i] for i in train_rows],
                                      seed=config.seed))
    fit_rows, val_rows = train_rows[parts == "train"], train_rows[parts == "val"]
    if len(val_rows) == 0:
        # Too few origin groups per class to carve a validation part (tiny smoke runs).
        log.warning("%s %s: no validation part could be carved; C is chosen on the training part", OURS, plan.fold)
        fit_rows = val_rows = train_rows
    num_classes = len(data.class_names)

    def head_logits(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return classifier.forward_head(torch.as_tensor(features[rows])).numpy()

    start = time.perf_counter()
    with threadpool_limits(config.threads):  # BLAS threads beyond the asked-for count only contend
        classifier, summary = fit_frozen_classifier(extractor.module, features[fit_rows], labels[fit_rows],
                                                    features[val_rows], labels[val_rows], num_classes,
                                                    head="logreg", seed=config.seed)
        temperature = fit_temperature(head_logits(val_rows), labels[val_rows])
    train_s = time.perf_counter() - start + store.seconds_per_row * len(train_rows)
    results = _test_scores(head_logits, plan, labels, num_classes, temperature)
    timing = array[next(iter(plan.tests.values()))[:64]]
    start = time.perf_counter()
    with torch.no_grad():
        classifier.forward_head(torch.as_tensor(extractor.extract(timing)))
    ms = 1000 * (time.perf_counter() - start) / max(1, len(timing))
    # The backbone's unused ImageNet classifier is not part of our model.
    unused = sum(p.numel() for p in getattr(extractor.module.backbone, "classifier", nn.Identity()).parameters())
    head_params = sum(p.numel() for p in classifier.head.parameters())
    return {
        "model": OURS, "fold": plan.fold, "paper": "ours", "pretrained": True, "init": "ImageNet",
        "recipe": {"backbone": "efficientnet_lite0", "input_size": size,
                   "head": "class-balanced logistic regression, C chosen on validation (hematovision train --mode frozen)",
                   "C": summary["C"], "temperature": temperature, "n_fit": len(fit_rows), "n_val": len(val_rows),
                   "features": extractor.config},
        "n_train": len(train_rows), "n_train_augmented": len(train_rows),
        "params": int(sum(p.numel() for p in classifier.parameters()) - unused), "trainable_params": int(head_params),
        "train_s": train_s, "encode_s": store.seconds_per_row * len(train_rows), "infer_ms": ms, "loss_history": [],
        "tests": results,
    }
