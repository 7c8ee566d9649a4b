"""``train --few-shot-start``: a frozen run keeps a network fine-tuned on its training cells, and
``adapt --data`` fine-tunes a new lab's cells from it instead of from ImageNet's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from two_domains import train_on_one_thread, write_lab

from hematovision.adapt import finetune as ft
from hematovision.cli import main
from hematovision.models import create_model
from hematovision.run import FEW_SHOT_START_FILE, MODEL_FILE, load_run, read_card

QUICK = ft.FineTuneSettings(steps=20, batch_size=8)


@pytest.fixture(scope="module")
def run_with_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_lab(tmp_path_factory.mktemp("train") / "lab", 20, seed=0)
    return train_on_one_thread(tmp_path_factory, tmp_path_factory.mktemp("runs") / "frozen", "--data", str(data),
                               "--mode", "frozen", "--backbone", "efficientnet_lite0", "--image-size", "48",
                               "--few-shot-start", "6")


@pytest.fixture(scope="module")
def lab_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lab(tmp_path_factory.mktemp("lab") / "cells", 8, seed=3, other=True)


def test_training_keeps_a_start_network_fine_tuned_on_the_training_split(run_with_start: Path) -> None:
    card, _ = load_run(run_with_start)
    assert card.mode == "frozen" and card.few_shot_start is not None
    assert card.few_shot_start["steps"] == 6 and card.few_shot_start["stages"] == ft.STAGES
    train_cells = sum(1 for line in (run_with_start / "split.csv").read_text().splitlines() if ",train," in line)
    assert card.few_shot_start["trained_on"] == f"the training split ({train_cells} cells)"
    assert set(card.files) == {MODEL_FILE, FEW_SHOT_START_FILE}

    start, started_from = ft.starting_network(card, None, run_with_start)
    imagenet = create_model("efficientnet_lite0", num_classes=len(card.class_names), pretrained=True)
    last = len(imagenet.blocks) - 1
    assert not torch.equal(start.blocks[last][0].conv_pw.weight, imagenet.blocks[last][0].conv_pw.weight)
    assert torch.equal(start.conv_stem.weight, imagenet.conv_stem.weight)  # the early stages stay ImageNet's
    assert "few-shot start" in started_from
    # Ready to score cells: batch norm on its running statistics, not on each batch's own.
    assert not any(module.training for module in start.modules())
    # Without the run folder (or without a start) the fine-tune starts from ImageNet, as before.
    imagenet_start, words = ft.starting_network(card, None, None)
    assert "ImageNet" in words and not imagenet_start.training


def test_few_shot_start_needs_frozen_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_lab(tmp_path / "lab", 4, seed=0)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--mode", "finetune",
                 "--few-shot-start", "5"])
    assert code == 2 and "--few-shot-start" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model_card.json").exists()


def test_adapt_fine_tunes_from_the_start_and_a_head_only_run_keeps_it(
        run_with_start: Path, lab_cells: Path, tmp_path: Path, one_thread: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hematovision.adapt import command

    monkeypatch.setattr(ft, "FineTuneSettings", lambda: QUICK)
    monkeypatch.setattr(command, "fine_tuning_wins", lambda tuned, head: True)
    tuned = tmp_path / "tuned"
    command.adapt_run(run_with_start, tuned, data=lab_cells)
    card = read_card(tuned)
    assert card.mode == "finetune" and card.few_shot_start is None
    assert "few-shot start" in card.finetune["few_shot"]["started_from"]
    assert not (tuned / FEW_SHOT_START_FILE).exists() and set(card.files) == {MODEL_FILE}
    load_run(tuned)

    head_only = tmp_path / "head_only"
    command.adapt_run(run_with_start, head_only, data=lab_cells, finetune=False)
    card = read_card(head_only)
    assert card.mode == "frozen" and card.few_shot_start is not None
    assert (head_only / FEW_SHOT_START_FILE).read_bytes() == (run_with_start / FEW_SHOT_START_FILE).read_bytes()
    ft.starting_network(card, None, head_only)  # its sha256 is checked against the new card


def test_a_changed_start_network_is_refused_in_one_line(run_with_start: Path, lab_cells: Path, tmp_path: Path,
                                                         one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_with_start, run)
    blob = bytearray((run / FEW_SHOT_START_FILE).read_bytes())
    blob[-10] ^= 0xFF
    (run / FEW_SHOT_START_FILE).write_bytes(bytes(blob))
    capsys.readouterr()
    code = main(["adapt", str(run), "--out", str(tmp_path / "adapted"), "--data", str(lab_cells)])
    err = capsys.readouterr().err
    assert code != 0 and "few_shot_start.safetensors" in err and "changed or damaged" in err
    assert "Traceback" not in err and not (tmp_path / "adapted").exists()
    assert json.loads((run / "model_card.json").read_text())["few_shot_start"]  # the source run is untouched
