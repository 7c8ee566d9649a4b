"""The web app's JSON API and page, end to end with FastAPI's TestClient (tiny model, no data needed).

The ``client`` tests run once per database: SQLite and PostgreSQL (the ``database`` fixture, conftest.py).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
from auth_helpers import authorize  # tests/serve is on sys.path (no __init__.py)
from fastapi.testclient import TestClient
from PIL import Image

from hematovision.data.classes import WBC5
from hematovision.data.transforms import Preprocessing
from hematovision.infer.policy import ReviewPolicy
from hematovision.models import create_model
from hematovision.serve.app import create_app
from hematovision.serve.engine import Engine
from hematovision.serve.settings import Settings


def fake_predictor(seed: int = 0) -> SimpleNamespace:
    """What ``Predictor.from_run_dir`` gives, built from an untrained tiny_cnn."""
    import torch

    torch.manual_seed(seed)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn", "mode": "finetune"})


def png_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed))).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture()
def client(tmp_path: Path, database: Path | str) -> TestClient:
    settings = Settings(db=database, storage=tmp_path / "images", confidence_threshold=0.5)
    with TestClient(create_app(settings, predictor=fake_predictor()), base_url="http://localhost") as test_client:
        yield authorize(test_client)  # user "tester", an admin, by API token


def post_images(client: TestClient, images: list[tuple[str, bytes]], sample: str | None = None):
    data = {"sample": sample} if sample is not None else None
    return client.post("/api/v1/predict", files=[("files", (name, data_, "application/octet-stream"))
                                                 for name, data_ in images], data=data)


def test_health_and_model_card(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "backend": "pytorch", "classes": 5,
                                            "mean_batch_size": None}
    post_images(client, [("a.png", png_bytes()), ("b.png", png_bytes(1))])
    assert client.get("/health").json()["mean_batch_size"] == 2.0  # one request's images share a batch
    model = client.get("/api/v1/model").json()
    assert model["class_names"] == list(WBC5)
    assert model["preprocessing"]["image_size"] == 32
    assert model["review_policy"]["confidence_threshold"] == 0.5
    assert model["card"]["backbone"] == "tiny_cnn"


def test_predict_one_image_answers_and_stores(client: TestClient, tmp_path: Path) -> None:
    response = post_images(client, [("cell.png", png_bytes())], sample="slide 7")
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    assert result["filename"] == "cell.png"
    assert result["label"] in WBC5
    assert set(result["probabilities"]) == set(WBC5)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))
    assert result["needs_review"] == (result["confidence"] < 0.5)
    assert (result["width"], result["height"]) == (48, 40)
    # Stored under a server-chosen, content-derived name; the client's name is only shown.
    stored = list((tmp_path / "images").rglob("*.png"))
    assert [p.name for p in stored] == [f"{result['sha256']}.png"]
    analysis = client.get(f"/api/v1/analyses/{body['analysis_id']}").json()
    assert analysis["sample"] == "slide 7"
    assert analysis["predictions"][0]["sha256"] == result["sha256"]
    assert "stored_name" not in analysis["predictions"][0]


def test_predict_many_and_zip_keeps_order(client: TestClient) -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("batch/a.jpg", jpeg_bytes(1))
        zipped.writestr("batch/b.png", png_bytes(2))
        zipped.writestr("__MACOSX/._a.jpg", b"junk")  # metadata some zip tools add: skipped
    response = post_images(client, [("first.png", png_bytes(0)), ("cells.zip", archive.getvalue())])
    assert response.status_code == 200, response.text
    names = [r["filename"] for r in response.json()["results"]]
    assert names == ["first.png", "cells.zip/a.jpg", "cells.zip/b.png"]
    assert response.json()["differential"]["total"] == 3


def test_same_image_twice_gives_same_prediction(client: TestClient) -> None:
    results = post_images(client, [("a.png", png_bytes(5)), ("b.png", png_bytes(5))]).json()["results"]
    assert results[0]["probabilities"] == pytest.approx(results[1]["probabilities"])


def test_review_confirm_correct_and_differential(client: TestClient) -> None:
    body = post_images(client, [(f"{i}.png", png_bytes(i)) for i in range(4)]).json()
    ids = [r["id"] for r in body["results"]]
    predicted = body["results"][0]["label"]
    other = next(c for c in WBC5 if c != body["results"][1]["label"])
    response = client.post(f"/api/v1/analyses/{body['analysis_id']}/review", json={
        "expected_version": 0,
        "labels": [{"prediction_id": ids[0], "label": predicted},  # confirm
                   {"prediction_id": ids[1], "label": other},  # correct
                   {"prediction_id": ids[2], "label": "excluded"}],  # not a white cell
    })
    assert response.status_code == 200, response.text
    analysis = response.json()
    assert analysis["review_status"] == "partial" and analysis["n_reviewed"] == 3 and analysis["version"] == 1
    by_id = {p["id"]: p for p in analysis["predictions"]}
    assert by_id[ids[1]]["reviewed_label"] == other and by_id[ids[1]]["final_label"] == other
    assert by_id[ids[1]]["label"] == body["results"][1]["label"]  # the model's answer is kept
    assert by_id[ids[0]]["reviewer"] == "tester"  # the logged-in user
    diff = analysis["differential"]
    assert diff["excluded"] == 1 and diff["total"] == 3
    expected = {c: 0 for c in WBC5}
    for p in analysis["predictions"]:
        if p["final_label"] != "excluded":
            expected[p["final_label"]] += 1
    assert diff["counts"] == expected
    assert sum(diff["percent"].values()) == pytest.approx(100.0)
    # Finish the review: the status follows.
    client.post(f"/api/v1/analyses/{body['analysis_id']}/review",
                json={"labels": [{"prediction_id": ids[3], "label": WBC5[0]}], "expected_version": 1})
    assert client.get(f"/api/v1/analyses/{body['analysis_id']}").json()["review_status"] == "reviewed"


def test_history_search_paging_and_status(client: TestClient) -> None:
    for i in range(5):
        post_images(client, [(f"cell_{i}.png", png_bytes(i))], sample=f"patient-{i % 2}")
    page = client.get("/api/v1/analyses", params={"page_size": 2}).json()
    assert page["total"] == 5 and [a["id"] for a in page["items"]] == [5, 4]
    last = client.get("/api/v1/analyses", params={"page_size": 2, "page": 3}).json()
    assert [a["id"] for a in last["items"]] == [1]
    assert client.get("/api/v1/analyses", params={"q": "patient-1"}).json()["total"] == 2
    assert client.get("/api/v1/analyses", params={"q": "PATIENT-1"}).json()["total"] == 2  # case ignored, both databases
    assert client.get("/api/v1/analyses", params={"q": "cell_3"}).json()["items"][0]["id"] == 4
    assert client.get("/api/v1/analyses", params={"q": "%"}).json()["total"] == 0  # LIKE wildcards are literal
    pid = client.get("/api/v1/analyses/2").json()["predictions"][0]["id"]
    client.post("/api/v1/analyses/2/review", json={"labels": [{"prediction_id": pid, "label": "monocyte"}],
                                                   "expected_version": 0})
    reviewed = client.get("/api/v1/analyses", params={"status": "reviewed"}).json()
    assert [a["id"] for a in reviewed["items"]] == [2]
    assert client.get("/api/v1/analyses", params={"status": "unreviewed"}).json()["total"] == 4


def test_csv_exports(client: TestClient) -> None:
    body = post_images(client, [("=cmd|calc.png", png_bytes(1)), ("b.png", png_bytes(2))], sample="S").json()
    response = client.get(f"/api/v1/analyses/{body['analysis_id']}/export.csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["filename"] for r in rows] == ["'=cmd|calc.png", "b.png"]  # no spreadsheet formula injection
    assert rows[0]["predicted_label"] == body["results"][0]["label"]
    assert float(rows[0][f"p_{body['results'][0]['label']}"]) == pytest.approx(body["results"][0]["confidence"],
                                                                              abs=1e-4)
    diff = list(csv.reader(io.StringIO(client.get(
        f"/api/v1/analyses/{body['analysis_id']}/export.csv", params={"kind": "differential"}).text)))
    assert diff[0] == ["class", "count", "percent"] and diff[-2][:2] == ["total", "2"]


def test_stored_image_and_heatmap(client: TestClient) -> None:
    original = png_bytes(3, size=(500, 400))
    result = post_images(client, [("big.png", original)]).json()["results"][0]
    image = client.get(result["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # Stored re-encoded (uploads.reencode strips metadata and polyglots): the same pixels, not the same bytes.
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.content))), np.asarray(Image.open(io.BytesIO(original))))
    heatmap = client.get(result["heatmap_url"])
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
    shown = Image.open(io.BytesIO(heatmap.content))
    assert shown.size == (384, 307)  # the original's aspect, at most 384 px
    assert client.get(result["heatmap_url"], params={"label": "monocyte"}).status_code == 200
    assert client.get(result["heatmap_url"], params={"label": "platypus"}).status_code == 422


def test_page_history_and_docs_are_served_without_cdn(client: TestClient) -> None:
    for path in ("/", "/history", "/static/app.js", "/static/history.js", "/static/style.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "http://" not in response.text and "https://" not in response.text, path  # offline: no CDN
    assert 'id="dropzone"' in client.get("/").text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "http://" not in docs.text and "https://" not in docs.text
    if "swagger-ui-bundle.js" in docs.text:  # the bundle package is installed: its files are served locally
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    for path in ("/api/v1/predict", "/api/v1/analyses", "/api/v1/analyses/{analysis_id}",
                 "/api/v1/analyses/{analysis_id}/review", "/api/v1/model", "/health"):
        assert path in schema["paths"], path
    upload = schema["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["files"]["type"] == "array"


def test_calibrated_policy_flags_out_of_distribution(tmp_path: Path) -> None:
    predictor = fake_predictor()
    features = 16  # tiny_cnn's pooled width
    # An OOD model whose only class sits far from anything: every image is flagged as unusual.
    policy = ReviewPolicy(confidence_threshold=0.0, ood_threshold=1.0, class_means=np.full((1, features), 50.0,
                          dtype=np.float32), precision=np.eye(features, dtype=np.float32), calibrated=True)
    engine = Engine(predictor, policy=policy)
    with TestClient(create_app(Settings(db=tmp_path / "hv.db"), engine=engine), base_url="http://localhost") as client:
        authorize(client)
        result = post_images(client, [("a.png", png_bytes())]).json()["results"][0]
    assert result["needs_review"] and result["ood_score"] > 1.0
    assert len(result["review_reasons"]) == 1
    assert "unlike the training images" in result["review_reasons"][0]
