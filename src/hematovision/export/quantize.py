"""Static INT8 quantisation of the ONNX model (QDQ, per-channel weights) with ONNX Runtime.

Activations are calibrated on the run's own training images, preprocessed exactly as inference
does. What to quantise is a :class:`Recipe`; nodes matched by its ``keep_float`` patterns stay
float32 (no QuantizeLinear/DequantizeLinear around them). The accuracy change is measured on the
run's test split by :func:`compare_accuracy` and the speed by :func:`measure_throughput`, never
assumed; :func:`meets_targets` is the rule that decides whether INT8 may be the default.
"""

from __future__ import annotations

import logging
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hematovision._io import atomic_write
from hematovision._optional import optional_import
from hematovision.data.transforms import Preprocessing, normalize
from hematovision.infer.backend import MAX_ACCURACY_LOSS as BACKEND_MAX_ACCURACY_LOSS

log = logging.getLogger(__name__)

#: Largest accepted top-1 accuracy loss (fraction; owned by the backend rule, shared with OpenVINO) and
#: smallest speed-up over fp32 ONNX Runtime for INT8 to be used by default (issue 14).
MAX_ACCURACY_LOSS = BACKEND_MAX_ACCURACY_LOSS
MIN_SPEEDUP = 1.5

#: Node-name patterns (regular expressions, ``re.search``) of the parts of a HematoVision export
#: that are candidates to keep in float32. Names come from the TorchScript exporter.
STEM = r"^/model/features/conv_stem/.*Conv$"
#: The frozen mode's std pools (x - mean, squared, mean, sqrt) and mean pools over the tapped stages.
POOLS = r"^/model/features/(ReduceMean|Sub|Mul|Sqrt)(_\d+)?$"
#: Feature standardisation and the linear head.
HEAD = r"^/model/(Sub|Div|head/Gemm)$"


@dataclass(frozen=True)
class Recipe:
    """How to quantise: calibration method, which op types, which nodes stay float32.

    Attributes:
        calibration: ``minmax``, ``entropy`` or ``percentile`` (ONNX Runtime's calibrators).
        op_types: op types to quantise; empty means ONNX Runtime's default set.
        keep_float: node-name regular expressions kept in float32.
        reduce_range: 7-bit weights, for CPUs without VNNI (u8×s8 products may saturate there).
        percentile: the percentile for ``percentile`` calibration.
        activations: ``uint8`` (asymmetric; ONNX Runtime's fast u8×s8 kernels) or ``int8`` (symmetric;
            more accurate on the PBC runs but slower than fp32 on x86, see docs/scale.md).

    Note:
        ``keep_float`` keeps a node's own arithmetic and weights in float32, but in the QDQ format a
        float node still reads the dequantised output of a quantised producer: to keep a tensor
        at full precision, its producer has to be kept float too.
    """

    calibration: str = "minmax"
    op_types: tuple[str, ...] = ()
    keep_float: tuple[str, ...] = ()
    reduce_range: bool = False
    percentile: float = 99.999
    activations: str = "uint8"

    def describe(self) -> dict[str, Any]:
        """The recipe as JSON-ready values (for ``export.json``)."""
        return {**asdict(self), "format": "QDQ", "weights": "int8 per-channel"}


#: The measured choice (docs/scale.md, "INT8"): MinMax over ONNX Runtime's default op set was as
#: accurate as every float exclusion tried on the PBC runs and the fastest; it still loses ~2 points
#: on the 768-image PBC test split, so fp32 stays the default export (see :func:`meets_targets`).
DEFAULT_RECIPE = Recipe()


@dataclass
class Throughput:
    """Images/s of fp32 and INT8 sessions measured alternately in the same process.

    Attributes:
        fp32: median images/s of the float model.
        int8: median images/s of the INT8 model.
        speedup: median of the per-round ratios (robust to load changing between rounds).
        rounds: per-round (fp32, int8) images/s.
    """

    fp32: float
    int8: float
    speedup: float
    rounds: list[tuple[float, float]] = field(default_factory=list)


def float_nodes(onnx_path: str | Path, patterns: Sequence[str]) -> list[str]:
    """Names of the nodes of ``onnx_path`` that match any of ``patterns`` (``re.search``)."""
    onnx = optional_import("onnx", "onnx")
    compiled = [re.compile(p) for p in patterns]
    return [node.name for node in onnx.load(str(onnx_path)).graph.node
            if any(c.search(node.name) for c in compiled)]


def quantize_int8(onnx_path: str | Path, out_path: str | Path, calibration_images: np.ndarray,
                  prep: Preprocessing, batch_size: int = 8, recipe: Recipe = DEFAULT_RECIPE) -> Path:
    """Write an INT8 copy of ``onnx_path``.

    Args:
        onnx_path: the float32 model from :func:`hematovision.export.onnx.export_onnx`.
        out_path: where the INT8 model goes (atomically).
        calibration_images: (N, S, S, 3) uint8 training images for the activation ranges.
        prep: the model's preprocessing.
        batch_size: calibration batch size.
        recipe: what to quantise and how to calibrate.
    """
    optional_import("onnxruntime", "onnx")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if recipe.calibration not in methods:
        raise ValueError(f"unknown calibration {recipe.calibration!r}; use one of {', '.join(methods)}")
    if recipe.activations not in ("uint8", "int8"):
        raise ValueError(f"unknown activations {recipe.activations!r}; use uint8 or int8")
    signed = recipe.activations == "int8"

    class Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
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
        # Node names are matched after pre-processing: that is the graph the quantiser sees.
        excluded = float_nodes(source, recipe.keep_float)

        def write(target: Path) -> None:
            # ONNX Runtime's quantiser logs one INFO line per adjusted bias scale on the root logger.
            root = logging.getLogger()
            level = root.level
            root.setLevel(max(level, logging.WARNING))
            try:
                quantize_static(
                    str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=recipe.reduce_range, calibrate_method=methods[recipe.calibration],
                    op_types_to_quantize=list(recipe.op_types) or None, nodes_to_exclude=excluded,
                    extra_options={"CalibPercentile": recipe.percentile, "ActivationSymmetric": signed},
                )
            finally:
                root.setLevel(level)

        log.info("INT8: %s calibration on %d images, %d nodes kept in float32",
                 recipe.calibration, len(calibration_images), len(excluded))
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


def measure_throughput(fp32: Any, int8: Any, images: np.ndarray, prep: Preprocessing, batch_size: int = 8,
                       rounds: int = 4, images_per_round: int = 48) -> Throughput:
    """Images/s of two ONNX Runtime sessions, alternating rounds so both see the same machine load.

    On a shared machine the load changes within seconds; a ratio of two separate measurements can be
    off by 3×, so each round times both models back to back and the median ratio is reported.

    Args:
        fp32: the float session.
        int8: the INT8 session.
        images: (N, S, S, 3) uint8; the first ``batch_size`` are used.
        prep: preprocessing (outside the timing).
        batch_size: images per ``run`` call.
        rounds: alternating rounds.
        images_per_round: images per model per round.
    """
    batch = normalize(images[:batch_size], prep).numpy()
    if len(batch) == 0:
        raise ValueError("measure_throughput needs at least one image")

    def rate(session: Any) -> float:
        session.run(["logits"], {"input": batch})  # warm-up: first runs allocate and pick kernels
        done, start = 0, time.perf_counter()
        while done < images_per_round:
            session.run(["logits"], {"input": batch})
            done += len(batch)
        return done / (time.perf_counter() - start)

    measured = [(rate(fp32), rate(int8)) for _ in range(rounds)]
    return Throughput(fp32=statistics.median(f for f, _ in measured), int8=statistics.median(i for _, i in measured),
                      speedup=statistics.median(i / f for f, i in measured), rounds=measured)


def meets_targets(accuracy_change: float, speedup: float, max_loss: float = MAX_ACCURACY_LOSS,
                  min_speedup: float = MIN_SPEEDUP) -> bool:
    """Whether INT8 may be used by default: loses at most ``max_loss`` accuracy and is ``min_speedup``× faster."""
    return accuracy_change >= -max_loss and speedup >= min_speedup
