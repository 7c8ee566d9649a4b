"""Runtimes of an exported model: ONNX Runtime and OpenVINO, numpy in and numpy out, no torch.

``hematovision export`` writes the run's network with its test-time views and both outputs (logits
and the final layer's inputs) into ``model.onnx`` (and the OpenVINO IR), so scoring an exported run
needs only these runtimes, :meth:`~hematovision.data.transforms.Preprocessing.prepare` and
:func:`~hematovision.data.transforms.normalize_array`: ``predict`` and ``evaluate`` on an exported
backend never import torch (tests/infer/test_torch_free.py). The PyTorch side of the same two
outputs is :mod:`hematovision.infer.runtime`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hematovision._optional import optional_import
from hematovision.data.transforms import Preprocessing, normalize_array

#: (N, S, S, 3) uint8 prepared images → (logits (N, K), features (N, D)), whatever the runtime.
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

#: Images per model call, unless asked otherwise (``--batch-size``; the server's micro-batches are run in
#: calls of this size). On a CPU, images/s hardly changes beyond a few images per call (Lite0 at 224 px,
#: ONNX Runtime: 123 images/s at 1, 118 at 8, 114 at 32; docs/app.md), but activation memory grows with
#: the batch, and ONNX Runtime keeps its arena at the largest batch it has seen (+140 MB at 8 images,
#: +285 MB at 16, ~+570 MB at 32).
BATCH_SIZE = 8


def onnx_session(path: str | Path, threads: int = 2) -> Any:
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


def onnx_forward(session: Any, prep: Preprocessing) -> Forward:
    """(N, S, S, 3) uint8 → (logits, features) with ONNX Runtime (the views are in the exported graph)."""

    def forward(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = session.run(None, {"input": normalize_array(images, prep)})
        return logits, features

    return forward


#: OpenVINO's CPU performance hint. ``LATENCY`` (the CPU plugin's default) runs one inference request on
#: all its threads; ``THROUGHPUT`` splits the cores into streams that only pay off with several requests
#: in flight, and HematoVision sends one batch at a time (the predictor's loop, the server's one
#: inference thread), so a batch on every core is what gives it the most images/s.
OPENVINO_HINT = "LATENCY"


def openvino_model(path: str | Path, threads: int = 2, precision: str | None = None) -> Any:
    """An OpenVINO model (``model.xml``) compiled for the CPU with ``threads`` inference threads.

    Args:
        path: the IR written by ``hematovision export`` (``model.bin`` beside it).
        threads: inference threads (the predictor passes :func:`hematovision.threads.inference_threads`,
            PyTorch's count, which :mod:`hematovision.threads` chose from the idle cores, as for ONNX Runtime).
        precision: ``None`` for the plugin's default inference precision (bf16 on CPUs with
            AVX512-BF16 or AMX, f32 elsewhere), or ``"f32"`` to force full precision.
    """
    ov = optional_import("openvino", "openvino")
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": OPENVINO_HINT,
        "INFERENCE_NUM_THREADS": threads,
        # Unpinned threads: on a shared machine the scheduler can move them off a core another
        # program is using, where a pinned thread would wait for it (as ONNX Runtime's do not spin).
        "ENABLE_CPU_PINNING": False,
    }
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(str(path), "CPU", config)


def openvino_precision(compiled: Any) -> str:
    """The inference precision a compiled OpenVINO model really uses, e.g. ``bf16`` or ``f32``."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    # An openvino.Type: its name is "bf16"/"f32"; str() gives "<Type: 'bfloat16'>".
    return str(getattr(value, "to_string", lambda: value)())


def openvino_forward(compiled: Any, prep: Preprocessing) -> Forward:
    """(N, S, S, 3) uint8 → (logits, features) with OpenVINO (the views are in the graph, as for ONNX)."""
    request = compiled.create_infer_request()
    logits_port, features_port = compiled.output("logits"), compiled.output("features")
    # One infer request holds one batch's buffers: calls from two threads (the server's start-up check,
    # its inference thread) take turns rather than overwrite each other's inputs.
    lock = threading.Lock()

    def forward(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = normalize_array(images, prep)
        with lock:
            results = request.infer({"input": inputs})  # outputs are copied out (share_outputs=False)
        return np.asarray(results[logits_port]), np.asarray(results[features_port])

    return forward
