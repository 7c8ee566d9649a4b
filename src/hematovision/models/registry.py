"""Models by name: ``@register_model`` builders, ``create_model`` and ``list_models``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hematovision.errors import HematoVisionError

# ImageNet statistics (torchvision/timm default); EfficientNet-Lite uses 0.5/0.5 instead.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(HematoVisionError, KeyError):
    """No model is registered under the name asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PretrainedUnavailableError(HematoVisionError, RuntimeError):
    """ImageNet weights were asked for but cannot be loaded (offline, or none exist)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model expects and where its pretrained weights come from.

    Attributes:
        name: registry name.
        builder: ``builder(num_classes, pretrained, **kwargs) -> nn.Module``.
        input_size: native square input side in pixels.
        mean: per-channel normalisation mean for RGB in [0, 1].
        std: per-channel normalisation std.
        weights: human-readable source of the pretrained weights, or ``None`` if there are none.
        offline_weights: whether the pretrained weights load without a network.
        family: a short tag (``"backbone"``, ``"paper"``, ``"test"``) for listings.
        description: one line for ``hematovision models``.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str | None = None
    offline_weights: bool = False
    family: str = "backbone"
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str | None = None, **info: object
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` (default: the function name).

    Keyword arguments fill :class:`ModelInfo`. Registering a name twice is an error.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        description = info.pop("description", None) or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[key] = ModelInfo(name=key, builder=builder, description=str(description), **info)  # type: ignore[arg-type]
        return builder

    return decorator


def _ensure_builtin_models() -> None:
    # Importing these modules runs their @register_model decorators.
    from hematovision.models import backbones, tiny  # noqa: F401

    # The papers' models live in their own module, added by the methods work.
    try:
        importlib.import_module("hematovision.models.papers")
    except ModuleNotFoundError as error:
        if error.name != "hematovision.models.papers":
            raise


def list_models(family: str | None = None) -> list[str]:
    """Names of the registered models, sorted; optionally only one ``family``."""
    _ensure_builtin_models()
    return sorted(name for name, info in _REGISTRY.items() if family in (None, info.family))


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` for ``name``; raises :class:`UnknownModelError` (a ``KeyError``) listing known names."""
    _ensure_builtin_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs: object) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classification output.
        pretrained: load ImageNet weights for the backbone. Raises
            :class:`PretrainedUnavailableError` when they cannot be had, never
            falling back to random weights silently.
        **kwargs: builder-specific options; ``None`` values are dropped.
    """
    info = get_model_info(name)
    options = {key: value for key, value in kwargs.items() if value is not None}
    model = info.builder(num_classes=num_classes, pretrained=pretrained, **options)
    model.hv_model_name = name  # type: ignore[assignment]
    model.hv_pretrained = bool(pretrained)  # type: ignore[assignment]
    return model
