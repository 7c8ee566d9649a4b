"""The run folder's contract (``hematovision.run``): a typed card, checked weights, one clear error each.

Every way a card or weight file can be broken, foreign or tampered with must end as one
``RunFolderError`` line in the library, exit code 2 in the CLI, and never as a traceback or a
"nan" answer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hematovision.cli import main
from hematovision.infer.predictor import NonFiniteOutputError, Predictor
from hematovision.run import (
    CARD_FILE,
    CARD_FORMAT,
    MODEL_FILE,
    ModelCard,
    RunFolderError,
    load_run,
    read_card,
    read_split,
    save_weights,
)


@pytest.fixture()
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    copy_dir = tmp_path / "run"
    shutil.copytree(tiny_run, copy_dir)
    return copy_dir


def _card(run: Path) -> dict:
    return json.loads((run / CARD_FILE).read_text())


def _write_card(run: Path, card: dict) -> None:
    (run / CARD_FILE).write_text(json.dumps(card))


def test_card_round_trips_and_records_the_weights_hash(tiny_run: Path) -> None:
    card = read_card(tiny_run)
    assert isinstance(card, ModelCard) and card.format == CARD_FORMAT
    assert card.class_names == ["eosinophil", "lymphocyte", "neutrophil"] and card.mode == "finetune"
    assert card.weights_sha256 == hashlib.sha256((tiny_run / MODEL_FILE).read_bytes()).hexdigest()
    assert ModelCard.from_dict(card.to_dict()) == card
    assert json.loads(json.dumps(card.to_dict())) == _card(tiny_run)  # on disk is exactly the typed card


def test_format_1_cards_migrate(run_copy: Path) -> None:
    # A card as the code before the run-folder owner wrote it: views at the top and under "frozen".
    old = _card(run_copy)
    old["format"] = 1
    old["model_kwargs"] = {}
    _write_card(run_copy, old)
    card = read_card(run_copy)
    assert card.format == CARD_FORMAT and card.tta == old["tta"]
    frozen = {**old, "mode": "frozen", "tta": 4,
              "frozen": {"taps": [2, 3], "num_features": 10, "hidden": 0, "head": {"C": 0.05}, "tta": 4}}
    del frozen["tta"]
    migrated = ModelCard.from_dict(frozen)
    assert migrated.tta == 4 and migrated.frozen is not None and migrated.frozen.num_features == 10


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(temperature=0), "temperature"),
    (lambda c: c.update(temperature=float("nan")), "temperature"),
    (lambda c: c.update(class_names=["only_one"]), "class_names"),
    (lambda c: c.update(class_names=["a", "a", "b"]), "duplicates"),
    (lambda c: c.update(mode="magic"), "mode"),
    (lambda c: c.update(tta=3), "tta"),
    (lambda c: c.update(preprocessing={"image_size": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}), "preprocessing"),
    (lambda c: c.update(preprocessing={"image_size": 32, "mean": [0, 0, 0], "std": [0, 1, 1]}), "preprocessing"),
    (lambda c: c.pop("class_names"), "incomplete"),
    (lambda c: c.update(format=99), "newer"),
    (lambda c: c.update(format="1"), "format"),
    (lambda c: c.update(surprise=1), "surprise"),
    (lambda c: c.update(files={MODEL_FILE: {"sha256": "not-a-hash"}}), "sha256"),
    (lambda c: c.update(mode="frozen"), "frozen"),
    (lambda c: c.update(few_shot_start={"steps": 5}), "few_shot_start"),  # not frozen, and no sha256 in files
    (lambda c: c.update(few_shot_start=[5]), "few_shot_start"),
])
def test_broken_cards_are_one_clear_error(run_copy: Path, change, message: str,
                                          capsys: pytest.CaptureFixture) -> None:
    card = copy.deepcopy(_card(run_copy))
    change(card)
    _write_card(run_copy, card)
    with pytest.raises(RunFolderError, match=message):
        read_card(run_copy)
    assert main(["predict", str(run_copy), str(run_copy), "--out", str(run_copy / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe not json"])
def test_card_that_is_not_a_json_object(run_copy: Path, content: bytes) -> None:
    (run_copy / CARD_FILE).write_bytes(content)
    with pytest.raises(RunFolderError, match=CARD_FILE):
        read_card(run_copy)


def test_flipped_bytes_in_the_weights_are_refused(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    data = bytearray((run_copy / MODEL_FILE).read_bytes())
    data[-10] ^= 0xFF
    data[-20] ^= 0xFF
    (run_copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match="changed or damaged"):
        load_run(run_copy)
    assert main(["predict", str(run_copy), str(run_copy), "--out", str(run_copy / "p.csv")]) == 2
    assert "changed or damaged" in capsys.readouterr().err


def test_truncated_weights_are_refused_even_without_a_recorded_hash(run_copy: Path) -> None:
    data = (run_copy / MODEL_FILE).read_bytes()
    (run_copy / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFolderError, match="changed or damaged"):
        load_run(run_copy)
    card = _card(run_copy)
    card.pop("files")
    _write_card(run_copy, card)
    with pytest.raises(RunFolderError, match="not a readable safetensors"):
        load_run(run_copy)


def test_nan_weights_are_refused(run_copy: Path) -> None:
    card, model = load_run(run_copy)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2).fill_(float("nan"))
    save_weights(model, run_copy / MODEL_FILE)
    # Re-sign the card so only the values, not the hash, are wrong.
    stored = _card(run_copy)
    stored["files"][MODEL_FILE]["sha256"] = hashlib.sha256((run_copy / MODEL_FILE).read_bytes()).hexdigest()
    _write_card(run_copy, stored)
    with pytest.raises(RunFolderError, match="NaN"):
        load_run(run_copy)


def test_non_finite_outputs_are_refused_not_answered(tiny_run: Path) -> None:
    predictor = Predictor.from_run_dir(tiny_run)
    image = np.full((32, 32, 3), 128, np.uint8)
    assert np.isfinite(predictor.predict([image])).all()
    with torch.no_grad():
        for parameter in predictor.model.parameters():
            parameter.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        predictor.predict([image])


def test_read_split_resolves_paths_relative_to_the_run(run_copy: Path, tmp_path: Path) -> None:
    parts = read_split(run_copy)
    assert set(parts) == {"train", "val", "test"}
    assert all(sample.path.is_file() for samples in parts.values() for sample in samples)
    # A run folder moved together with its images (relative paths) still finds them.
    (run_copy / "img").mkdir()
    first = parts["train"][0]
    shutil.copy(first.path, run_copy / "img" / "a.png")
    (run_copy / "split.csv").write_text("file,label,split,group\nimg/a.png,neutrophil,train,g\n")
    moved = read_split(run_copy)
    assert moved["train"][0].path == run_copy / "img" / "a.png"
