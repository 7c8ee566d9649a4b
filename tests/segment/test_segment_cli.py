"""CLI smoke tests: ``hematovision segment`` (both forms) and ``hematovision count``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# tests/ is on sys.path (conftest.py): reuse the synthetic cells and fields of the unit tests.
from test_segment_clustering import synthetic_cell
from test_segment_field import DIAMETER, synthetic_field

from hematovision.cli import main


@pytest.fixture()
def cell_images(tmp_path: Path) -> Path:
    folder = tmp_path / "cells"
    folder.mkdir()
    for seed, size in enumerate((48, 60)):
        image, _ = synthetic_cell(size=size, seed=seed)
        Image.fromarray(image).save(folder / f"cell{seed}.png")
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(folder / "blank.png")  # grayscale, no cell
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_segment_ekmeans_writes_masks_overlays_and_features(cell_images: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["segment", str(cell_images), "--method", "ekmeans", "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out / "cell1_mask.png"))
    assert Image.open(out / "cell1_mask.png").mode == "L"
    assert mask.shape == (60, 60) and set(np.unique(mask)) == {0, 1, 2}
    assert Image.open(out / "cell1_overlay.png").size == (60, 60)
    assert not np.asarray(Image.open(out / "blank_mask.png")).any()
    with open(out / "features.csv") as handle:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(handle)}
    assert rows["blank.png"]["status"] == "no white cell found"
    assert rows["broken.png"]["status"].startswith("unreadable")
    assert int(rows["cell0.png"]["nucleus_area"]) > 0 and float(rows["cell0.png"]["nc_ratio"]) > 0
    printed = capsys.readouterr().out
    assert "no white cell found" in printed and "skipped" in printed


def test_segment_unet_needs_a_model(cell_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["segment", str(cell_images / "cell0.png"), "--method", "unet", "--out", str(tmp_path / "o")]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_segment_train_then_segment_with_the_unet(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(10):
        image, labels = synthetic_cell(size=40, seed=i)
        Image.fromarray(image).save(data / "images" / f"{i:03d}.png")
        Image.fromarray((labels * 127.5).astype(np.uint8)).save(data / "masks" / f"{i:03d}.png")
    run = tmp_path / "unet"
    code = main(["segment", "train", "--data", str(data), "--out", str(run), "--epochs", "1",
                 "--image-size", "32", "--width", "4", "--threads", "1"])
    assert code == 0
    assert (run / "test_metrics.json").is_file() and (run / "unet.safetensors").is_file()
    out = tmp_path / "masks"
    assert main(["segment", str(data / "images" / "000.png"), "--method", "unet", "--model", str(run), "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "000_mask.png")).shape == (40, 40)


def test_segment_train_without_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["segment", "train", "--out", str(tmp_path / "r")]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_segment_train_with_mismatched_mask_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(6):
        Image.fromarray(synthetic_cell(size=40, seed=i)[0]).save(data / "images" / f"{i}.png")
        Image.fromarray(np.zeros((40, 41 if i == 3 else 40), np.uint8)).save(data / "masks" / f"{i}.png")
    assert main(["segment", "train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1"]) == 2
    assert "mask is 41x40 but its image is 40x40" in capsys.readouterr().err


def _write_fields(folder: Path) -> Path:
    folder.mkdir()
    image, _ = synthetic_field()
    Image.fromarray(image).save(folder / "field.png")
    Image.fromarray(np.full((60, 80, 3), 230, np.uint8)).save(folder / "empty.png")
    return folder


def test_count_without_a_classifier(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fields = _write_fields(tmp_path / "fields")
    out = tmp_path / "count"
    assert main(["count", str(fields), "--out", str(out), "--rbc-diameter", str(DIAMETER)]) == 0
    with open(out / "counts.csv") as handle:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(handle)}
    assert (rows["field.png"]["wbc"], rows["field.png"]["rbc"], rows["field.png"]["platelet"]) == ("2", "7", "3")
    assert rows["empty.png"]["note"] == "no white cell found"
    assert (out / "field_boxes.png").is_file()
    assert "not typed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic import make_dataset

    root = tmp_path_factory.mktemp("cls")
    data = make_dataset(root / "data", per_class=8, size=32)
    run = root / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--mode", "finetune", "--backbone", "tiny_cnn",
                 "--epochs", "1", "--image-size", "32", "--no-pretrained"])
    # Our own training failing is a test failure, not a reason to skip.
    assert code == 0, "hematovision train failed on the tiny synthetic dataset (see the captured output)"
    assert (run / "model_card.json").is_file()
    return run


def test_count_with_a_classifier_writes_the_differential(tmp_path: Path, tiny_classifier: Path) -> None:
    fields = _write_fields(tmp_path / "fields")
    out = tmp_path / "count"
    code = main(["count", str(fields), "--model", str(tiny_classifier), "--out", str(out),
                 "--rbc-diameter", str(DIAMETER), "--review-below", "1.01"])
    assert code == 0
    with open(out / "differential.csv") as handle:
        table = list(csv.DictReader(handle))
    assert sum(int(r["count"]) for r in table) == 2
    assert abs(sum(float(r["percent"]) for r in table) - 100) < 0.1
    markdown = (out / "differential.md").read_text()
    assert "Cells to review (top probability < 1.01): 2" in markdown and "empty.png" in markdown
    assert len(list((out / "review").glob("*.png"))) == 2
    assert "data:image/png;base64," in (out / "differential.html").read_text()
    with open(out / "cells.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_count_with_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fields = _write_fields(tmp_path / "fields")
    assert main(["count", str(fields), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a classifier run folder" in capsys.readouterr().err
