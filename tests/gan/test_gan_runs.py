"""``run.json`` of a GAN run folder: classes trained by separate calls are merged, not replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hematovision.errors import HematoVisionError
from hematovision.gan.runs import RUN_FILE, check_config, record_run
from hematovision.gan.train import GanConfig


def _card(iterations: int, seconds: float, images: int) -> dict:
    return {"iterations": iterations, "train_seconds": seconds, "num_train_images": images, "config": {"size": 32},
            "losses": [1.0]}


def test_record_run_merges_classes_trained_by_separate_calls(tmp_path: Path) -> None:
    record_run(tmp_path, {"basophil": _card(10, 60.0, 5)}, source="split.csv", split_part="train")
    summary = record_run(tmp_path, {"neutrophil": _card(20, 30.04, 9)}, source="split.csv", split_part="train")
    assert summary == json.loads((tmp_path / RUN_FILE).read_text())
    assert summary["classes"] == {
        "basophil": {"iterations": 10, "train_seconds": 60.0, "num_train_images": 5},
        "neutrophil": {"iterations": 20, "train_seconds": 30.04, "num_train_images": 9},
    }
    assert summary["total_train_seconds"] == 90.0 and summary["config"] == {"size": 32}
    # Training a class again (e.g. resumed for more iterations) replaces its entry.
    summary = record_run(tmp_path, {"basophil": _card(40, 120.0, 5)}, source="data", split_part=None)
    assert summary["classes"]["basophil"]["iterations"] == 40 and set(summary["classes"]) == {"basophil", "neutrophil"}
    assert (summary["source"], summary["split_part"]) == ("data", None)


def test_unknown_augmentation_is_one_line_error() -> None:
    check_config(GanConfig(augment="translation,cutout"))
    with pytest.raises(HematoVisionError, match="unknown GAN augmentation"):
        check_config(GanConfig(augment="mixup"))
