"""``hematovision export RUN`` end to end on runs made by ``hematovision train``.

Two tiny runs on synthetic 32-px "cells": a fine-tuned ``tiny_cnn`` and a frozen run on two
concatenated backbones (``efficientnet_lite0+efficientnet_lite1``, test-time views 2). For each,
ONNX Runtime's output is compared with the run's own :class:`~hematovision.predict.Predictor`
on the run's test images (inputs normalised here from the card, not by the package), the
exported files are checked against the model card, and every number of the review policy
(``serving.json``, ``ood.npz``, the test-split evaluation) is recomputed from the ONNX outputs.

The frozen run is exported with ``--no-calibrate``: its review policy needs a pseudo-inverse and two
eigen-decompositions of a 4,256 x 4,256 matrix (about 40 s on one core); the policy's arithmetic is
the same for any model and is checked on the ``tiny_cnn`` run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from PIL import Image
from synthetic import make_dataset

from hematovision.cli import main

# Pooled channels of EfficientNet-Lite0 and -Lite1 (same widths): mean and std of stages 2-5
# (40, 80, 112, 192 channels) plus the 1280-channel head, per backbone.
LITE_FEATURES = 2 * (40 + 80 + 112 + 192) + 1280


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 8 synthetic 32-px cells: already at the models' input size, so no resizing."""
    return make_dataset(tmp_path_factory.mktemp("export_data"), per_class=8, size=32)


def _train_and_export(args: list[str], out: Path, *export_args: str) -> dict:
    """Run ``train`` then ``export`` through the CLI; return the JSON ``export`` printed."""
    assert main(["train", *args, "--out", str(out)]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(out), "--threads", "1", *export_args]) == 0
    return json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def finetune_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("runs") / "tiny"
        printed = _train_and_export(["--data", str(dataset), "--mode", "finetune", "--backbone", "tiny_cnn",
                                     "--no-pretrained", "--image-size", "32", "--epochs", "4", "--batch-size", "8",
                                     "--lr", "0.01", "--seed", "1"], out)
    finally:
        torch.set_num_threads(previous)
    return out, printed


@pytest.fixture(scope="module")
def frozen_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("frozen")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HEMATOVISION_HOME", str(root / "home"))  # the feature cache stays private
            printed = _train_and_export(["--data", str(dataset), "--mode", "frozen", "--backbone",
                                         "efficientnet_lite0+efficientnet_lite1", "--image-size", "32",
                                         "--tta", "2"], root / "run", "--no-calibrate")
    finally:
        torch.set_num_threads(previous)
    return root / "run", printed


@pytest.fixture(params=["finetune", "frozen"])
def run(request: pytest.FixtureRequest, one_thread: None) -> tuple[Path, dict]:
    return request.getfixturevalue(f"{request.param}_run")


# ----------------------------------------------------------------------------- helpers


def _card(run_dir: Path) -> dict:
    return json.loads((run_dir / "model_card.json").read_text())


def _split(run_dir: Path) -> dict[str, list[tuple[Path, str]]]:
    """(file, label) of each split part, read straight from the run's split.csv."""
    parts: dict[str, list[tuple[Path, str]]] = {}
    with open(run_dir / "split.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            parts.setdefault(row["split"], []).append((Path(row["file"]), row["label"]))
    return parts


def _images(entries: list[tuple[Path, str]]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in entries])


def _onnx_inputs(images: np.ndarray, card: dict) -> np.ndarray:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float32, normalised with the card's mean and std."""
    prep = card["preprocessing"]
    assert images.shape[1:3] == (prep["image_size"], prep["image_size"])
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _session(run_dir: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(run_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _onnx(run_dir: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's (logits, features), batch by batch as a server would."""
    session, card = _session(run_dir), _card(run_dir)
    outputs = [session.run(None, {"input": _onnx_inputs(images[i:i + 8], card)}) for i in range(0, len(images), 8)]
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min over classes of (f - m)' P (f - m), divided by D, in float64."""
    f, m, p = (np.asarray(a, np.float64) for a in (features, means, precision))
    diffs = f[:, None, :] - m[None, :, :]
    return np.einsum("nkd,de,nke->nk", diffs, p, diffs).min(axis=1) / f.shape[1]


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ----------------------------------------------------------------------------- tests


def test_onnx_equals_the_predictor_with_the_same_views(run: tuple[Path, dict]) -> None:
    from hematovision.infer.predictor import Predictor

    run_dir, _ = run
    card = _card(run_dir)
    test = _split(run_dir)["test"]
    images = _images(test)
    logits, _ = _onnx(run_dir, images)
    # The exported graph holds the run's own test-time views, as the predictor uses them.
    predictor = Predictor.from_run_dir(run_dir)
    np.testing.assert_allclose(logits, predictor.logits(list(images)), atol=1e-4, rtol=1e-4)
    probabilities = _softmax(logits, card["temperature"])
    assert np.abs(probabilities - predictor.predict(list(images))).max() < 1e-4
    assert (probabilities.argmax(1) == predictor.predict(list(images)).argmax(1)).all()


def test_exported_files_match_the_card(run: tuple[Path, dict]) -> None:
    from hematovision.infer.predictor import Predictor
    from hematovision.serve.engine import Engine

    run_dir, printed = run
    card = _card(run_dir)
    calibrated = card["mode"] == "finetune"  # the frozen run was exported with --no-calibrate
    for name in ("model.onnx", "export.json", "serving.json", "ood.npz"):
        assert (run_dir / name).is_file() == (calibrated or name in ("model.onnx", "export.json")), name
    report = json.loads((run_dir / "export.json").read_text())
    assert printed == report  # what the command printed is what it wrote
    weights_sha = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    assert report["source_sha256"] == weights_sha == card["files"]["model.safetensors"]["sha256"]
    assert ("review_policy" in report) == calibrated
    if calibrated:
        assert json.loads((run_dir / "serving.json").read_text())["source_sha256"] == weights_sha
    # The export's own check (random inputs give large logits: the absolute bound is looser there).
    check = report["onnx"]
    assert check["prob_max_abs_diff"] < 1e-4 and check["logits_max_abs_diff"] < 1e-3
    assert check["argmax_agreement"] == 1.0 and "validation images" in check["checked_on"]

    size, k = card["preprocessing"]["image_size"], len(card["class_names"])
    session = _session(run_dir)
    (given,) = session.get_inputs()
    assert given.name == "input" and given.shape[1:] == [3, size, size] and not isinstance(given.shape[0], int)
    logits, features = _onnx(run_dir, _images(_split(run_dir)["test"][:3]))  # 3: the batch axis is dynamic
    assert logits.shape == (3, k)
    if calibrated:
        with np.load(run_dir / "ood.npz") as ood:
            assert ood["class_means"].shape == (k, features.shape[1])
            assert ood["precision"].shape == (features.shape[1],) * 2
    if card["mode"] == "frozen":
        # The features of the graph are the head's input: two Lite backbones side by side.
        assert features.shape[1] == card["frozen"]["num_features"] == 2 * LITE_FEATURES
    # A server on the export serves the card's classes and preprocessing.
    engine = Engine(Predictor.from_run_dir(run_dir), run_dir, backend="onnx", threads=1)
    described = engine.describe()
    assert engine.backend == "onnxruntime"
    assert described["class_names"] == card["class_names"]
    assert json.loads(json.dumps(described["preprocessing"])) == card["preprocessing"]
    assert described["review_policy"]["calibrated"] is calibrated


def test_review_policy_recomputed_from_onnx_outputs(finetune_run: tuple[Path, dict], one_thread: None) -> None:
    from hematovision.infer.predictor import Predictor
    from hematovision.serve.engine import Engine

    run_dir, _ = finetune_run
    card = _card(run_dir)
    names, temperature = card["class_names"], card["temperature"]
    policy = json.loads((run_dir / "serving.json").read_text())
    splits = _split(run_dir)

    # OOD model: per-class means of the ONNX features of the train split.
    _, train_features = _onnx(run_dir, _images(splits["train"]))
    train_labels = np.array([names.index(label) for _, label in splits["train"]])
    with np.load(run_dir / "ood.npz") as ood:
        means, precision = ood["class_means"], ood["precision"]
    expected_means = np.stack([train_features[train_labels == k].mean(axis=0) for k in range(len(names))])
    np.testing.assert_allclose(means, expected_means, rtol=1e-4, atol=1e-4 * np.abs(expected_means).max())
    np.testing.assert_allclose(precision, precision.T, rtol=1e-5, atol=1e-6 * np.abs(precision).max())

    # Thresholds: on the val split, with the rules the module docstring states.
    val_logits, val_features = _onnx(run_dir, _images(splits["val"]))
    val_labels = np.array([names.index(label) for _, label in splits["val"]])
    val_probs = _softmax(val_logits, temperature)
    confidence, correct = val_probs.max(1), val_probs.argmax(1) == val_labels
    target = policy["target_accuracy"]
    meets = [c for c in np.unique(confidence) if correct[confidence >= c].mean() >= target]
    expected_threshold = max(min(meets), 0.5) if meets else 1.0  # the lowest that reaches the target
    assert policy["confidence_threshold"] == pytest.approx(expected_threshold, abs=1e-6)
    accepted = confidence >= policy["confidence_threshold"] - 1e-9
    assert policy["validation"]["coverage"] == pytest.approx(accepted.mean())
    assert policy["validation"]["accuracy"] == pytest.approx(correct.mean())
    if accepted.any():
        assert policy["validation"]["accepted_accuracy"] == pytest.approx(correct[accepted].mean())
    val_scores = _mahalanobis(val_features, means, precision)
    assert policy["ood_threshold"] == pytest.approx(np.quantile(val_scores, policy["ood_quantile"]), rel=1e-3)

    # Evaluation on the test split: every rate from the same rules.
    test = splits["test"]
    test_images = _images(test)
    test_logits, test_features = _onnx(run_dir, test_images)
    probs = _softmax(test_logits, temperature)
    right = probs.argmax(1) == np.array([names.index(label) for _, label in test])
    low = probs.max(1) < policy["confidence_threshold"]
    scores = _mahalanobis(test_features, means, precision)
    far = scores > policy["ood_threshold"]
    flagged = low | far
    evaluation = policy["evaluation"]
    assert evaluation["split"] == f"test ({len(test)} images)"
    expected = {"accuracy": right.mean(), "flagged": flagged.mean(), "flagged_low_confidence": low.mean(),
                "flagged_ood": far.mean(),
                "accuracy_unflagged": right[~flagged].mean() if (~flagged).any() else math.nan,
                "errors_caught": flagged[~right].mean() if (~right).any() else math.nan}
    for key, value in expected.items():
        assert _close(evaluation[key], float(value)), (key, evaluation[key], value)
    photos = evaluation["non_cell_photos"]
    assert photos["count"] >= 20 and all(0.0 <= photos[k] <= 1.0 for k in ("flagged", "auroc_mahalanobis"))

    # The server gives each rule's reason exactly where the rules apply, with the same scores; on the
    # test cells and on three images that are no cells (black, white, noise), so both rules fire.
    size = test_images.shape[1]
    foreign = np.stack([np.zeros((size, size, 3), np.uint8), np.full((size, size, 3), 255, np.uint8),
                        np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)])
    batch = np.concatenate([test_images, foreign])
    batch_logits, batch_features = _onnx(run_dir, batch)
    batch_probs = _softmax(batch_logits, temperature)
    batch_scores = _mahalanobis(batch_features, means, precision)
    low, far = batch_probs.max(1) < policy["confidence_threshold"], batch_scores > policy["ood_threshold"]
    assert low.any() and far.any()
    engine = Engine(Predictor.from_run_dir(run_dir), run_dir, backend="onnx", threads=1)
    served = engine.run_batch(list(batch))
    assert [any(r.startswith("low confidence") for r in p.reasons) for p in served] == low.tolist()
    assert [any(r.startswith("unlike the training images") for r in p.reasons) for p in served] == far.tolist()
    np.testing.assert_allclose([p.ood_score for p in served], batch_scores, rtol=1e-3)
    np.testing.assert_allclose([p.confidence for p in served], batch_probs.max(1), atol=1e-5)


def test_onnx_equals_the_predictor_with_the_cards_views(frozen_run: tuple[Path, dict], one_thread: None) -> None:
    from hematovision.infer.predictor import Predictor

    run_dir, _ = frozen_run
    assert _card(run_dir)["tta"] == 2
    images = _images(_split(run_dir)["test"])
    logits, _ = _onnx(run_dir, images)
    predictor = Predictor.from_run_dir(run_dir)  # the run's own views, as `predict` and `evaluate` use
    assert predictor.views == 2
    np.testing.assert_allclose(logits, predictor.logits(list(images)), atol=1e-4, rtol=1e-4)


def test_evaluate_reports_what_the_review_policy_flags(finetune_run: tuple[Path, dict], one_thread: None,
                                                        tmp_path: Path) -> None:
    """``evaluate`` flags the run's test images by the exported rules, recomputed here from ONNX outputs;
    a policy fitted for other weights is not used."""
    import shutil

    run_dir, _ = finetune_run
    card, policy = _card(run_dir), json.loads((run_dir / "serving.json").read_text())
    with np.load(run_dir / "ood.npz") as ood:
        means, precision = ood["class_means"], ood["precision"]
    test = _split(run_dir)["test"]
    logits, features = _onnx(run_dir, _images(test))
    probs = _softmax(logits, card["temperature"])
    right = probs.argmax(1) == np.array([card["class_names"].index(label) for _, label in test])
    flagged = (probs.max(1) < policy["confidence_threshold"]) | (
        _mahalanobis(features, means, precision) > policy["ood_threshold"])

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(run_dir), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    review = json.loads((tmp_path / "eval" / "metrics.json").read_text())["review"]
    assert review["flagged_fraction"] == pytest.approx(flagged.mean())
    assert review["n_unflagged"] == int((~flagged).sum())
    if (~flagged).any():
        assert review["unflagged_accuracy"] == pytest.approx(right[~flagged].mean())
    assert "flagged for review" in (tmp_path / "eval" / "report.md").read_text()

    stale = tmp_path / "stale_run"
    shutil.copytree(run_dir, stale)
    (stale / "serving.json").write_text(json.dumps({**policy, "source_sha256": "0" * 64}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(stale), "--split", "test", "--out", str(tmp_path / "eval_stale")]) == 0
    assert json.loads((tmp_path / "eval_stale" / "metrics.json").read_text())["review"] is None
