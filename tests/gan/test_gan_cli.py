"""``hematovision gan train|sample|report`` end to end on a tiny made-up dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from hematovision.cli import main
from hematovision.data.folder import scan_image_folder
from hematovision.data.splits import write_split_csv

TRAIN = ["--size", "32", "--iterations", "2", "--width", "4", "--batch-size", "4", "--threads", "1", "--no-progress"]


def _make_dataset(root: Path, counts: dict[str, int]) -> Path:
    """Disk "cells" on a pale background; each class has its own stain colour."""
    rng = np.random.default_rng(0)
    colours = {"basophil": (70, 30, 120), "neutrophil": (170, 90, 170)}
    yy, xx = np.mgrid[:40, :40]
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            image = np.full((40, 40, 3), 225, np.uint8) + rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
            radius = rng.uniform(8, 13)
            image[(yy - 20) ** 2 + (xx - 20) ** 2 < radius**2] = colours[label]
            Image.fromarray(image).save(root / label / f"{label}_{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gan")
    data = _make_dataset(root / "data", {"basophil": 10, "neutrophil": 16})
    assert main(["gan", "train", "--data", str(data), "--all", "--out", str(root / "run"), *TRAIN]) == 0
    return data, root / "run"


def test_train_writes_one_run_per_class(trained) -> None:
    _, run = trained
    summary = json.loads((run / "run.json").read_text())
    assert set(summary["classes"]) == {"basophil", "neutrophil"}
    for name in ("basophil", "neutrophil"):
        card = json.loads((run / name / "gan_card.json").read_text())
        assert card["iterations"] == 2 and card["config"]["size"] == 32


def test_sample_writes_class_folders_reproducibly(trained, tmp_path) -> None:
    _, run = trained
    assert main(["gan", "sample", str(run), "--n", "3", "--out", str(tmp_path / "a")]) == 0
    assert main(["gan", "sample", str(run), "--n", "3", "--out", str(tmp_path / "b")]) == 0
    folder = scan_image_folder(tmp_path / "a")  # loads like any dataset
    assert folder.class_names == ["basophil", "neutrophil"] and len(folder.samples) == 6
    for sample in folder.samples:
        twin = tmp_path / "b" / sample.path.relative_to(tmp_path / "a")
        assert sample.path.read_bytes() == twin.read_bytes()
        assert Image.open(sample.path).size == (32, 32)


def test_train_errors_are_one_line_exit_2(trained, tmp_path, capsys) -> None:
    data, run = trained
    assert main(["gan", "train", "--data", str(data), "--class", "basophil", "--out", str(run), *TRAIN]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["gan", "train", "--data", str(data), "--class", "eosinophil", "--out", str(tmp_path), *TRAIN]) == 2
    assert "eosinophil" in capsys.readouterr().err
    assert main(["gan", "sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "s")]) == 2
    assert main(["gan", "train", "--data", str(data), "--class", "basophil", "--out", str(tmp_path / "new"),
                 "--augment", "mixup", *TRAIN]) == 2
    assert "unknown GAN augmentation" in capsys.readouterr().err
    assert main(["gan", "train", "--data", str(data), "--class", "basophil", "--out", str(tmp_path / "new"),
                 "--class-loss", "0.5", *TRAIN]) == 2
    assert "options of --arch projected" in capsys.readouterr().err


class _PixelFeatures:
    """A cheap stand-in for the ImageNet backbone: mean colour and a coarse thumbnail."""

    config: ClassVar[dict] = {"backbone": "pixels", "preprocessing": {"image_size": 32}}

    def extract(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        small = images.reshape(len(images), 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(images), -1)
        return np.concatenate([images.mean(axis=(1, 2)), small], axis=1).astype(np.float32) / 255.0


def test_report_runs_all_five_checks(trained, tmp_path) -> None:
    from hematovision.gan.report import build_report

    data, run = trained
    samples = scan_image_folder(data).samples
    # The GANs above saw every image; for this plumbing test only the split's shape matters.
    parts = ["test" if i % 3 == 0 else "train" for i in range(len(samples))]
    split = write_split_csv(tmp_path / "split.csv", samples, parts, [str(i) for i in range(len(samples))])
    path = build_report(run, split, tmp_path / "report", n_synthetic=20, extractor=_PixelFeatures())
    text = path.read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## Diversity", "## 5."):
        assert heading in text
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["test_counts"] == {"basophil": 4, "neutrophil": 5}
    # Basophil (6 training images) is topped up to neutrophil's 11.
    assert metrics["check5_augmentation"]["synthetic_added"] == {"basophil": 5}
    assert 0.0 <= metrics["check1_real_to_synthetic"]["overall"] <= 1.0
    assert all(0.0 <= entry["synthetic"] <= 2.0 and entry["real_train"] > 0 for entry in metrics["diversity"].values())
    for name in ("real_vs_synthetic.png", "frechet.png", "nearest_distances.png", "closest_pairs.png",
                 "augmentation_recall.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    # Features are cached by content: asking again with the same key does not extract again.
    from hematovision.gan.report import _features

    class Counting(_PixelFeatures):
        calls = 0

        def extract(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
            Counting.calls += 1
            return super().extract(images)

    images = np.zeros((3, 32, 32, 3), np.uint8)
    first = _features(tmp_path / "cache", "real", images, {"k": 1}, Counting())
    again = _features(tmp_path / "cache", "real", images, {"k": 1}, Counting())
    assert Counting.calls == 1 and np.array_equal(first, again)
    _features(tmp_path / "cache", "real", images, {"k": 2}, Counting())
    assert Counting.calls == 2


def test_discriminator_and_augment_options_reach_the_card(trained, tmp_path) -> None:
    import json

    data, run = trained
    config = json.loads((run / "basophil" / "gan_card.json").read_text())["config"]
    assert (config["spectral_norm"], config["minibatch_std"], config["augment"]) == (False, True, "translation,cutout")
    out = tmp_path / "plain"
    assert main(["gan", "train", "--data", str(data), "--class", "basophil", "--out", str(out), "--no-minibatch-std",
                 "--spectral-norm", "--augment", "color", *TRAIN]) == 0
    config = json.loads((out / "basophil" / "gan_card.json").read_text())["config"]
    assert (config["spectral_norm"], config["minibatch_std"], config["augment"]) == (True, False, "color")
