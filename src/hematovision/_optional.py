"""Import optional dependencies only where they are used, with an install hint on failure."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependencyError(ImportError):
    """An optional dependency is needed for the feature that was asked for."""


def optional_import(module: str, extra: str) -> ModuleType:
    """Import ``module`` or explain which extra installs it.

    Args:
        module: dotted module name, e.g. ``"onnxruntime"``.
        extra: the package extra that provides it, e.g. ``"onnx"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'hematovision[{extra}]'"
        ) from error
