"""Static INT8 quantisation of the ONNX model (QDQ, per-channel weights) with ONNX Runtime.

Activations are calibrated on training images; the accuracy change is measured on the
run's test split by :func:`compare_accuracy`, never assumed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hematovision._io import atomic_write
from hematovision._optional import optional_import
from hematovision.data.transforms import Preprocessing, normalize

log = logging.getLogger(__name__)


def quantize_int8(onnx_path: str | Path, out_path: str | Path, calibration_images: np.ndarray,
                  prep: Preprocessing, batch_size: int = 8) -> Path:
    """Write an INT8 copy of ``onnx_path``.

    Args:
        onnx_path: the float32 model from :func:`hematovision.export.onnx.export_onnx`.
        out_path: where the INT8 model goes (atomically).
        calibration_images: (N, S, S, 3) uint8 training images for the activation ranges.
        prep: the model's preprocessing.
        batch_size: calibration batch size.
    """
    optional_import("onnxruntime", "onnx")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (
                normalize(calibration_images[i:i + batch_size], prep).numpy()
                for i in range(0, len(calibration_images), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "pre.onnx"
        try:
            # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantising.
            quant_pre_process(str(onnx_path), str(source), skip_symbolic_shape=True)
        except Exception as error:  # noqa: BLE001 - pre-processing is an optimisation only
            log.warning("quantisation pre-processing skipped (%s)", error)
            source = Path(onnx_path)

        def write(target: Path) -> None:
            # ONNX Runtime's quantiser logs one INFO line per adjusted bias scale on the root logger.
            root = logging.getLogger()
            level = root.level
            root.setLevel(max(level, logging.WARNING))
            try:
                _quantize(target)
            finally:
                root.setLevel(level)

        def _quantize(target: Path) -> None:
            quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)

        return atomic_write(out_path, write)


def compare_accuracy(sessions: dict[str, object], images: np.ndarray, labels: np.ndarray, prep: Preprocessing,
                     batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Accuracy of each ONNX Runtime session on the same images, and agreement with the first.

    Args:
        sessions: name → session (the first one is the reference).
        images: (N, S, S, 3) uint8.
        labels: (N,) integer labels.
        prep: preprocessing.

    Returns:
        name → ``{"accuracy", "agreement"}``.
    """
    predictions: dict[str, np.ndarray] = {}
    for name, session in sessions.items():
        outputs = []
        for start in range(0, len(images), batch_size):
            inputs = normalize(images[start:start + batch_size], prep).numpy()
            outputs.append(session.run(["logits"], {"input": inputs})[0].argmax(axis=1))  # type: ignore[attr-defined]
        predictions[name] = np.concatenate(outputs)
    reference = next(iter(predictions.values()))
    return {name: {"accuracy": float((pred == labels).mean()), "agreement": float((pred == reference).mean())}
            for name, pred in predictions.items()}
