"""Model registry: ``create_model(name, num_classes, pretrained=...)`` and ``list_models()``."""

from hematovision.models.registry import (
    ModelInfo,
    PretrainedUnavailableError,
    create_model,
    get_model_info,
    list_models,
    register_model,
)

__all__ = [
    "ModelInfo",
    "PretrainedUnavailableError",
    "create_model",
    "get_model_info",
    "list_models",
    "register_model",
]
