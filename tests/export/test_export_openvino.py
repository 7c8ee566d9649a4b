"""`hematovision export` writes the OpenVINO IR of model.onnx and records it like the ONNX export."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra (CI installs it)")

from hematovision.cli import main
from hematovision.run import CARD_FILE, EXPORT_FILE, MODEL_FILE, OPENVINO_FILE, OPENVINO_WEIGHTS_FILE


def _export(run: Path, *args: str) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["export", str(run), "--threads", "1", "--no-calibrate", *args]) == 0
    finally:
        torch.set_num_threads(previous)
    return json.loads((run / EXPORT_FILE).read_text())


def test_export_writes_and_records_the_ir(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    report = _export(run)
    assert (run / OPENVINO_FILE).is_file() and (run / OPENVINO_WEIGHTS_FILE).is_file()
    assert not list(run.glob(".openvino-*"))  # the staging folder is gone
    section = report["openvino"]
    card = json.loads((run / CARD_FILE).read_text())
    # Recorded like the ONNX export: the weights it was made from and the views.
    assert report["source_sha256"] == hashlib.sha256((run / MODEL_FILE).read_bytes()).hexdigest()
    assert section["file"] == OPENVINO_FILE and section["views"] == card["tta"] == report["onnx"]["views"]
    assert section["precision"] in ("bf16", "f32", "f16") and section["weights_precision"] == "f32"
    # Weights were not compressed to fp16 in the IR (the plugin picks the arithmetic when it compiles).
    assert 'element_type="f16"' not in (run / OPENVINO_FILE).read_text()
    # Checked against PyTorch like the ONNX export, and measured against fp32 on the run's test split.
    assert section["argmax_agreement"] >= 0.9 and section["prob_max_abs_diff"] < 0.05
    test_images = sum(1 for line in (run / "split.csv").read_text().splitlines()[1:] if ",test," in line)
    assert section["split"] == f"test ({test_images} images)"
    assert section["accuracy_change"] == pytest.approx(section["accuracy_openvino"] - section["accuracy_fp32"])
    assert section["auto"] == (section["accuracy_change"] >= -0.005)


def test_export_without_openvino_skips_the_ir_with_one_line(tiny_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr("hematovision.export.openvino_ir.openvino_installed", lambda: False)
    with caplog.at_level(logging.WARNING):
        report = _export(run)
    assert (run / "model.onnx").is_file() and not (run / OPENVINO_FILE).exists()
    assert "pip install 'hematovision[openvino]'" in report["openvino"]["skipped"]
    notes = [r for r in caplog.records if "OpenVINO" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage()


def test_no_openvino_flag_writes_no_ir(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    report = _export(run, "--no-openvino")
    assert "openvino" not in report and not (run / OPENVINO_FILE).exists()
