"""Pieces of the web app on their own: upload checks, storage, micro-batching, settings, review policy."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.errors import HematoVisionError
from hematovision.export.calibrate import confidence_threshold_for, energy_scores, fit_mahalanobis
from hematovision.infer.policy import ReviewPolicy, mahalanobis_scores
from hematovision.serve.batching import MicroBatcher
from hematovision.serve.db import (
    ConflictError,
    Database,
    NotFoundError,
    PredictionRecord,
    ReviewError,
)
from hematovision.serve.settings import Settings
from hematovision.serve.uploads import (
    UploadError,
    UploadLimits,
    display_name,
    expand_uploads,
    is_safe_member_name,
    sniff,
)


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, format=fmt)
    return buffer.getvalue()


# ---- uploads ----

@pytest.mark.parametrize("fmt, kind", [("PNG", "png"), ("JPEG", "jpeg"), ("GIF", "gif"), ("BMP", "bmp"),
                                       ("TIFF", "tiff"), ("WEBP", "webp")])
def test_sniff_by_content(fmt: str, kind: str) -> None:
    assert sniff(encoded(fmt)) == kind


def test_sniff_rejects_other_content() -> None:
    assert sniff(b"<svg xmlns='http://www.w3.org/2000/svg'/>") is None
    assert sniff(b"") is None
    assert sniff(b"PK\x03\x04rest") == "zip"


@pytest.mark.parametrize("name, safe", [("a.png", True), ("dir/a.png", True), ("./a.png", True),
                                        ("a/../b.png", True), ("../a.png", False), ("a/../../b.png", False),
                                        ("/abs.png", False), ("C:/a.png", False), ("a\\..\\b.png", False),
                                        ("", False), ("a\x00.png", False)])
def test_zip_member_names(name: str, safe: bool) -> None:
    assert is_safe_member_name(name) is safe


def test_display_name_strips_folders_and_control_characters() -> None:
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\Users\\x\\cell.png") == "cell.png"
    assert display_name("a\x00b\nc.png") == "abc.png"
    assert display_name("", "file-3") == "file-3"
    assert len(display_name("x" * 1000)) == 200


def test_expand_uploads_limits() -> None:
    png = encoded("PNG")
    limits = UploadLimits(max_file_bytes=10_000, max_files=3)
    assert [r.kind for r in expand_uploads([("a", png), ("b", png)], limits)] == ["png", "png"]
    with pytest.raises(UploadError) as error:
        expand_uploads([], limits)
    assert error.value.status == 400
    with pytest.raises(UploadError) as error:
        expand_uploads([("a", png)] * 4, limits)
    assert error.value.status == 413
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("secret.png", png)
        archive.setpassword(b"pw")
    # Python's zipfile cannot write encrypted members; flip the "encrypted" flag to get one.
    data = bytearray(buffer.getvalue())
    data[6] |= 0x1
    central = data.rfind(b"PK\x01\x02")
    data[central + 8] |= 0x1
    with pytest.raises(UploadError, match="cannot be unpacked|zip"):
        expand_uploads([("enc.zip", bytes(data))], limits)


# ---- database ----

def record(i: int, label: str = "monocyte") -> PredictionRecord:
    return PredictionRecord(f"{i}.png", f"{i:02d}/x.png", f"{i:064d}", 10, 12, label, 0.8,
                            {"monocyte": 0.8, "neutrophil": 0.2}, 0.5, i % 2 == 0, ["low"] if i % 2 == 0 else [])


def test_database_is_wal_and_survives_reopening(tmp_path: Path) -> None:
    db = Database(tmp_path / "hv.db")
    analysis = db.add_analysis("slide", "tiny", [record(0), record(1)])
    with sqlite3.connect(db.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = Database(tmp_path / "hv.db")
    stored = reopened.get_analysis(analysis)
    assert [p["filename"] for p in stored["predictions"]] == ["0.png", "1.png"]
    assert stored["predictions"][0]["review_reasons"] == ["low"] and stored["n_needs_review"] == 1


def test_database_review_rules(tmp_path: Path) -> None:
    db = Database(tmp_path / "hv.db")
    first = db.add_analysis("", "tiny", [record(0), record(1)])
    second = db.add_analysis("", "tiny", [record(2)])
    ids = [p["id"] for p in db.get_analysis(first)["predictions"]]
    allowed = ["monocyte", "neutrophil", "excluded"]
    assert db.review(first, {ids[0]: "neutrophil"}, "a", allowed) == 1
    assert db.review(first, {ids[0]: "monocyte"}, "b", allowed, expected_version=1) == 2
    with pytest.raises(ConflictError):
        db.review(first, {ids[0]: "monocyte"}, "c", allowed, expected_version=1)
    with pytest.raises(ReviewError):
        db.review(first, {ids[0]: "platelet"}, "c", allowed)
    other = db.get_analysis(second)["predictions"][0]["id"]
    with pytest.raises(NotFoundError):  # a prediction of another analysis: nothing of that id here (404)
        db.review(first, {other: "monocyte"}, "c", allowed)
    with pytest.raises(NotFoundError):
        db.review(999, {ids[0]: "monocyte"}, "c", allowed)
    log = db.review_log(first)
    assert [(r["label"], r["previous_label"], r["reviewer"]) for r in log] == [
        ("neutrophil", "monocyte", "a"), ("monocyte", "neutrophil", "b")]


def test_differential_counts_final_labels(tmp_path: Path) -> None:
    db = Database(tmp_path / "hv.db")
    analysis = db.add_analysis("", "tiny", [record(0), record(1), record(2, "neutrophil")])
    ids = [p["id"] for p in db.get_analysis(analysis)["predictions"]]
    db.review(analysis, {ids[0]: "excluded", ids[1]: "neutrophil"}, "r", ["monocyte", "neutrophil", "excluded"])
    diff = db.get_analysis(analysis)["differential"]
    assert diff == {"total": 2, "excluded": 1, "counts": {"monocyte": 0, "neutrophil": 2},
                    "percent": {"monocyte": 0.0, "neutrophil": 100.0}}


# ---- micro-batching ----

def test_micro_batcher_groups_concurrent_requests() -> None:
    calls: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [item * 10 for item in items]

    async def main() -> list[list[int]]:
        batcher = MicroBatcher(process, max_batch_size=4, max_wait_ms=20)
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(6)), batcher.submit([100, 101]))
        await batcher.close()
        return results

    results = asyncio.run(main())
    assert results == [[0], [10], [20], [30], [40], [50], [1000, 1010]]
    assert sum(len(c) for c in calls) == 8 and max(len(c) for c in calls) == 4
    assert len(calls) <= 3  # 8 items in batches of at most 4, not 8 single calls


def test_micro_batcher_hands_errors_to_every_waiter() -> None:
    def process(items: list[int]) -> list[int]:
        raise ValueError("model broke")

    async def main() -> None:
        batcher = MicroBatcher(process, max_batch_size=4, max_wait_ms=5)
        outcomes = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
        await batcher.close()

    asyncio.run(main())


# ---- settings ----

def test_settings_from_environment_and_overrides(tmp_path: Path) -> None:
    env = {"HEMATOVISION_MAX_FILES": "7", "HEMATOVISION_GRADCAM": "false", "HEMATOVISION_DB": str(tmp_path / "x.db"),
           "HEMATOVISION_CONFIDENCE_THRESHOLD": "0.8"}
    settings = Settings.from_env(env, max_files=None, port=9000)
    assert settings.max_files == 7 and settings.gradcam is False and settings.port == 9000
    assert settings.db == tmp_path / "x.db" and settings.storage_dir == tmp_path / "images"
    assert settings.confidence_threshold == 0.8
    assert Settings.from_env(env, max_files=3).max_files == 3  # flags win
    with pytest.raises(HematoVisionError, match="HEMATOVISION_MAX_FILES"):
        Settings.from_env({"HEMATOVISION_MAX_FILES": "many"})
    with pytest.raises(HematoVisionError, match="backend"):
        Settings(backend="gpu")


# ---- review policy ----

def test_confidence_threshold_reaches_the_target_accuracy() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence  # right about as often as it is confident
    threshold, coverage, accuracy = confidence_threshold_for(confidence, correct, 0.9)
    accepted = confidence >= threshold
    assert accuracy == pytest.approx(correct[accepted].mean()) and accuracy >= 0.9
    assert coverage == pytest.approx(accepted.mean())
    # The threshold is the lowest that works: one notch lower misses the target.
    lower = np.sort(confidence[confidence < threshold])[-1]
    assert correct[confidence >= lower].mean() < 0.9
    # Never below the floor, and a target nothing reaches accepts nothing.
    assert confidence_threshold_for(np.ones(10), np.ones(10, bool), 0.9)[0] == 1.0
    assert confidence_threshold_for(np.full(10, 0.9), np.zeros(10, bool), 0.9)[1] == 0.0


def test_mahalanobis_separates_far_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 200)
    centres = rng.normal(0, 5, (3, 20))
    features = centres[labels] + rng.normal(0, 1, (600, 20))
    means, precision = fit_mahalanobis(features, labels)
    inside = mahalanobis_scores(centres[labels[:30]] + rng.normal(0, 1, (30, 20)), means, precision)
    outside = mahalanobis_scores(rng.normal(0, 1, (30, 20)) + 30, means, precision)
    assert inside.max() < outside.min()
    assert np.median(inside) == pytest.approx(1.0, abs=0.35)  # about 1 per dimension in distribution
    policy = ReviewPolicy(0.6, float(np.quantile(inside, 0.95)), means, precision, calibrated=True,
                          info={"target_accuracy": 0.98})
    policy.save(tmp_path)
    loaded = ReviewPolicy.load(tmp_path)
    assert loaded is not None and loaded.calibrated
    np.testing.assert_allclose(loaded.ood_scores(features[:5]), policy.ood_scores(features[:5]), rtol=1e-4)
    assert loaded.reasons(0.9, float(outside[0]))[0].startswith("unlike")
    assert loaded.reasons(0.5, float(inside[0])) == ["low confidence (0.50 < 0.60)"]
    assert ReviewPolicy.load(tmp_path / "missing") is None


def test_energy_score_is_higher_for_flat_logits() -> None:
    peaked = np.array([[10.0, 0.0, 0.0]])
    flat = np.array([[0.0, 0.0, 0.0]])
    assert energy_scores(flat)[0] > energy_scores(peaked)[0]


def test_engine_refuses_a_policy_of_another_model() -> None:
    from types import SimpleNamespace

    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model
    from hematovision.serve.engine import Engine

    predictor = SimpleNamespace(class_names=["a", "b"], prep=Preprocessing(32), model=create_model("tiny_cnn", 2),
                                temperature=1.0, card={})
    wrong = ReviewPolicy(0.5, 1.0, np.zeros((2, 7), np.float32), np.eye(7, dtype=np.float32), calibrated=True)
    with pytest.raises(HematoVisionError, match="export"):
        Engine(predictor, policy=wrong, threads=1)
    predictor.class_names = ["a", "b", "c"]
    with pytest.raises(HematoVisionError, match="3 classes"):
        Engine(predictor, threads=1)


def test_serve_command_reports_a_missing_run_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hematovision.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing"), "--db", str(tmp_path / "hv.db")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hematovision: error:") and "missing" in error and len(error.splitlines()) == 1


def test_engine_runs_a_large_micro_batch_in_calls_of_at_most_model_chunk_images() -> None:
    from types import SimpleNamespace

    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model
    from hematovision.serve import engine as engine_module

    predictor = SimpleNamespace(class_names=["a", "b"], prep=Preprocessing(32), model=create_model("tiny_cnn", 2).eval(),
                                temperature=1.0, card={})
    engine = engine_module.Engine(predictor, threads=1)
    calls: list[int] = []
    wrapped = engine._wrapped
    engine._wrapped = lambda batch: (calls.append(len(batch)), wrapped(batch))[1]
    images = np.random.default_rng(0).integers(0, 256, (2 * engine_module.MODEL_CHUNK + 3, 32, 32, 3), np.uint8)
    logits, features = engine.forward(images)
    assert calls == [engine_module.MODEL_CHUNK, engine_module.MODEL_CHUNK, 3]
    assert logits.shape == (len(images), 2) and len(features) == len(images)
    one_by_one = np.concatenate([engine.forward(image[None])[0] for image in images])
    np.testing.assert_allclose(logits, one_by_one, atol=1e-5)
