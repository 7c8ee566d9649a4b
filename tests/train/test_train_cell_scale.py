"""``hematovision train --cell-scale``: the setting reaches the preprocessing, the card and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hematovision.cli import main


def test_cell_scale_is_stored_in_the_card(synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune",
                 "--backbone", "tiny_cnn", "--no-pretrained", "--image-size", "32", "--epochs", "1",
                 "--batch-size", "8", "--cell-scale", "0.5"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["preprocessing"]["cell_scale"] == 0.5
    assert json.loads((out / "train_config.json").read_text())["cell_scale"] == 0.5
    # Prediction reads the preprocessing from the card, so it rescales the same way.
    from hematovision.infer.predictor import Predictor

    assert Predictor.from_run_dir(out).prep.cell_scale == 0.5


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "half"])
def test_cell_scale_outside_0_1_is_refused(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--cell-scale", bad])
    assert exit_info.value.code == 2
    assert "--cell-scale" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
