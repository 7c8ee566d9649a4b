"""Streaming inference (``infer/stream.py``), ``evaluate`` on it, and the ``--backend`` choice.

* results come back in order, one per file, unreadable files included, whatever the threads;
* ``evaluate`` gives the metrics, review flags and lab-shift score of the load-all path it replaced,
  and its memory does not grow with the number of images (the load-all path's does);
* ONNX Runtime (``model.onnx``) gives PyTorch's probabilities within 1e-4; ``auto`` uses it only
  when it was exported from the current weights.
"""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from synthetic import make_dataset

from hematovision.cli import main
from hematovision.data.folder import label_indices, load_images
from hematovision.data.images import load_rgb
from hematovision.data.sources import scan_labelled
from hematovision.evaluate.external import evaluate_folder, review_summary
from hematovision.evaluate.metrics import classification_metrics
from hematovision.infer.predictor import Predictor
from hematovision.infer.stream import stream_predictions
from hematovision.predict import collect_image_paths

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def runs(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny_cnn run at 64 px (``plain``) and a copy exported with ONNX, INT8 and a review policy."""
    root = tmp_path_factory.mktemp("runs")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(synthetic_dataset), "--out", str(root / "plain"), "--mode", "finetune",
                     "--backbone", "tiny_cnn", "--no-pretrained", "--image-size", "64", "--epochs", "1",
                     "--batch-size", "8", "--seed", "1"]) == 0
        shutil.copytree(root / "plain", root / "exported")
        # Without the OpenVINO IR, `auto` is ONNX Runtime here (tests/infer/test_openvino_backend.py covers OpenVINO).
        assert main(["export", str(root / "exported"), "--threads", "1", "--int8", "--no-openvino"]) == 0
    finally:
        torch.set_num_threads(previous)
    return {"plain": root / "plain", "exported": root / "exported"}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,001 synthetic 40-px cells in class folders (667 per class)."""
    return make_dataset(tmp_path_factory.mktemp("many"), per_class=667, size=40, seed=3)


def test_results_come_in_order_with_unreadable_files_in_place(runs: dict[str, Path], synthetic_dataset: Path,
                                                               tmp_path: Path, one_thread: None) -> None:
    paths = collect_image_paths([synthetic_dataset])
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    paths = paths[:5] + [bad] + paths[5:] + [tmp_path / "missing.png"]
    predictor = Predictor.from_run_dir(runs["plain"])
    expected = predictor.predict([load_rgb(p) for p in paths if p.name not in ("empty.png", "missing.png")])
    for workers in (1, 3):
        results = list(stream_predictions(predictor, paths, batch_size=4, workers=workers, progress=False))
        assert [r.index for r in results] == list(range(len(paths))) and [r.path for r in results] == paths
        assert "the file is empty" in (results[5].error or "") and "No such file" in (results[-1].error or "")
        readable = [r.probabilities for r in results if r.error is None]
        np.testing.assert_allclose(np.stack(readable), expected, atol=1e-6)  # type: ignore[arg-type]


def test_evaluate_gives_the_metrics_of_the_load_all_path(runs: dict[str, Path], synthetic_dataset: Path,
                                                         tmp_path: Path, one_thread: None) -> None:
    run = runs["exported"]  # with a review policy, so the flags are compared too
    metrics = evaluate_folder(run, synthetic_dataset, tmp_path / "ev", backend="torch")
    # The path evaluate had before streaming: every image loaded and prepared, then predicted.
    predictor = Predictor.from_run_dir(run)
    assert predictor.policy is not None
    loaded = load_images(scan_labelled(synthetic_dataset).samples, predictor.prep)
    probabilities, flagged = predictor.predict_reviewed(list(loaded.images), prepared=True)
    labels = label_indices(loaded.samples, predictor.class_names)
    reference = classification_metrics(labels, probabilities, predictor.class_names)
    assert {key: metrics[key] for key in reference} == reference
    assert metrics["review"] == review_summary(labels, probabilities, flagged)
    assert metrics["lab_shift"] == predictor.lab_shift().to_dict()  # type: ignore[union-attr]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, probabilities.argmax(1)))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probabilities.argmax(1), average="macro"))
    assert metrics["backend"] == "torch"


def _peak_mb(function: object) -> float:
    tracemalloc.start()
    try:
        function()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def test_evaluate_memory_stays_bounded_where_loading_all_does_not(runs: dict[str, Path], many_images: Path,
                                                                   tmp_path: Path, one_thread: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """2,001 images at 64 px are 24.6 MB of model input: loading them all peaks above 40 MB; streaming stays flat.

    The model is made the slow side, as a real backbone is, so decoding that ran ahead without bound
    would pile up images.
    """
    run = runs["plain"]
    bound_mb = 10.0
    original = Predictor.predict_reviewed

    def slow(self: Predictor, *args: object, **kwargs: object) -> object:
        time.sleep(0.03)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Predictor, "predict_reviewed", slow)
    streamed = _peak_mb(lambda: evaluate_folder(run, many_images, tmp_path / "ev", backend="torch"))
    predictor = Predictor.from_run_dir(run)
    loaded_all = _peak_mb(lambda: load_images(scan_labelled(many_images).samples, predictor.prep))
    assert loaded_all > 2 * bound_mb, loaded_all  # the bound would catch the old path
    assert streamed < bound_mb, f"evaluate peaked at {streamed:.1f} MB of Python/numpy memory on 2,001 images"
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_images"] == 2001


def test_onnx_gives_torch_probabilities(runs: dict[str, Path], synthetic_dataset: Path, tmp_path: Path,
                                        one_thread: None, capsys: pytest.CaptureFixture) -> None:
    run = runs["exported"]
    outputs = {}
    for backend in ("torch", "onnx", None, "int8"):
        out = tmp_path / f"{backend}.json"
        argv = ["predict", str(run), str(synthetic_dataset), "--out", str(out)]
        assert main(argv + (["--backend", backend] if backend else [])) == 0
        printed = capsys.readouterr().out
        assert ("(onnx)" in printed) == (backend in ("onnx", None)) and ("(int8)" in printed) == (backend == "int8")
        outputs[backend] = np.array([list(r["probabilities"].values()) for r in json.loads(out.read_text())])
    assert outputs["torch"].shape == (36, 3)
    np.testing.assert_allclose(outputs["onnx"], outputs["torch"], atol=1e-4)
    np.testing.assert_array_equal(outputs[None], outputs["onnx"])  # auto: the up-to-date export
    assert np.abs(outputs["int8"] - outputs["torch"]).max() < 0.2  # quantised, but the same model
    ev = {b: evaluate_folder(run, synthetic_dataset, tmp_path / f"ev_{b}", backend=b) for b in ("torch", "onnx")}
    assert ev["onnx"]["backend"] == "onnx" and ev["onnx"]["accuracy"] == ev["torch"]["accuracy"]
    assert ev["onnx"]["review"]["flagged_fraction"] == ev["torch"]["review"]["flagged_fraction"]


def test_a_stale_or_missing_export_is_never_used(runs: dict[str, Path], synthetic_dataset: Path, tmp_path: Path,
                                                 one_thread: None, capsys: pytest.CaptureFixture) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(runs["exported"], stale)
    record = json.loads((stale / "export.json").read_text())
    record["source_sha256"] = "0" * 64  # exported from other weights
    (stale / "export.json").write_text(json.dumps(record))
    out = tmp_path / "p.csv"
    assert main(["predict", str(stale), str(synthetic_dataset), "--out", str(out)]) == 0
    assert "(onnx)" not in capsys.readouterr().out  # auto fell back to PyTorch
    assert main(["predict", str(stale), str(synthetic_dataset), "--out", str(out), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export" in err[0] and "other weights" in err[0]
    assert main(["evaluate", str(runs["plain"]), "--data", str(synthetic_dataset), "--out", str(tmp_path / "ev"),
                 "--backend", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.int8.onnx" in err[0] and "--int8" in err[0]
