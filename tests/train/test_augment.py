"""``hematovision train --stain-norm`` and ``--augment-copies`` (hematovision.train.augment)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_dataset

from hematovision.cli import main
from hematovision.data.transforms import Preprocessing
from hematovision.train.augment import AUGMENTATION, augmented_copy, copy_key


@pytest.fixture()
def small_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", per_class=8, size=40)


def _frozen(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--mode", "frozen", "--backbone", "efficientnet_lite0",
                 "--image-size", "32", *extra])


def _store_rows(home: Path) -> int:
    metas = list((home / "features").glob("*/meta.json"))
    assert len(metas) == 1, metas
    return json.loads(metas[0].read_text())["shape"][0]


def test_augment_copies_fit_the_head_on_originals_and_copies_and_are_recorded(
        small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HEMATOVISION_HOME", str(home))
    out = tmp_path / "copies"
    assert _frozen(small_data, out, "--augment-copies", "2") == 0
    card = json.loads((out / "model_card.json").read_text())
    n_train = card["data"]["n_images"]["train"]
    assert card["data"]["augment_copies"] == {
        "copies": 2, "strength": 1.0, "augmentation": AUGMENTATION, "seeded_by": "file sha256, copy number and --seed",
        "parts": "train only (val and test untouched)", "train_rows": 3 * n_train}
    assert json.loads((out / "train_config.json").read_text())["augment_copies"] == 2
    # The store holds every original and two copies of each training image (val and test have none).
    originals = sum(card["data"]["n_images"].values())
    assert _store_rows(home) == originals + 2 * n_train
    # A second run with the same settings reads the copies back instead of making them again.
    assert _frozen(small_data, tmp_path / "again", "--augment-copies", "2") == 0
    assert _store_rows(home) == originals + 2 * n_train
    again = json.loads((tmp_path / "again" / "model_card.json").read_text())
    assert again["frozen"]["head"]["C"] == card["frozen"]["head"]["C"]
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["log_loss"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["log_loss"], abs=1e-6)
    # Other settings are other copies: a new strength adds rows.
    assert _frozen(small_data, tmp_path / "weak", "--augment-copies", "1", "--augment-strength", "0.5") == 0
    assert _store_rows(home) == originals + 3 * n_train
    # The head was fitted on the copies too: its feature standardisation is not the originals' alone.
    assert _frozen(small_data, tmp_path / "none") == 0
    from safetensors.numpy import load_file

    with_copies = load_file(out / "model.safetensors")["feature_mean"]
    without = load_file(tmp_path / "none" / "model.safetensors")["feature_mean"]
    assert not np.allclose(with_copies, without, atol=1e-4)


def test_without_copies_the_card_and_config_say_nothing_new(small_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    out = tmp_path / "plain"
    assert _frozen(small_data, out) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert "augment_copies" not in card["data"] and "stain" not in card["preprocessing"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["augment_copies"] == 0 and config["stain_norm"] is None


def test_stain_norm_fits_a_reference_that_prediction_applies(small_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    out = tmp_path / "stain"
    assert _frozen(small_data, out, "--stain-norm", "reinhard", "--augment-copies", "1") == 0
    card = json.loads((out / "model_card.json").read_text())
    stain = card["preprocessing"]["stain"]
    assert stain["method"] == "reinhard" and stain["n_images"] == card["data"]["n_images"]["train"]
    assert json.loads((out / "train_config.json").read_text())["stain_norm"] == "reinhard"
    # Evaluation goes through Preprocessing.prepare with the card's reference: the run's own
    # test metrics come back only if the images are normalised exactly as in training.
    assert main(["evaluate", str(out), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["log_loss"] == pytest.approx(json.loads((out / "metrics.json").read_text())["log_loss"], abs=1e-4)


def test_augment_copies_are_for_frozen_mode(small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(small_data), "--out", str(tmp_path / "ft"), "--mode", "finetune",
                 "--backbone", "tiny_cnn", "--no-pretrained", "--image-size", "32", "--augment-copies", "1"]) == 2
    assert "--augment-copies is for frozen mode" in capsys.readouterr().err


def test_a_copy_is_seeded_by_its_image_its_number_and_the_seed() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 240, (32, 32, 3), dtype=np.uint8)
    prep = Preprocessing(32)
    digest, other = "ab" * 32, "cd" * 32
    first = augmented_copy(image, digest, 1, 1.0, 0, prep)
    assert np.array_equal(first, augmented_copy(image, digest, 1, 1.0, 0, prep))
    for changed in (augmented_copy(image, digest, 2, 1.0, 0, prep), augmented_copy(image, other, 1, 1.0, 0, prep),
                    augmented_copy(image, digest, 1, 1.0, 1, prep)):
        assert not np.array_equal(first, changed)
    assert copy_key(digest, 1, 1.0, 0) != copy_key(digest, 1, 0.5, 0) != copy_key(digest, 2, 0.5, 0)
