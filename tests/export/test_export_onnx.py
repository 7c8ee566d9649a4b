"""ONNX export, INT8 quantisation and review calibration of a run folder (tiny model, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from PIL import Image

from hematovision.data.folder import Sample
from hematovision.data.splits import write_split_csv
from hematovision.data.transforms import Preprocessing, normalize
from hematovision.export.onnx import compare_with_torch, export_onnx
from hematovision.infer.exported import onnx_session
from hematovision.infer.runtime import LogitsAndFeatures
from hematovision.models import create_model

CLASSES = ["lymphocyte", "neutrophil"]


def test_logits_and_features_wrapper_leaves_the_model_untouched() -> None:
    model = create_model("tiny_cnn", 3).eval()
    logits, features = LogitsAndFeatures(model)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and features.shape == (2, 16)
    torch.testing.assert_close(model.classifier(features), logits)
    assert not any(module._forward_hooks for module in model.modules())


def test_tiny_cnn_round_trip_with_dynamic_batch(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 5).eval()
    path = export_onnx(model, 32, tmp_path / "model.onnx")
    session = onnx_session(path, threads=1)
    for batch in (1, 3, 7):
        check = compare_with_torch(model, session, torch.randn(batch, 3, 32, 32))
        assert check["logits_max_abs_diff"] < 1e-4 and check["features_max_abs_diff"] < 1e-4
        assert check["argmax_agreement"] == 1.0
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    assert not list(tmp_path.glob("*.tmp"))


def test_default_backbone_exports_and_matches(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 5, pretrained=False).eval()
    session = onnx_session(export_onnx(model, 64, tmp_path / "model.onnx"), threads=1)
    check = compare_with_torch(model, session, torch.randn(2, 3, 64, 64))
    assert check["logits_max_abs_diff"] < 1e-3 and check["argmax_agreement"] == 1.0


def synthetic_run(root: Path) -> tuple[Path, SimpleNamespace]:
    """A run folder with a split.csv over synthetic two-class "cells", and a briefly trained tiny_cnn."""
    rng = np.random.default_rng(0)
    samples, parts, images, labels = [], [], [], []
    yy, xx = np.mgrid[:32, :32]
    for label, name in enumerate(CLASSES):
        (root / "data" / name).mkdir(parents=True)
        for i in range(24):
            image = rng.uniform(170, 230, (32, 32, 3))
            cy, cx = rng.integers(10, 22, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 30] = (110, 50, 170) if label == 0 else (60, 110, 200)
            image = image.clip(0, 255).astype(np.uint8)
            path = root / "data" / name / f"{i}.png"
            Image.fromarray(image).save(path)
            samples.append(Sample(path, name))
            parts.append("train" if i < 12 else "val" if i < 18 else "test")
            images.append(image)
            labels.append(label)
    run = root / "run"
    run.mkdir()
    write_split_csv(run / "split.csv", samples, parts, [str(s.path) for s in samples])
    torch.manual_seed(0)
    prep = Preprocessing(32)
    model = create_model("tiny_cnn", 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    train = [i for i, part in enumerate(parts) if part == "train"]
    inputs, targets = normalize(np.stack([images[i] for i in train]), prep), torch.tensor([labels[i] for i in train])
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predictor = SimpleNamespace(class_names=CLASSES, prep=prep, model=model.eval(), temperature=1.0,
                                card={"backbone": "tiny_cnn"})
    return run, predictor


def test_prepare_run_exports_quantises_and_calibrates(tmp_path: Path, one_thread: None) -> None:
    from hematovision.export.prepare import prepare_run
    from hematovision.infer.policy import ReviewPolicy

    run, predictor = synthetic_run(tmp_path)
    report = prepare_run(run, int8=True, predictor=predictor, threads=1)
    for name in ("model.onnx", "model.int8.onnx", "serving.json", "ood.npz", "export.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "export.json").read_text()) == json.loads(json.dumps(report))
    assert report["onnx"]["logits_max_abs_diff"] < 1e-4
    assert "validation images" in report["onnx"]["checked_on"]
    int8 = report["int8"]
    assert int8["split"] == "test (12 images)"
    assert int8["accuracy_change"] == pytest.approx(int8["accuracy_int8"] - int8["accuracy_fp32"])
    policy = ReviewPolicy.load(run)
    assert policy is not None and policy.calibrated and policy.has_ood
    assert 0.5 <= policy.confidence_threshold <= 1.0
    evaluation = report["review_policy"]["evaluation"]
    assert evaluation["split"] == "test (12 images)"
    photos = evaluation["non_cell_photos"]
    assert photos["count"] >= 20 and 0.0 <= photos["auroc_mahalanobis"] <= 1.0
    # Photos of coffee cups and astronauts are far from these cells in feature space.
    assert photos["auroc_mahalanobis"] > 0.9


def test_server_uses_onnx_when_exported_and_agrees_with_torch(tmp_path: Path, one_thread: None) -> None:
    from hematovision.export.prepare import prepare_run
    from hematovision.serve.engine import Engine

    run, predictor = synthetic_run(tmp_path)
    prepare_run(run, calibrate=False, predictor=predictor, threads=1, openvino=False)  # auto: ONNX, not OpenVINO
    onnx_engine = Engine(predictor, run, backend="auto", threads=1)
    torch_engine = Engine(predictor, run, backend="torch", threads=1)
    assert onnx_engine.backend == "onnxruntime" and torch_engine.backend == "pytorch"
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "data").rglob("*.png"))[:5]]
    a, b = onnx_engine.run_batch(images), torch_engine.run_batch(images)
    for x, y in zip(a, b):
        assert x.label == y.label
        assert x.confidence == pytest.approx(y.confidence, abs=1e-5)
    with pytest.raises(Exception, match="int8"):
        Engine(predictor, run, backend="int8")


def test_export_without_split_needs_no_calibrate(tmp_path: Path, one_thread: None) -> None:
    from hematovision.errors import HematoVisionError
    from hematovision.export.prepare import prepare_run

    predictor = SimpleNamespace(class_names=CLASSES, prep=Preprocessing(32), model=create_model("tiny_cnn", 2),
                                temperature=1.0, card={})
    with pytest.raises(HematoVisionError, match="no-calibrate"):
        prepare_run(tmp_path, predictor=predictor)
    report = prepare_run(tmp_path, calibrate=False, predictor=predictor, threads=1)
    assert report["onnx"]["checked_on"] == "4 random normal inputs" and (tmp_path / "model.onnx").is_file()


def test_export_command_is_registered() -> None:
    from hematovision.cli import get_parser

    args = get_parser().parse_args(["export", "RUN", "--int8", "--no-calibrate"])
    assert args.run_dir == "RUN" and args.int8 and args.no_calibrate and args.format == "onnx"
    args = get_parser().parse_args(["serve", "--model", "RUN", "--port", "8123", "--backend", "onnx"])
    assert args.model == "RUN" and args.port == 8123 and args.backend == "onnx"


def test_exports_of_older_weights_are_not_served(tmp_path: Path, one_thread: None) -> None:
    from hematovision.errors import HematoVisionError
    from hematovision.export.prepare import prepare_run
    from hematovision.serve.engine import Engine

    run, predictor = synthetic_run(tmp_path)
    (run / "model.safetensors").write_bytes(b"weights v1")  # stands for the run's weights file
    report = prepare_run(run, predictor=predictor, threads=1, openvino=False)  # auto: ONNX, not OpenVINO
    assert report["source_sha256"] and report["review_policy"]["source_sha256"] == report["source_sha256"]
    fresh = Engine(predictor, run, threads=1)
    assert fresh.backend == "onnxruntime" and fresh.policy.calibrated
    (run / "model.safetensors").write_bytes(b"weights v2")  # retrained after the export
    stale = Engine(predictor, run, threads=1)
    assert stale.backend == "pytorch" and not stale.policy.calibrated
    with pytest.raises(HematoVisionError, match="export"):
        Engine(predictor, run, backend="onnx", threads=1)
