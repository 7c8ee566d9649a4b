"""Static INT8 quantisation: agreement with fp32, nodes kept float, the default rule (tiny model)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from hematovision.data.folder import label_indices, load_images, scan_image_folder  # noqa: E402
from hematovision.export.onnx import export_onnx  # noqa: E402
from hematovision.export.quantize import (  # noqa: E402
    Recipe,
    compare_accuracy,
    measure_throughput,
    meets_targets,
    quantize_int8,
)
from hematovision.infer.exported import onnx_session

FIRST_CONV = r"^/model/features/features\.0/Conv$"
HEAD = r"^/model/classifier/Gemm$"


def int8_weights(graph: object) -> dict[str, bool]:
    """Conv/Gemm name → whether its weight comes out of a DequantizeLinear (ONNX Runtime then runs it in INT8).

    The data input is no test: a float node still reads the dequantised output of a quantised producer.
    """
    producers = {out: node.op_type for node in graph.node for out in node.output}  # type: ignore[attr-defined]
    return {node.name: producers.get(node.input[1]) == "DequantizeLinear"
            for node in graph.node if node.op_type in ("Conv", "Gemm")}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def exported(tiny_run: Path, synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(tiny_run)
    path = export_onnx(predictor.model, predictor.prep.image_size, tmp_path_factory.mktemp("int8") / "model.onnx")
    loaded = load_images(scan_image_folder(synthetic_dataset).samples, predictor.prep, workers=1)
    return {"path": path, "prep": predictor.prep, "images": loaded.images,
            "labels": label_indices(loaded.samples, predictor.class_names)}


def test_int8_agrees_with_fp32_and_keeps_the_chosen_nodes_float(exported: dict, tmp_path: Path,
                                                                 one_thread: None) -> None:
    images, prep = exported["images"], exported["prep"]
    out = quantize_int8(exported["path"], tmp_path / "model.int8.onnx", images[::2], prep,
                        recipe=Recipe(keep_float=(FIRST_CONV, HEAD)))
    graph = onnx.load(str(out)).graph
    assert int8_weights(graph) == {"/model/features/features.0/Conv": False, "/model/features/features.4/Conv": True,
                    "/model/classifier/Gemm": False}
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert "model.classifier.weight" in float_weights  # the head's weights stay fp32, not int8 + scale

    scores = compare_accuracy({"fp32": onnx_session(exported["path"], 1), "int8": onnx_session(out, 1)},
                              images, exported["labels"], prep)
    assert scores["int8"]["agreement"] >= 0.9
    assert abs(scores["int8"]["accuracy"] - scores["fp32"]["accuracy"]) <= 0.1


def test_default_recipe_quantises_every_conv(exported: dict, tmp_path: Path, one_thread: None) -> None:
    out = quantize_int8(exported["path"], tmp_path / "model.int8.onnx", exported["images"][:8], exported["prep"])
    assert all(int8_weights(onnx.load(str(out)).graph).values())


def test_unknown_calibration_method_is_refused(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(exported["path"], tmp_path / "x.onnx", exported["images"][:2], exported["prep"],
                      recipe=Recipe(calibration="kl"))
    assert not (tmp_path / "x.onnx").exists()


def test_int8_becomes_default_only_when_both_targets_are_met() -> None:
    assert meets_targets(-0.005, 1.5)
    assert meets_targets(0.01, 3.0)
    assert not meets_targets(-0.006, 3.0)  # too inaccurate, however fast
    assert not meets_targets(0.0, 1.49)  # accurate but not fast enough


class SleepySession:
    """A stand-in session whose run takes ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.seconds)
        return [np.zeros((len(feeds["input"]), 2), np.float32)]


def test_throughput_ratio_is_int8_over_fp32(exported: dict) -> None:
    speed = measure_throughput(SleepySession(0.004), SleepySession(0.002), exported["images"], exported["prep"],
                               batch_size=4, rounds=3, images_per_round=12)
    assert len(speed.rounds) == 3
    assert 1.4 < speed.speedup < 2.1
    assert speed.int8 > speed.fp32 > 0
