"""The OpenVINO backend: the same answers as PyTorch, chosen by `auto` only when fresh and within the accuracy rule."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from exported_runs import exported_copy

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra (CI installs it)")

from hematovision.cli import main
from hematovision.data.images import load_rgb
from hematovision.errors import HematoVisionError
from hematovision.infer.backend import LoadedBackend, load_backend, resolve_backend
from hematovision.infer.exported import openvino_forward, openvino_model, openvino_precision
from hematovision.infer.predictor import Predictor
from hematovision.infer.runtime import torch_forward
from hematovision.run import EXPORT_FILE, OPENVINO_FILE
from hematovision.serve.engine import Engine


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny run, exported (ONNX + OpenVINO IR, measured on its test split)."""
    return exported_copy(tiny_run, tmp_path_factory.mktemp("openvino") / "run", "--no-calibrate")


@pytest.fixture()
def run(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the exported run, for tests that change it."""
    copy = tmp_path / "run"
    shutil.copytree(exported, copy)
    return copy


@pytest.fixture()
def single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(folder: Path, n: int = 12) -> list[np.ndarray]:
    return [load_rgb(path) for path in sorted(folder.rglob("*.png"))[:n]]


def _record(run: Path, **changes: object) -> None:
    """Rewrite export.json's openvino section (what the export measured) with ``changes``."""
    report = json.loads((run / EXPORT_FILE).read_text())
    report["openvino"].update(changes)
    (run / EXPORT_FILE).write_text(json.dumps(report))


def test_openvino_in_f32_gives_pytorchs_logits_features_and_probabilities(exported: Path, synthetic_dataset: Path,
                                                                          single_thread: None) -> None:
    predictor = Predictor.from_run_dir(exported, backend="torch")
    images = np.stack([predictor.prep.prepare(image) for image in _images(synthetic_dataset)])
    compiled = openvino_model(exported / OPENVINO_FILE, threads=1, precision="f32")
    assert openvino_precision(compiled) == "f32"
    ov_logits, ov_features = openvino_forward(compiled, predictor.prep)(images)
    logits, features = torch_forward(predictor.model, predictor.prep, predictor.views)(images)
    np.testing.assert_allclose(ov_logits, logits, atol=1e-4)
    np.testing.assert_allclose(ov_features, features, atol=1e-4)  # the OOD score's input
    expected = predictor.predict(list(images), prepared=True)
    predictor.use_backend(LoadedBackend("openvino", openvino_forward(compiled, predictor.prep), "f32"))
    assert np.abs(predictor.predict(list(images), prepared=True) - expected).max() < 1e-4


def test_predict_and_evaluate_with_openvino_at_the_plugins_precision(exported: Path, synthetic_dataset: Path,
                                                                     tmp_path: Path, single_thread: None,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / f"{backend}.json"
        assert main(["predict", str(exported), str(synthetic_dataset), "--out", str(out), "--backend", backend]) == 0
        outputs[backend] = np.array([list(r["probabilities"].values()) for r in json.loads(out.read_text())])
    precision = json.loads((exported / EXPORT_FILE).read_text())["openvino"]["precision"]
    assert f"(openvino, {precision})" in capsys.readouterr().out
    torch_probs, ov_probs = outputs["torch"], outputs["openvino"]
    assert ov_probs.shape == torch_probs.shape == (36, 3)
    # bf16 keeps ~3 significant digits: labels agree wherever PyTorch's top two are not a near tie.
    top2 = np.sort(torch_probs, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.02
    assert (ov_probs.argmax(1) == torch_probs.argmax(1))[clear].all()
    assert np.abs(ov_probs - torch_probs).max() < 0.02
    metrics = {}
    for backend in ("torch", "openvino"):
        assert main(["evaluate", str(exported), "--data", str(synthetic_dataset), "--out", str(tmp_path / backend),
                     "--backend", backend]) == 0
        metrics[backend] = json.loads((tmp_path / backend / "metrics.json").read_text())
    assert metrics["openvino"]["backend"] == "openvino" and metrics["openvino"]["precision"] == precision
    assert abs(metrics["openvino"]["accuracy"] - metrics["torch"]["accuracy"]) <= 1 / 36


def test_auto_takes_openvino_only_within_the_accuracy_rule(run: Path, single_thread: None) -> None:
    _record(run, accuracy_change=0.0)
    assert resolve_backend(run, 1) == ("openvino", run / OPENVINO_FILE)
    _record(run, accuracy_change=-0.005)  # exactly the allowed 0.5 points
    assert resolve_backend(run, 1)[0] == "openvino"
    _record(run, accuracy_change=-0.006)
    assert resolve_backend(run, 1) == ("onnx", run / "model.onnx")
    _record(run, accuracy_change=None)  # not measured (exported without a split)
    assert resolve_backend(run, 1)[0] == "onnx"
    # An explicit choice is the user's: it is served whatever the measured loss.
    assert resolve_backend(run, 1, "openvino")[0] == "openvino"


def test_the_server_uses_the_same_rule(run: Path, single_thread: None) -> None:
    predictor = Predictor.from_run_dir(run, backend="auto")
    assert predictor.backend == "openvino"  # the export measured no loss on the tiny test split
    engine = Engine(predictor, run, threads=1)
    assert engine.backend == "openvino" and engine.describe()["precision"] == predictor.precision
    _record(run, accuracy_change=-0.05)
    assert Engine(predictor, run, threads=1).backend == "onnxruntime"
    assert Predictor.from_run_dir(run, backend="auto").backend == "onnx"


def test_an_ir_measured_at_another_precision_is_passed_over_by_auto(run: Path, single_thread: None,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    actual = json.loads((run / EXPORT_FILE).read_text())["openvino"]["precision"]
    if actual == "f32":
        pytest.skip("this CPU runs OpenVINO in f32, which auto always accepts")
    _record(run, precision="f16")  # as if exported (and measured) on a machine with other arithmetic
    prep = Predictor.from_run_dir(run, backend="torch").prep
    assert load_backend(run, 1, prep, 1).name == "onnx"
    assert "measured in f16" in caplog.text
    assert load_backend(run, 1, prep, 1, "openvino").precision == actual


def test_a_stale_or_unrecorded_ir_is_never_chosen(run: Path, synthetic_dataset: Path, tmp_path: Path,
                                                  single_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "p.csv")
    # Other test-time views than the export's: the IR's graph averages other views.
    assert resolve_backend(run, 2)[0] == "torch"
    with pytest.raises(HematoVisionError, match="test-time view"):
        resolve_backend(run, 2, "openvino")
    # export.json without the IR (a later export with --no-openvino): nothing vouches for model.xml.
    report = json.loads((run / EXPORT_FILE).read_text())
    (run / EXPORT_FILE).write_text(json.dumps({k: v for k, v in report.items() if k != "openvino"}))
    assert resolve_backend(run, 1)[0] == "onnx"
    with pytest.raises(HematoVisionError, match="not recorded"):
        resolve_backend(run, 1, "openvino")
    # Other weights: both exports are stale; auto falls back to PyTorch, an explicit choice is one line.
    report["source_sha256"] = "0" * 64
    (run / EXPORT_FILE).write_text(json.dumps(report))
    assert main(["predict", str(run), str(synthetic_dataset), "--out", out]) == 0
    assert "(openvino" not in capsys.readouterr().out
    assert main(["predict", str(run), str(synthetic_dataset), "--out", out, "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and OPENVINO_FILE in err[0] and "hematovision export" in err[0]
    # No IR at all.
    (run / OPENVINO_FILE).unlink()
    assert main(["predict", str(run), str(synthetic_dataset), "--out", out, "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs {OPENVINO_FILE}" in err[0]


def test_missing_openvino_package_is_one_error_line_and_auto_moves_on(run: Path, synthetic_dataset: Path,
                                                                      tmp_path: Path, single_thread: None,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("hematovision.infer.backend.openvino_installed", lambda: False)
    out = str(tmp_path / "p.csv")
    assert main(["predict", str(run), str(synthetic_dataset), "--out", out, "--backend", "openvino"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'hematovision[openvino]'" in err[0]
    assert resolve_backend(run, 1)[0] == "onnx"
