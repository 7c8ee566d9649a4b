"""An exported run is scored without torch: ``predict`` and ``evaluate`` in a process where ``import torch`` fails.

Importing torch costs about half a gigabyte of memory (its CUDA build) before any image is read, and
an exported backend (ONNX Runtime, OpenVINO) never runs the PyTorch network. So when ``predict`` or
``evaluate`` resolve to one, torch and torchvision must not be imported at all (docs/scale.md,
"Streaming inference"). Each command runs in a subprocess whose import system refuses them:

* ``predict`` and ``evaluate`` on an exported run (``auto`` → ONNX Runtime) exit 0 and give the
  probabilities, review flags, metrics and lab-shift score of the PyTorch backend, within 1e-4;
* so does ``predict --backend openvino`` (when openvino is installed; within 1e-4 in f32, 0.02 in bf16);
* ``--backend torch`` there fails with one line that says torch is needed, not a traceback.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from exported_runs import exported_copy

from hematovision.cli import main

pytest.importorskip("onnxruntime")

# Runs `hematovision ARGS...` (sys.argv[1:]) with torch and torchvision unimportable, as on a machine
# without them: any `import torch` on the way, however deep, raises ImportError.
WITHOUT_TORCH = """
import sys

class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"import of {name} refused: this process must run without torch")
        return None

sys.meta_path.insert(0, RefuseTorch())
from hematovision.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
raise SystemExit(code)
"""


def run_without_torch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HEMATOVISION_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def exported_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tiny_run`` (a lab-shift reference in its card) exported to ONNX with a review policy."""
    run = exported_copy(tiny_run, tmp_path_factory.mktemp("torch_free") / "run", "--no-openvino")
    card = json.loads((run / "model_card.json").read_text())
    assert card.get("shift") and (run / "serving.json").is_file()  # so the shift score and flags are compared too
    return run


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_an_export_needs_no_torch_and_gives_torch_probabilities(
        exported_run: Path, synthetic_dataset: Path, tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "without_torch.csv"
    result = run_without_torch("predict", exported_run, synthetic_dataset, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "(onnx)" in result.stdout  # auto chose the export
    assert main(["predict", str(exported_run), str(synthetic_dataset), "--out", str(tmp_path / "torch.csv"),
                 "--backend", "torch"]) == 0
    rows, reference = read_rows(out), read_rows(tmp_path / "torch.csv")
    assert [r["file"] for r in rows] == [r["file"] for r in reference] and len(rows) == 36
    assert [r["label"] for r in rows] == [r["label"] for r in reference]
    numeric = [c for c in reference[0] if c.startswith(("p_", "lab_shift"))]
    assert len(numeric) == 3 + 3  # the 3 classes' probabilities and the lab-shift columns
    values = np.array([[float(r[c]) for c in numeric] for r in rows])
    expected = np.array([[float(r[c]) for c in numeric] for r in reference])
    np.testing.assert_allclose(values, expected, atol=1e-4)


def test_evaluate_on_an_export_needs_no_torch_and_gives_torch_metrics(
        exported_run: Path, synthetic_dataset: Path, tmp_path: Path, one_thread: None) -> None:
    result = run_without_torch("evaluate", exported_run, "--data", synthetic_dataset, "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    assert main(["evaluate", str(exported_run), "--data", str(synthetic_dataset), "--out", str(tmp_path / "torch"),
                 "--backend", "torch"]) == 0
    metrics = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert (metrics["backend"], reference["backend"]) == ("onnx", "torch")
    assert metrics["n_images"] == reference["n_images"] == 36
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-4), key
    assert metrics["review"] == pytest.approx(reference["review"], abs=1e-4)
    assert metrics["lab_shift"]["score"] == pytest.approx(reference["lab_shift"]["score"], abs=1e-4)
    assert metrics["lab_shift"]["shifted"] == reference["lab_shift"]["shifted"]


def test_openvino_needs_no_torch_either(tiny_run: Path, synthetic_dataset: Path, tmp_path: Path,
                                        one_thread: None) -> None:
    pytest.importorskip("openvino")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["export", str(run), "--threads", "1"]) == 0
    result = run_without_torch("predict", run, synthetic_dataset, "--out", tmp_path / "openvino.csv",
                               "--backend", "openvino")
    assert result.returncode == 0, result.stderr
    assert "(openvino, " in result.stdout
    precision = "f32" if "(openvino, f32)" in result.stdout else "reduced"
    assert main(["predict", str(run), str(synthetic_dataset), "--out", str(tmp_path / "torch.csv"),
                 "--backend", "torch"]) == 0
    rows, reference = read_rows(tmp_path / "openvino.csv"), read_rows(tmp_path / "torch.csv")
    columns = [c for c in reference[0] if c.startswith("p_")]
    np.testing.assert_allclose([[float(r[c]) for c in columns] for r in rows],
                               [[float(r[c]) for c in columns] for r in reference],
                               atol=1e-4 if precision == "f32" else 0.02)


def test_the_torch_backend_without_torch_is_one_clear_line(exported_run: Path, synthetic_dataset: Path,
                                                           tmp_path: Path) -> None:
    result = run_without_torch("evaluate", exported_run, "--data", synthetic_dataset, "--out", tmp_path / "ev",
                               "--backend", "torch")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("hematovision: error:") and "needs torch" in lines[0] and "export" in lines[0]
