"""Few-shot fine-tuning in ``hematovision adapt``: what it trains, when it is tried and what it writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from two_domains import train_on_one_thread, write_lab

from hematovision.adapt import finetune as ft
from hematovision.cli import main
from hematovision.data.transforms import Preprocessing
from hematovision.models import create_model
from hematovision.run import load_run, read_card

QUICK = ft.FineTuneSettings(steps=30, batch_size=8)


@pytest.fixture(scope="module")
def lab_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 classes x 8 cells of the colour- and scale-shifted lab: enough (> MIN_CELLS) to try fine-tuning
    return write_lab(tmp_path_factory.mktemp("lab") / "cells", 8, seed=3, other=True)


@pytest.fixture(scope="module")
def frozen_lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_lab(tmp_path_factory.mktemp("train") / "lab", 30, seed=0)
    return train_on_one_thread(tmp_path_factory, tmp_path_factory.mktemp("runs") / "frozen", "--data", str(data),
                               "--mode", "frozen", "--backbone", "efficientnet_lite0", "--image-size", "48")


def test_fine_tune_trains_the_last_stages_and_a_new_head_only(one_thread: None) -> None:
    start = create_model("efficientnet_lite0", num_classes=5, pretrained=True)
    before = {name: p.detach().clone() for name, p in start.named_parameters()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 3 + [0])
    tuned = ft.fine_tune(start, images, labels, 3, Preprocessing(image_size=32), replace(QUICK, steps=3), seed=0)

    assert all(torch.equal(p, before[name]) for name, p in start.named_parameters()), "the start network was changed"
    assert not tuned.training and tuned.get_classifier().out_features == 3
    changed = {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("blocks.") else "")
               for name, p in tuned.named_parameters() if name in before and not torch.equal(p, before[name])}
    stages = len(start.blocks)
    trainable = {f"blocks.{i}" for i in range(stages - ft.STAGES, stages)} | {"conv_head", "bn2", "classifier"}
    assert changed and changed <= trainable, changed  # the first stages and the stem are as ImageNet left them
    assert {f"blocks.{stages - 1}", "conv_head"} <= changed
    # Frozen batch-norm layers keep their statistics too.
    assert torch.equal(tuned.bn1.running_mean, start.bn1.running_mean)


def test_which_runs_can_be_fine_tuned(frozen_lite0: Path) -> None:
    card = read_card(frozen_lite0)
    assert ft.can_finetune(card.backbone) is None
    assert "several networks" in ft.can_finetune("efficientnet_lite0+efficientnet_lite2")
    assert "EfficientNet-Lite" in ft.can_finetune("tiny_cnn")


def test_adapt_scores_fine_tuning_out_of_fold_and_writes_a_fine_tuned_run(
        frozen_lite0: Path, lab_cells: Path, tmp_path: Path, one_thread: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ft, "FineTuneSettings", lambda: QUICK)
    out = tmp_path / "adapted"
    assert main(["adapt", str(frozen_lite0), "--out", str(out), "--data", str(lab_cells)]) == 0
    capsys.readouterr()
    card = read_card(out)
    choice = card.adaptation["choice"]
    scored = [c for c in choice["candidates"] if "finetune" in c]
    assert len(scored) == 1 and scored[0]["folds"] == "stratified 3-fold over 24 cells"
    assert 0.0 <= scored[0]["balanced_accuracy"] <= 1.0
    tuned_wins = scored[0]["balanced_accuracy"] > scored[0]["head_only_balanced_accuracy"]
    assert (card.mode == "finetune") == tuned_wins
    load_run(out)  # an ordinary run folder either way: weights match the card
    assert main(["evaluate", str(out), "--data", str(lab_cells), "--out", str(tmp_path / "ev")]) == 0


def test_the_head_only_choice_is_refitted_on_the_fine_tunes_folds() -> None:
    # The fine-tune is compared with the head-only choice on the same held-out cells: refitted on the
    # choice's own folds it must give back exactly the choice's out-of-fold logits, and on other folds
    # each held-out cell must be scored by a head that never saw it.
    from hematovision.adapt.head import _anchors, choose_head, fit_linear, fold_indices, refit_on_folds

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    features = rng.normal(size=(30, 6)) + np.eye(3, 6)[labels] * 2.0
    weight0, bias0 = rng.normal(size=(3, 6)).astype(np.float32), np.zeros(3, np.float32)
    makers = {"source": lambda train: features}
    choice = choose_head(makers, labels, weight0, bias0, seed=0)
    assert choice.prior is not None  # a refitted head, so the folds matter
    own = fold_indices(labels, 0)[0]
    assert np.allclose(refit_on_folds(choice, makers, labels, own, weight0, bias0), choice.oof_logits, atol=1e-5)
    other = fold_indices(labels, 1, folds=3, leave_one_out_up_to=0)[0]
    refitted = refit_on_folds(choice, makers, labels, other, weight0, bias0)
    assert not np.allclose(refitted, choice.oof_logits, atol=1e-3)
    train, test = other[0]
    weight, bias = fit_linear(features[train], labels[train], *_anchors(weight0, bias0)[choice.anchor], choice.prior)
    assert np.allclose(refitted[test], features[test] @ weight.T + bias, atol=1e-5)


def test_fine_tuning_wins_only_when_strictly_better() -> None:
    from hematovision.adapt.command import fine_tuning_wins

    assert fine_tuning_wins(0.9, 0.8) and not fine_tuning_wins(0.8, 0.8) and not fine_tuning_wins(0.7, 0.8)


def test_a_winning_fine_tune_is_the_run_written(frozen_lite0: Path, lab_cells: Path, tmp_path: Path,
                                                 one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Whatever the tiny data scores: when the fine-tune wins, the new run is the fine-tuned network.
    from hematovision.adapt import command

    monkeypatch.setattr(ft, "FineTuneSettings", lambda: QUICK)
    monkeypatch.setattr(command, "fine_tuning_wins", lambda tuned, head: True)
    out = tmp_path / "adapted"
    command.adapt_run(frozen_lite0, out, data=lab_cells)
    card, model = load_run(out)
    assert card.mode == "finetune" and card.frozen is None
    assert card.tta == ft.VIEWS == 8  # the fine-tuned network scores every cell on its dihedral views
    assert card.finetune["few_shot"]["steps"] == QUICK.steps
    assert "ImageNet" in card.finetune["few_shot"]["started_from"]
    assert "fine-tuned" in card.adaptation["adapted"][0] and "fine-tuned" in card.adaptation["choice"]["chosen"]
    assert card.metrics["split"].startswith("the lab's labelled cells, out-of-fold (stratified 3-fold")
    policy = json.loads((out / "serving.json").read_text())
    assert policy["source_sha256"] == card.weights_sha256 and policy["views"] == ft.VIEWS
    # Its own lab-shift reference (the frozen source's does not apply to the new features), its threshold
    # from the folds' held-out cells: the run now belongs to the lab, and the source lab's cells warn.
    assert card.shift is not None and "3 cross-validation folds (24 held-out cells" in card.shift["calibrated_on"]
    assert len(card.shift["mean"]) == len(card.shift["std"]) and card.shift["threshold"] > 0
    assert card.adaptation["after"]["lab_shift"] is not None
    capsys.readouterr()
    assert main(["predict", str(out), str(lab_cells), "--out", str(tmp_path / "p.csv")]) == 0
    assert "differ from the training data" not in capsys.readouterr().out
    source_lab = write_lab(tmp_path / "source_lab", 12, seed=5)
    assert main(["predict", str(out), str(source_lab), "--out", str(tmp_path / "q.csv")]) == 0
    assert "differ from the training data" in capsys.readouterr().out


def test_no_finetune_and_too_few_cells_keep_the_head_only_path(frozen_lite0: Path, lab_cells: Path, tmp_path: Path,
                                                               one_thread: None) -> None:
    off = tmp_path / "off"
    assert main(["adapt", str(frozen_lite0), "--out", str(off), "--data", str(lab_cells), "--no-finetune"]) == 0
    card = read_card(off)
    assert card.mode == "frozen" and not any("finetune" in c for c in card.adaptation["choice"]["candidates"])
    few = tmp_path / "few"
    assert main(["adapt", str(frozen_lite0), "--out", str(few), "--data", str(lab_cells), "--k-per-class", "4"]) == 0
    record = [c for c in read_card(few).adaptation["choice"]["candidates"] if "finetune" in c]
    assert record == [{"finetune": "not tried", "why": "12 labelled cells are too few (more than 12 needed)"}]
