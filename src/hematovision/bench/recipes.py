"""How each paper trains its model: the :class:`Recipe` per registered model name, and its variants.

The recipes live here, not in the model registry: a registered model is an architecture (and its
pretrained weights); how the benchmark trains it is the benchmark's business. ``docs/methods.md``
lists each paper's settings beside these and every deviation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hematovision.errors import HematoVisionError
from hematovision.models import get_model_info
from hematovision.train.optim import LossFn, make_loss, make_optimizer

_WNET = {
    "paper": "W-Net", "input_size": 128, "border_crop": 0.1, "preprocess": "model",
    "optimizer": "adam", "lr": 1e-4, "batch_size": 16, "epochs": 30, "loss": "ce", "augment": [],
}
_CNN_RNN = {
    "paper": "CNN-RNN", "input_size": 224, "preprocess": "model", "optimizer": "adam", "lr": 1e-4,
    "batch_size": 32, "epochs": 20, "loss": "ce", "augment": ["rot_flip", "balance"],
}
_TRANSFER = {
    "paper": "HematoVision (VGG19)", "input_size": 224, "preprocess": "intensity", "optimizer": "adam",
    "lr": 1e-4, "batch_size": 32, "epochs": 20, "loss": "ce", "augment": ["checkerboard"],
}

# The papers' training recipes by registered model name (the fields of :class:`Recipe`).
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "wnet": _WNET,
    "wnet_svm": {**_WNET, "paper": "W-Net", "loss": "hinge"},
    "cnn_bccd": {
        "paper": "Simple CNN (BCCD)", "input_size": 128, "preprocess": "per_pixel",
        "optimizer": "rmsprop", "lr": 1e-3, "batch_size": 32, "epochs": 30, "loss": "ce", "augment": [],
    },
    "rnn_rows": {
        "paper": "W-Net (RNN baseline)", "input_size": 128, "preprocess": "model",
        "optimizer": "adam", "lr": 1e-3, "batch_size": 32, "epochs": 30, "loss": "ce", "augment": [],
    },
    "cnn_lstm": _CNN_RNN,
    "cnn_gru": _CNN_RNN,
    "vgg19_transfer": _TRANSFER,
    "lite0_transfer": {**_TRANSFER, "paper": "HematoVision recipe on Lite0"},
    "alexnet": {
        "paper": "W-Net (AlexNet baseline)", "input_size": 224, "preprocess": "model",
        "optimizer": "adam", "lr": 1e-4, "batch_size": 32, "epochs": 30, "loss": "ce", "augment": [],
    },
}

# Recipe tweaks selectable as ``NAME@VARIANT`` in --models (e.g. the checkerboard ablation).
VARIANTS: dict[str, dict[str, Any]] = {
    "noaug": {"augment": []},
    "paper_cb": {"checkerboard_mode": "paper"},
    "modelnorm": {"preprocess": "model"},
    "intensity": {"preprocess": "intensity"},
}

# Recipe.loss → loss names of hematovision.train.optim. A recipe's "hinge" is the W-Net-SVM's
# Weston-Watkins loss (torch's MultiMarginLoss), not the Crammer-Singer loss of FinetuneConfig.
RECIPE_LOSSES = {"ce": "cross_entropy", "hinge": "weston_watkins_hinge"}
# The papers' (Keras-era) optimizer settings: Keras' RMSprop constants (rho 0.9, eps 1e-7), plain
# momentum SGD, weight decay only for AdamW, and Adam's fused kernel (1.5x faster for W-Net on a CPU).
RECIPE_WEIGHT_DECAY = {"adamw": 0.05}


@dataclass(frozen=True)
class Recipe:
    """How a paper trains its model (defaults come from :data:`PAPER_RECIPES`).

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
        loss: ``"ce"`` (softmax cross-entropy) or ``"hinge"`` (multi-class SVM, Weston-Watkins).
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
        """The recipe of ``name`` (each ``@VARIANT`` suffix applies a variant), then ``overrides``.

        A registered model without a paper recipe gets the defaults at its native input size.
        """
        base, *variants = name.split("@")
        try:
            info = get_model_info(base)
        except KeyError as error:
            raise HematoVisionError(error.args[0]) from None
        values: dict[str, Any] = dict(PAPER_RECIPES.get(base, {}))
        values.setdefault("input_size", info.input_size)
        for variant in variants:
            if variant not in VARIANTS:
                raise HematoVisionError(f"unknown variant {variant!r} in {name!r}; known: {', '.join(VARIANTS)}")
            values.update(VARIANTS[variant])
        values.update({key: value for key, value in (overrides or {}).items() if value is not None})
        values["augment"] = tuple(values.get("augment", ()))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})

    def make_optimizer(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The recipe's optimizer over the trainable ``parameters``."""
        return make_optimizer(parameters, self.optimizer, lr=self.lr,
                              weight_decay=RECIPE_WEIGHT_DECAY.get(self.optimizer, 0.0), sgd_nesterov=False,
                              rmsprop_alpha=0.9, rmsprop_eps=1e-7, fused=True)

    def make_loss(self) -> LossFn:
        """The recipe's loss: cross-entropy, or the Weston-Watkins hinge loss of an SVM head."""
        if self.loss not in RECIPE_LOSSES:
            raise HematoVisionError(f"unknown loss {self.loss!r}")
        return make_loss(RECIPE_LOSSES[self.loss])
