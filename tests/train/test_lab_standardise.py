"""Per-lab standardisation: ``train --lab-standardise`` and ``evaluate`` standardising another lab on its own cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from two_domains import train_on_one_thread, write_lab

from hematovision.cli import main
from hematovision.infer.lab_standardise import class_balanced_moments, lab_moments
from hematovision.train.frozen import _per_lab_standardised


def test_class_balanced_moments_ignore_the_class_mix() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 2.0]])
    for mix in ((50, 50), (90, 10), (10, 90)):
        labels = np.repeat([0, 1], mix)
        x = centres[labels] + rng.normal(0, 0.1, (len(labels), 2))
        mean, std = class_balanced_moments(x, np.eye(2)[labels])
        np.testing.assert_allclose(mean, [2.0, 1.0], atol=0.05)  # the midpoint, whatever the mix
        assert mean.dtype == np.float32 and (std > 0).all()
    # A class without a cell's weight is left out; no class at all gives the plain mean.
    x = rng.normal(3.0, 1.0, (40, 2))
    one_class = np.zeros((40, 2))
    one_class[:, 0] = 1
    np.testing.assert_allclose(class_balanced_moments(x, one_class)[0], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(class_balanced_moments(x, np.zeros((40, 2)))[0], x.mean(0), rtol=1e-5)


def test_each_lab_is_standardised_on_its_own() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    labs = np.repeat(["a", "b"], 150)
    x = rng.normal(0, 1, (300, 4)) + labels[:, None]
    x[labs == "b"] = x[labs == "b"] * 3 + 10  # the second lab: another offset and scale
    val_labs = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 2)  # "c": no training rows, standardised with the average
    val = np.concatenate([x[:5], x[150:155], x[:2]])
    (mean, std), train_z, val_z = _per_lab_standardised(x, labels, val, 3, labs, val_labs)
    for lab in ("a", "b"):
        rows = train_z[labs == lab]
        class_means = np.stack([rows[labels[labs == lab] == k].mean(0) for k in range(3)])
        np.testing.assert_allclose(class_means.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(val_z[:5], train_z[:5])
    np.testing.assert_allclose(val_z[5:10], train_z[150:155])
    np.testing.assert_allclose(val_z[10:], (x[:2] - mean) / std)


def test_lab_moments_undo_a_shift_without_labels() -> None:
    rng = np.random.default_rng(2)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0]])
    weight, bias = np.array([[-2.0, 0.0], [2.0, 0.0]]), np.zeros(2)  # a head on standardised features
    labels = np.repeat([0, 1], [180, 20])  # another lab: mostly class 0, shifted and stretched
    x = (centres[labels] + rng.normal(0, 0.5, (200, 2))) * 2.0 + 5.0
    mean, std = lab_moments(x, weight, bias)
    predicted = (((x - mean) / std) @ weight.T + bias).argmax(1)
    assert (predicted == labels).mean() >= 0.95
    plain = (((x - x.mean(0)) / x.std(0)) @ weight.T + bias).argmax(1)
    assert (predicted == labels).mean() >= (plain == labels).mean() + 0.1  # the plain mean sits among the majority


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labs")
    return {"train": write_lab(root / "train", 30, seed=0), "same": write_lab(root / "same", 12, seed=5),
            "other": write_lab(root / "other", 15, seed=4, other=True),
            "few": write_lab(root / "few", 6, seed=6, other=True)}


@pytest.fixture(scope="module")
def per_lab_run(labs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_on_one_thread(tmp_path_factory, tmp_path_factory.mktemp("runs") / "per_lab", "--data", str(labs["train"]),
                               "--mode", "frozen", "--image-size", "48", "--lab-standardise")


def _evaluate(run: Path, data: Path, out: Path, *extra: str) -> dict:
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_standardises_another_lab_on_its_own_cells(per_lab_run: Path, labs: dict[str, Path], tmp_path: Path,
                                                           one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    card = json.loads((per_lab_run / "model_card.json").read_text())
    assert card["frozen"]["standardisation"] == "per_lab" and card["frozen"]["head"]["standardisation"] == "per_lab"

    other = _evaluate(per_lab_run, labs["other"], tmp_path / "other")
    assert "lab standardisation applied" in capsys.readouterr().out
    kept = _evaluate(per_lab_run, labs["other"], tmp_path / "kept", "--no-lab-standardise")
    record = other["lab_standardisation"]
    assert record["applied"] and record["images"] == 45
    assert record["before"]["accuracy"] == pytest.approx(kept["accuracy"])
    assert kept["lab_standardisation"] is None
    assert other["accuracy"] >= kept["accuracy"] + 0.1, (kept["accuracy"], other["accuracy"])
    assert other["lab_shift"]["shifted"]  # the warning stays: the images are still another lab's

    # The training lab's own images do not warn and keep the run's statistics.
    same = _evaluate(per_lab_run, labs["same"], tmp_path / "same")
    assert same["lab_standardisation"]["applied"] is False and same["accuracy"] >= 0.9
    # Too few images to estimate a lab's statistics: not applied, and said why.
    few = _evaluate(per_lab_run, labs["few"], tmp_path / "few")
    assert few["lab_standardisation"]["applied"] is False
    assert "at least 32" in few["lab_standardisation"]["description"]


def test_unlabelled_adapt_of_a_per_lab_run_is_class_balanced(per_lab_run: Path, labs: dict[str, Path],
                                                             tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "adapted"
    assert main(["adapt", str(per_lab_run), "--out", str(out), "--unlabelled", str(labs["other"])]) == 0
    adaptation = json.loads((out / "model_card.json").read_text())["adaptation"]
    assert "class-balanced" in adaptation["adapted"][0]
    source = _evaluate(per_lab_run, labs["other"], tmp_path / "source", "--no-lab-standardise")["accuracy"]
    assert _evaluate(out, labs["other"], tmp_path / "ev")["accuracy"] >= source + 0.1


@pytest.mark.parametrize("args", [["--mode", "finetune", "--backbone", "tiny_cnn", "--no-pretrained"],
                                  ["--mode", "frozen", "--head", "mlp"]])
def test_lab_standardise_outside_frozen_logreg_is_refused(args: list[str], labs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(labs["train"]), "--out", str(tmp_path / "run"), "--lab-standardise",
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lab-standardise is for frozen mode with the logreg head" in err[0]


def test_a_head_refitted_by_few_shot_adapt_keeps_its_standardisation(per_lab_run: Path, labs: dict[str, Path],
                                                                     tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "few"
    assert main(["adapt", str(per_lab_run), "--out", str(out), "--data", str(labs["other"]), "--k-per-class", "5",
                 "--no-finetune"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["adaptation"]["choice"]["prior"] is not None  # the head was refitted on the lab's cells
    assert card["frozen"]["standardisation"] == "training"
    # So evaluating the lab's other cells does not standardise them again; and its lab-shift reference
    # is the lab's own cells (per class, threshold from held-out folds), so the lab does not warn.
    assert "cross-validation folds" in card["shift"]["calibrated_on"] and len(card["shift"]["class_means"]) == 3
    metrics = _evaluate(out, labs["other"], tmp_path / "ev")
    assert metrics["lab_standardisation"] is None and metrics["lab_shift"]["shifted"] is False
    assert _evaluate(out, labs["train"], tmp_path / "ev_train")["lab_shift"]["shifted"] is True  # the source lab now warns
