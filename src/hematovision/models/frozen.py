"""Frozen-backbone classifiers: pooled ImageNet features, standardised, then a small head.

For EfficientNet-style timm models the feature vector concatenates the pooled mean and
standard deviation of several mid-level stages with the final 1280-channel features.
Mid-level stages carry the texture and granule detail that separates white-cell types; the
last stage alone is tuned to ImageNet objects. Other backbones fall back to their pooled
final features.

The fitted head is folded into an ``nn.Module`` (standardisation included), so a frozen run
is one network like a fine-tuned one: prediction, export and Grad-CAM treat both alike.
Training (feature caching, fitting the head) lives in ``hematovision.train``; this module is
all that inference needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hematovision.models.registry import create_model, get_model_info

if TYPE_CHECKING:  # timm is imported where a backbone is built, not here
    from timm.models.efficientnet import EfficientNet

DEFAULT_BACKBONE = "efficientnet_lite0"
# Stages of timm's EfficientNet whose pooled outputs join the final features (0-based block stages).
DEFAULT_TAPS = (2, 3, 4, 5)


class _TimmModel(Protocol):
    """What every timm classifier offers: features, then the head (``pre_logits=True``: pooled, no classifier)."""

    def forward_features(self, x: Tensor) -> Tensor: ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor: ...


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
        return cast("EfficientNet", self.backbone).bn2 if self.is_efficientnet else None

    def forward(self, x: Tensor) -> Tensor:
        # The backbone is a plain nn.Module to the type checker; is_efficientnet says which API it has.
        if not self.is_efficientnet:
            model = cast(_TimmModel, self.backbone)
            return model.forward_head(model.forward_features(x), pre_logits=True)
        backbone = cast("EfficientNet", self.backbone)
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
        return cast(PooledFeatures, self.branches[0]).gradcam_layer

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for branch, size in zip(self.branches, self.sizes):
            view = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            outputs.append(branch(view))
        return torch.cat(outputs, dim=1)


def backbone_names(backbone: str) -> list[str]:
    """``"a+b"`` → ``["a", "b"]``: frozen mode can concatenate several backbones' features."""
    return [name.strip() for name in backbone.split("+") if name.strip()]


def frozen_input_spec(backbone: str) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """(input size, mean, std) of a possibly combined frozen backbone: the largest native size."""
    infos = [get_model_info(name) for name in backbone_names(backbone)]
    if len({(info.mean, info.std) for info in infos}) > 1:
        raise ValueError(f"backbones in {backbone!r} normalise their inputs differently; combine ones that match")
    return max(info.input_size for info in infos), infos[0].mean, infos[0].std


def build_frozen_features(backbone: str, taps: Sequence[int], pretrained: bool) -> PooledFeatures | ConcatFeatures:
    """The frozen feature module for one backbone name or a ``+``-joined combination."""
    names = backbone_names(backbone)
    branches = [PooledFeatures(create_model(name, num_classes=1000, pretrained=pretrained), taps) for name in names]
    if len(branches) == 1:
        return branches[0]
    return ConcatFeatures(branches, [get_model_info(name).input_size for name in names])



ROUTE_SCORE_CAP = 100.0  # squared standardised features capped at 10 standard deviations, as infer.shift.Z2_CAP


class LabRoutedLinear(nn.Linear):
    """A linear head that scores each image on the statistics of the training lab it comes from.

    A per-lab run (``train --lab-standardise``) fitted its head on each training lab's features
    standardised with that lab's own statistics, but an image arrives without its lab: the classifier
    standardises it with the labs' *average* (``feature_mean``/``feature_std``), which is none of
    them. This head takes those averaged features, and for each image measures on every training lab's
    statistics how typical it is (the mean squared standardised feature, capped as in the lab-shift
    score). When the best lab's score is within that lab's own limit (the 95th percentile of its
    training and validation images), the image is scored on that lab's statistics; otherwise (another
    lab) on the average, as before.

    It is the final linear layer itself, so that what the layer takes, the features the lab-shift
    score, the review policy and ``evaluate``'s lab standardisation read, stays the averaged
    standardisation: only the logits change.

    Buffers (``L`` training labs): ``lab_scale`` and ``lab_offset`` (L, D) map the averaged features to
    each lab's standardisation (``z_lab = z * scale + offset``); ``lab_limit`` (L,) each lab's limit.
    """

    lab_scale: Tensor
    lab_offset: Tensor
    lab_limit: Tensor

    def __init__(self, in_features: int, out_features: int, labs: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("lab_scale", torch.ones(labs, in_features))
        self.register_buffer("lab_offset", torch.zeros(labs, in_features))
        self.register_buffer("lab_limit", torch.zeros(labs))

    def lab_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The averaged features (N, D) on each lab's statistics, (N, L, D), and how typical each image
        is there, (N, L): its mean squared standardised feature, capped."""
        per_lab = x.unsqueeze(1) * self.lab_scale + self.lab_offset
        return per_lab, per_lab.square().clamp(max=ROUTE_SCORE_CAP).mean(dim=2)

    def routed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The features each image is scored on, (N, D), and which lab it was routed to, (N,) (-1: none)."""
        per_lab, scores = self.lab_scores(x)
        best = scores.argmin(dim=1)
        within = scores.gather(1, best[:, None])[:, 0] <= self.lab_limit[best]
        chosen = per_lab.gather(1, best[:, None, None].expand(-1, 1, x.shape[1]))[:, 0]
        return torch.where(within[:, None], chosen, x), torch.where(within, best, torch.full_like(best, -1))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.routed(x)[0], self.weight, self.bias)


def lab_routing(mean: Tensor, std: Tensor, lab_means: Tensor, lab_stds: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, offset), each (L, D), that turn features standardised with ``mean``/``std`` into each lab's."""
    return std / lab_stds, (mean - lab_means) / lab_stds


class FrozenClassifier(nn.Module):
    """Pooled features of a frozen backbone, standardised, then a linear or MLP head.

    Args:
        features: the :class:`PooledFeatures` module, or :class:`ConcatFeatures` of several.
        num_features: D, the feature size.
        num_classes: K.
        hidden: hidden width of an MLP head; 0 for a linear head.
        routed_labs: a linear head that routes each image to its training lab's statistics
            (:class:`LabRoutedLinear`) for this many labs; 0: a plain linear head.
    """

    # Registered buffers, declared so that they read as tensors (nn.Module.__getattr__ is typed Tensor | Module).
    feature_mean: Tensor
    feature_std: Tensor

    def __init__(self, features: PooledFeatures | ConcatFeatures, num_features: int, num_classes: int,
                 hidden: int = 0, routed_labs: int = 0) -> None:
        super().__init__()
        if hidden and routed_labs:
            raise ValueError("lab routing needs a linear head")
        self.features = features
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        if hidden:
            self.head: nn.Module = nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        elif routed_labs:
            self.head = LabRoutedLinear(num_features, num_classes, routed_labs)
        else:
            self.head = nn.Linear(num_features, num_classes)

    def drop_routing(self) -> bool:
        """Make a routed head a plain linear one with the same weights (its lab maps hold only for the
        standardisation they were fitted with); whether there was routing to drop."""
        if not isinstance(self.head, LabRoutedLinear):
            return False
        plain = nn.Linear(self.head.in_features, self.head.out_features)
        plain.load_state_dict({"weight": self.head.weight.detach(), "bias": self.head.bias.detach()})
        self.head = plain
        return True

    @property
    def gradcam_layer(self) -> nn.Module | None:
        """The last spatial feature map of the backbone, for Grad-CAM."""
        return self.features.gradcam_layer

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from already-extracted (N, D) features."""
        logits: Tensor = self.head((features - self.feature_mean) / self.feature_std)
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.features(x))
