"""Few-shot fine-tuning: the last stages of the backbone and a new head, trained on a lab's labelled cells.

A refitted final layer (:mod:`hematovision.adapt.head`) can only re-weigh what the source network
already computes; another lab's stain and optics change the features themselves. With 20 labelled
cells per class of Zheng's lab (leave-one-lab-out, docs/labs.md) a new linear head on frozen
ImageNet features reached balanced accuracy 0.80 at best, while training the last four stages of
EfficientNet-Lite0 together with a new head on the same cells reached 0.92. So the few-shot
adaptation also tries this, scored out-of-fold beside the head-only candidates, and keeps it only
when it wins there. The loop itself is :func:`hematovision.train.last_stages.fine_tune`.

The network starts from the source run's: a fine-tuned run's own weights; for a frozen run, its
few-shot start when it has one (``train --few-shot-start``: ImageNet's last stages already trained on
the run's training cells), else the ImageNet weights its features come from.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn

from hematovision.run import ModelCard
from hematovision.train.last_stages import STAGES, FineTuneSettings, can_finetune, fine_tune

__all__ = ["FOLDS", "MIN_CELLS", "STAGES", "VIEWS", "FineTuneSettings", "can_finetune", "fine_tune",
           "starting_network"]

MIN_CELLS = 12  # fewer labelled cells cannot train four stages; the head-only candidates stay
FOLDS = 3  # out-of-fold scoring costs a fit per fold: three, not the head's five
# Dihedral views a fine-tuned network averages when it scores (out-of-fold, and as the adapted run's
# ``tta``): it trained on random ones. On the rest of BCCD (20 cells per class, 3 draws) balanced
# accuracy rose by 0.013 in every draw and the confidence ranking sharpened; Zheng moved by -0.003
# (the network alone; docs/labs.md has these and the product's draws).
VIEWS = 8


def starting_network(card: ModelCard, model: nn.Module | None, run_dir: Path | None = None) -> tuple[nn.Module, str]:
    """The network a fine-tune starts from, and where it comes from in words (the adapted run's card says it).

    A fine-tuned run's own network; for a frozen run its few-shot start (``train --few-shot-start``:
    white-cell features, checked against the card's sha256) when it has one and ``run_dir`` is given,
    else ImageNet's (a frozen run's backbone *is* ImageNet's). In eval mode, like any loaded network: its
    batch-norm layers use their running statistics until a fine-tune says otherwise.
    """
    from hematovision.models import create_model
    from hematovision.run import FEW_SHOT_START_FILE, load_weights

    if card.mode == "finetune":
        assert model is not None, "a fine-tuned run starts from its own network"
        return copy.deepcopy(model).eval(), "the source run's weights"
    if card.few_shot_start is not None and run_dir is not None:
        network = create_model(card.backbone, num_classes=len(card.class_names), pretrained=False)
        load_weights(network, run_dir / FEW_SHOT_START_FILE, card.files.get(FEW_SHOT_START_FILE, {}).get("sha256"))
        return network.eval(), ("the source run's few-shot start (ImageNet weights whose last stages were "
                                "fine-tuned on its training cells)")
    imagenet = create_model(card.backbone, num_classes=len(card.class_names), pretrained=True)
    return imagenet.eval(), "ImageNet weights (the frozen run's backbone)"
