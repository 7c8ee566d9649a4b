"""A run's test-time views reach every consumer: ``predict``, the ONNX export and the server agree.

A frozen run trained with ``--tta 2`` has its head and temperature fitted on features averaged
over two views. Scoring one view anywhere (the bug the serving path and the export's review
calibration had) gives other probabilities than the ones the run was calibrated for.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from hematovision.cli import main
from hematovision.evaluate.metrics import softmax
from hematovision.export.prepare import prepare_run
from hematovision.infer.exported import onnx_forward, onnx_session
from hematovision.infer.predictor import Predictor
from hematovision.run import CARD_FILE, EXPORT_FILE, ONNX_FILE
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings


@pytest.fixture(scope="module")
def frozen_tta2_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("views") / "frozen_tta2"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "frozen",
                     "--image-size", "48", "--tta", "2", "--seed", "0"]) == 0
        # Discs this easy saturate the softmax (validation picks a tiny temperature), and saturated
        # probabilities hide which views were used; a softer, still valid temperature shows them.
        card = json.loads((out / CARD_FILE).read_text())
        card["temperature"] = 30.0
        (out / CARD_FILE).write_text(json.dumps(card))
        prepare_run(out, onnx=True, calibrate=False, threads=1)
    finally:
        torch.set_num_threads(previous)
    return out


def _cells(n: int = 6) -> list[np.ndarray]:
    """Cells blended with an asymmetric gradient: a rotated or flipped view really differs, and the
    model is unsure enough that the probabilities (not only the logits) show it."""
    from synthetic import synthetic_cell

    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, 48)[None, :, None] * np.linspace(0.2, 1, 48)[:, None, None]
    labels = ("neutrophil", "lymphocyte", "eosinophil")
    return [(0.5 * synthetic_cell(labels[i % 3], 48, rng) + 0.5 * ramp).astype(np.uint8) for i in range(n)]


def test_predictor_uses_the_cards_views(frozen_tta2_run: Path) -> None:
    predictor = Predictor.from_run_dir(frozen_tta2_run)
    assert predictor.views == 2 and predictor.card.tta == 2
    images = _cells()
    two = predictor.predict(images)
    one = Predictor.from_run_dir(frozen_tta2_run, views=1).predict(images)
    assert np.abs(two - one).max() > 1e-3  # the views matter on these images, so the next checks can fail


def test_onnx_export_scores_with_the_runs_views(frozen_tta2_run: Path) -> None:
    predictor = Predictor.from_run_dir(frozen_tta2_run)
    images = _cells()
    expected = predictor.predict(images)
    assert json.loads((frozen_tta2_run / EXPORT_FILE).read_text())["onnx"]["views"] == 2
    session = onnx_session(frozen_tta2_run / ONNX_FILE, threads=1)
    batch = np.stack([np.array(Image.fromarray(i).resize((48, 48), Image.BICUBIC)) for i in images])
    logits, _ = onnx_forward(session, predictor.prep)(batch)
    assert np.abs(softmax(logits, predictor.temperature) - expected).max() < 1e-4


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_server_scores_with_the_runs_views(frozen_tta2_run: Path, tmp_path: Path, backend: str) -> None:
    predictor = Predictor.from_run_dir(frozen_tta2_run)
    images = _cells()
    expected = predictor.predict(images)
    settings = Settings(model=frozen_tta2_run, db=tmp_path / "hv.db", backend=backend, threads=1, auth=False)
    files = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(("files", (f"{index}.png", buffer.getvalue(), "image/png")))
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        response = client.post("/api/v1/predict", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    served = np.array([[r["probabilities"][name] for name in predictor.class_names] for r in results])
    assert np.abs(served - expected).max() < 1e-4
