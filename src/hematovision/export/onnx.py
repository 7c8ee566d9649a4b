"""ONNX export with a dynamic batch axis, checked against PyTorch with ONNX Runtime.

The exported graph has two outputs: ``logits`` (N, K) and ``features`` (N, D), the
input of the final linear layer. The server uses the features for its
out-of-distribution score, so one pass gives both.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hematovision._io import atomic_write
from hematovision._optional import optional_import
from hematovision.errors import HematoVisionError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's final linear layer (the last ``nn.Linear`` in module order).

    Raises:
        HematoVisionError: the model has no linear layer.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise HematoVisionError(f"{type(model).__name__} has no final linear layer to take features from")
    return linears[-1]


class LogitsAndFeatures(nn.Module):
    """Wrap a classifier so that it returns ``(logits, features)``.

    ``features`` is the input of the final linear layer, captured with a forward hook, so
    any architecture works without knowing its internals.

    Args:
        model: classifier taking (N, 3, H, W) and returning logits (N, K).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._classifier = [classifier_layer(model)]  # a list: not registered as a second child

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        # The hook lives only for this call, so the wrapped model is left as it was.
        handle = self._classifier[0].register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise HematoVisionError("the final linear layer was not called in forward()")
        return logits, captured[-1].flatten(1)


def export_onnx(model: nn.Module, image_size: int, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (wrapped by :class:`LogitsAndFeatures`) as ONNX with a dynamic batch axis.

    Args:
        model: classifier in any mode (exported in eval mode).
        image_size: side of the square input.
        path: output ``.onnx`` file, written atomically.
        opset: ONNX opset version.
    """
    optional_import("onnx", "onnx")
    wrapped = LogitsAndFeatures(model).eval()
    example = torch.zeros(2, 3, image_size, image_size)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # The TorchScript exporter is the one that works without onnxscript; its deprecation
            # notice and tracer warnings (for TF-style "same" padding) say nothing about this export.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["logits", "features"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            )

    return atomic_write(path, write)


def onnx_session(path: str | Path, threads: int = 2) -> object:
    """An ONNX Runtime CPU session for ``path`` with ``threads`` intra-op threads."""
    ort = optional_import("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle worker threads sleep instead of spinning: on a 2-core machine the HTTP server, the
    # decoders and other processes need those cycles more than the next batch needs a fast start.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_torch(model: nn.Module, session: object, inputs: Tensor) -> dict[str, float]:
    """Max absolute difference between PyTorch and ONNX Runtime outputs on ``inputs``.

    Args:
        model: the PyTorch classifier.
        session: an ONNX Runtime session of its export.
        inputs: normalised images (N, 3, S, S).

    Returns:
        ``logits_max_abs_diff``, ``features_max_abs_diff``, ``prob_max_abs_diff`` and
        ``argmax_agreement`` (fraction of images with the same top class).
    """
    wrapped = LogitsAndFeatures(model).eval()
    with torch.inference_mode():
        logits, features = (t.numpy() for t in wrapped(inputs))
    onnx_logits, onnx_features = session.run(None, {"input": inputs.numpy()})  # type: ignore[attr-defined]
    return {
        "logits_max_abs_diff": float(np.abs(logits - onnx_logits).max()),
        "features_max_abs_diff": float(np.abs(features - onnx_features).max()),
        "prob_max_abs_diff": float(np.abs(_softmax(logits) - _softmax(onnx_logits)).max()),
        "argmax_agreement": float((logits.argmax(1) == onnx_logits.argmax(1)).mean()),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
