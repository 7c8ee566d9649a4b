"""ONNX export with a dynamic batch axis, checked against PyTorch with ONNX Runtime.

The exported graph has two outputs: ``logits`` (N, K) and ``features`` (N, D), the
input of the final linear layer. The server uses the features for its
out-of-distribution score, so one pass gives both. The run's test-time views are part of
the graph (:class:`~hematovision.infer.runtime.LogitsAndFeatures`), so ONNX Runtime scores
an image exactly as the PyTorch predictor does.
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
from hematovision.evaluate.metrics import softmax
from hematovision.infer.runtime import LogitsAndFeatures

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def export_onnx(model: nn.Module, image_size: int, path: str | Path, opset: int = DEFAULT_OPSET,
                views: int = 1) -> Path:
    """Write ``model`` (wrapped by :class:`LogitsAndFeatures`) as ONNX with a dynamic batch axis.

    Args:
        model: classifier in any mode (exported in eval mode).
        image_size: side of the square input.
        path: output ``.onnx`` file, written atomically.
        opset: ONNX opset version.
        views: the run's test-time views, computed inside the graph.
    """
    optional_import("onnx", "onnx")
    wrapped = LogitsAndFeatures(model, views).eval()
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


def compare_with_torch(model: nn.Module, session: object, inputs: Tensor, views: int = 1) -> dict[str, float]:
    """Max absolute difference between PyTorch and ONNX Runtime outputs on ``inputs``.

    Args:
        model: the PyTorch classifier.
        session: an ONNX Runtime session of its export.
        inputs: normalised images (N, 3, S, S).
        views: the test-time views the export was made with.

    Returns:
        ``logits_max_abs_diff``, ``features_max_abs_diff``, ``prob_max_abs_diff`` and
        ``argmax_agreement`` (fraction of images with the same top class).
    """
    wrapped = LogitsAndFeatures(model, views).eval()
    with torch.inference_mode():
        logits, features = (t.numpy() for t in wrapped(inputs))
    onnx_logits, onnx_features = session.run(None, {"input": inputs.numpy()})  # type: ignore[attr-defined]
    return {
        "logits_max_abs_diff": float(np.abs(logits - onnx_logits).max()),
        "features_max_abs_diff": float(np.abs(features - onnx_features).max()),
        "prob_max_abs_diff": float(np.abs(softmax(logits) - softmax(onnx_logits)).max()),
        "argmax_agreement": float((logits.argmax(1) == onnx_logits.argmax(1)).mean()),
    }
