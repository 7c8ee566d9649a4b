"""Equivalences of the training path, at tiny size and seeded (issue 17).

Each test compares two routes to the same result, with the second route computed
independently of the code under test where possible:

- a fine-tune interrupted by Ctrl-C in the middle of an epoch and continued with ``--resume``
  equals the same run left alone: every tensor of both weight files, the per-epoch history and
  the test metrics;
- ``evaluate --data DIR`` equals scikit-learn's metrics of ``predict``'s own output for the same images;
- a frozen run's prediction equals its head (read from ``model.safetensors`` and applied in numpy)
  on features extracted afresh by a new :class:`FeatureExtractor`;
- the sha256 in ``model_card.json`` is ``hashlib.sha256`` of ``model.safetensors``;
- every number of ``report.md`` is the matching ``metrics.json`` value at the printed precision.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn import metrics as skm
from synthetic import make_dataset, synthetic_cell

from hematovision.cli import main
from hematovision.train import finetune as finetune_module

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]

# lr 0.1 with seed 0 gives a bumpy validation curve on the synthetic discs (balanced accuracy
# 0.67, 1, 1, 0.67, 0.83): the best epoch (3) comes before the interruption (during epoch 5) and
# patience 2 stops the run after epoch 5 of 8. The resumed run must therefore restore the best score,
# the stale-epoch count and the best weights, not only the last weights, optimizer, schedule and RNG.
EPOCHS, PATIENCE, INTERRUPT_IN_EPOCH = 8, 2, 5


def _finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn",
            "--no-pretrained", "--image-size", "32", "--epochs", str(EPOCHS), "--patience", str(PATIENCE),
            "--batch-size", "8", "--lr", "0.1", "--seed", "0", *extra]


@pytest.fixture(scope="module")
def module_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One torch thread and a private feature cache for the module's trainings."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        # A cache left by other code (or another version of it) must not stand in for fresh features.
        patch.setenv("HEMATOVISION_HOME", str(tmp_path_factory.mktemp("home")))
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), per_class=12, size=40, seed=0)


@pytest.fixture(scope="module")
def finetune_run(module_env: None, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert main(_finetune_args(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def soft_run(module_env: None, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gentler fine-tune (lr 0.01, 6 epochs) whose calibrated probabilities are not saturated at 0 and 1,
    so that the probability-based metrics (log loss, ECE) of its evaluations are informative."""
    out = tmp_path_factory.mktemp("runs") / "soft"
    assert main(["train", "--data", str(data), "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn",
                 "--no-pretrained", "--image-size", "32", "--epochs", "6", "--patience", "20", "--batch-size", "8",
                 "--lr", "0.01", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def frozen_run(module_env: None, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite0 features at 64 px, two test-time views (features averaged over them), logistic head."""
    out = tmp_path_factory.mktemp("runs") / "frozen"
    assert main(["train", "--data", str(data), "--out", str(out), "--mode", "frozen", "--backbone", "efficientnet_lite0",
                 "--image-size", "64", "--tta", "2", "--seed", "0"]) == 0
    return out


def blended_cell(label: str, other: str, share: float, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A synthetic cell of ``label`` mixed with one of ``other``: an ambiguous image a model may get wrong."""
    mixed = share * synthetic_cell(label, size, rng) + (1 - share) * synthetic_cell(other, size, rng).astype(np.float64)
    return mixed.round().astype(np.uint8)


@pytest.fixture(scope="module")
def external(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New images, imbalanced (10/4/7 plain + 2 blends per class), a class the model does not know, a broken file.

    The imbalance and the ambiguous blends make accuracy, balanced accuracy and macro-F1 three
    different numbers, so a metric computed from the wrong quantity cannot pass for the right one.
    """
    root = tmp_path_factory.mktemp("external")
    for seed, (label, count) in enumerate((("neutrophil", 10), ("lymphocyte", 4), ("eosinophil", 7)), start=11):
        make_dataset(root, per_class=count, size=40, seed=seed, classes=(label,))
    rng = np.random.default_rng(5)
    for label, other in (("neutrophil", "eosinophil"), ("lymphocyte", "eosinophil"), ("eosinophil", "neutrophil")):
        for share in (0.55, 0.65):
            Image.fromarray(blended_cell(label, other, share, rng)).save(root / label.upper() / f"blend_{other}_{share}.png")
    (root / "BASOPHIL").mkdir()
    shutil.copy(sorted((data / "NEUTROPHIL").iterdir())[0], root / "BASOPHIL" / "b.png")
    (root / "EOSINOPHIL" / "broken.png").write_bytes(b"not an image")
    return root


def _history(run: Path) -> list[dict]:
    return finetune_module.load_state(run / "train_state.pt")["history"]


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def _assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert sorted(first) == sorted(second), f"{a.name}: different tensor names"
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{a.name}: tensors differ after resume: {different}"


def test_interrupted_and_resumed_finetune_equals_the_uninterrupted_run(
        finetune_run: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    history = _history(finetune_run)
    card = json.loads((finetune_run / "model_card.json").read_text())
    best_epoch = card["finetune"]["best_epoch"]
    # The scenario must exercise what a resume restores (see EPOCHS above); if the numbers drift,
    # choose another seed or lr rather than letting the test lose its point.
    assert best_epoch < INTERRUPT_IN_EPOCH, history
    assert len(history) == INTERRUPT_IN_EPOCH < EPOCHS, "early stopping should end the reference run after the interrupted epoch"

    # Ctrl-C lands after the 2nd optimizer step of epoch INTERRUPT_IN_EPOCH: the model in memory has
    # moved past the last checkpoint, which the resumed run must not depend on.
    steps_per_epoch = math.ceil(card["data"]["n_images"]["train"] / 8)
    interrupt_at = (INTERRUPT_IN_EPOCH - 1) * steps_per_epoch + 2
    real_optimizer = finetune_module.make_optimizer
    steps = {"n": 0}

    def interruptible_optimizer(*args, **kwargs):
        optimizer = real_optimizer(*args, **kwargs)

        def count(*_):
            steps["n"] += 1
            if steps["n"] == interrupt_at:
                raise KeyboardInterrupt

        optimizer.register_step_post_hook(count)
        return optimizer

    monkeypatch.setattr(finetune_module, "make_optimizer", interruptible_optimizer)
    out = tmp_path / "interrupted"
    capsys.readouterr()
    assert main(_finetune_args(data, out)) == 130
    assert "interrupted; finished work was saved (use --resume to continue training)" in capsys.readouterr().err
    assert steps["n"] == interrupt_at
    state = finetune_module.load_state(out / "train_state.pt")
    assert state["epoch"] == INTERRUPT_IN_EPOCH - 2 and not (out / "model_card.json").exists()
    monkeypatch.setattr(finetune_module, "make_optimizer", real_optimizer)

    assert main(_finetune_args(data, out, "--resume")) == 0
    for name in ("model.safetensors", "last.safetensors"):
        _assert_same_tensors(finetune_run / name, out / name)
    assert _without_seconds(_history(out)) == _without_seconds(history)
    resumed_card = json.loads((out / "model_card.json").read_text())
    assert resumed_card["finetune"]["best_epoch"] == best_epoch
    assert resumed_card["temperature"] == card["temperature"]
    assert resumed_card["files"] == card["files"]
    for part in ("metrics.json", "val/metrics.json"):
        assert json.loads((out / part).read_text()) == json.loads((finetune_run / part).read_text()), part


def _read_predictions_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_equals_metrics_recomputed_from_predict_output(soft_run: Path, external: Path, tmp_path: Path) -> None:
    assert main(["evaluate", str(soft_run), "--data", str(external), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["predict", str(soft_run), str(external), "--out", str(tmp_path / "pred.csv")]) == 0
    rows = _read_predictions_csv(tmp_path / "pred.csv")
    assert len(rows) == 10 + 4 + 7 + 3 * 2 + 1 + 1

    # Keep what evaluate keeps: readable images of the model's classes (predict also scores the others).
    kept = [row for row in rows if not row["error"] and Path(row["file"]).parent.name.lower() in CLASSES]
    assert [row["file"] for row in rows if row["error"]] == [str(external / "EOSINOPHIL" / "broken.png")]
    probabilities = np.array([[float(row[f"p_{name}"]) for name in CLASSES] for row in kept])
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 2e-6).all(), "a near tie: the CSV's 6 decimals could flip an argmax"
    y_pred = probabilities.argmax(axis=1)
    y_true = np.array([CLASSES.index(Path(row["file"]).parent.name.lower()) for row in kept])
    assert [CLASSES[i] for i in y_pred] == [row["label"] for row in kept]

    assert evaluated["n_images"] == len(kept) == 27
    expected = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
        "macro_f1": skm.f1_score(y_true, y_pred, average="macro"),
    }
    assert len({round(value, 9) for value in expected.values()}) == 3, f"the metrics should differ here: {expected}"
    assert 0 < expected["accuracy"] < 1, "an imperfect model is what makes the comparison bite"
    for key, value in expected.items():
        assert evaluated[key] == value, key
    assert evaluated["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()

    # The probability-based metrics need full precision (the CSV's 6 decimals round a confidently
    # wrong image's true-class probability to 0): predict's JSON output of the same images.
    assert main(["predict", str(soft_run), str(external), "--out", str(tmp_path / "pred.json")]) == 0
    records = {record["file"]: record for record in json.loads((tmp_path / "pred.json").read_text())}
    exact = np.array([[records[row["file"]]["probabilities"][name] for name in CLASSES] for row in kept])
    assert exact == pytest.approx(probabilities, abs=5e-7)
    # metrics.py floors probabilities at 1e-12 before the log; the same floor here.
    log_loss = -np.log(np.maximum(exact[np.arange(len(y_true)), y_true], 1e-12)).mean()
    assert evaluated["log_loss"] == pytest.approx(log_loss, rel=1e-6)
    assert evaluated["ece"] == pytest.approx(_ece(y_true, exact), abs=1e-6)
    assert (exact.max(axis=1) < 0.99).mean() > 0.3, "saturated probabilities would make log loss and ECE uninformative"


def _ece(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins (lower edge open), written out plainly."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == y_true
    total = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = (confidence > low) & (confidence <= high) if b else confidence <= high
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def _numpy_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logits / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_frozen_prediction_equals_the_head_on_freshly_extracted_features(frozen_run: Path, external: Path,
                                                                        tmp_path: Path) -> None:
    from hematovision.data.images import load_rgb
    from hematovision.infer.predictor import Predictor
    from hematovision.train.features import FeatureExtractor

    card = json.loads((frozen_run / "model_card.json").read_text())
    assert card["tta"] == 2 and card["frozen"]["hidden"] == 0
    files = sorted(p for p in external.rglob("*.png") if p.name != "broken.png")
    rng = np.random.default_rng(3)
    # Blends across the decision boundary: the probabilities there are not saturated, so the temperature counts.
    blends = [blended_cell(a, b, share, rng) for a, b in (("neutrophil", "eosinophil"), ("lymphocyte", "neutrophil"))
              for share in np.linspace(0.3, 0.7, 9)]
    images = [load_rgb(path) for path in files] + blends

    # A new extractor from the package's pretrained weights, not the feature cache nor the run's copy.
    extractor = FeatureExtractor(card["backbone"], card["preprocessing"]["image_size"], card["frozen"]["taps"],
                                 tta=card["tta"])
    features = extractor.extract(images).astype(np.float64)
    assert features.shape == (len(images), card["frozen"]["num_features"])
    weights = {key: value.double().numpy() for key, value in load_file(str(frozen_run / "model.safetensors")).items()}
    standardised = (features - weights["feature_mean"]) / weights["feature_std"]
    logits = standardised @ weights["head.weight"].T + weights["head.bias"]
    expected = _numpy_softmax(logits, card["temperature"])
    assert expected.max(axis=1).min() < 0.9, "no image near a decision boundary: the comparison would not see the temperature"

    predictor = Predictor.from_run_dir(frozen_run)
    assert predictor.logits(images) == pytest.approx(logits, abs=1e-4)
    assert predictor.predict(images) == pytest.approx(expected, abs=1e-5)
    assert main(["predict", str(frozen_run), *map(str, files), "--out", str(tmp_path / "pred.json")]) == 0
    records = json.loads((tmp_path / "pred.json").read_text())
    assert [record["file"] for record in records] == list(map(str, files))
    from_cli = np.array([[record["probabilities"][name] for name in card["class_names"]] for record in records])
    assert from_cli == pytest.approx(expected[: len(files)], abs=1e-5)


@pytest.mark.parametrize("run", ["finetune_run", "frozen_run"])
def test_card_sha256_is_the_hash_of_the_weight_file(run: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(run)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["files"]["model.safetensors"]["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


REPORT_ROWS = {
    "images": "n_images", "accuracy": "accuracy", "balanced accuracy": "balanced_accuracy", "macro F1": "macro_f1",
    "log loss": "log_loss", "ROC-AUC (one-vs-rest, macro)": "roc_auc_ovr", "expected calibration error": "ece",
}


def _report_table(text: str) -> dict[str, list[str]]:
    """Every Markdown table row of the report as first cell -> other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not re.fullmatch(r"-+:?", cells[-1]) and cells[0] not in ("metric", "class"):
            rows[cells[0]] = cells[1:]
    return rows


def _assert_printed(printed: str, value: float | int | None, what: str) -> None:
    if value is None:
        assert printed == "n/a", what
    elif isinstance(value, int):
        assert int(printed) == value, what
    else:
        assert re.fullmatch(r"\d+\.\d{4}", printed), f"{what}: {printed!r} is not printed at 4 decimals"
        assert abs(float(printed) - value) <= 0.5e-4 + 1e-12, f"{what}: report {printed}, metrics.json {value}"


def test_report_carries_the_numbers_of_metrics_json(finetune_run: Path, soft_run: Path, frozen_run: Path,
                                                    external: Path, tmp_path: Path) -> None:
    assert main(["evaluate", str(soft_run), "--data", str(external), "--out", str(tmp_path / "eval")]) == 0
    folders = [finetune_run, finetune_run / "val", soft_run, frozen_run, tmp_path / "eval"]
    for folder in folders:
        metrics = json.loads((folder / "metrics.json").read_text())
        table = _report_table((folder / "report.md").read_text())
        for label, key in REPORT_ROWS.items():
            _assert_printed(table[label][0], metrics[key], f"{folder}: {label}")
        for name, row in metrics["per_class"].items():
            for printed, key in zip(table[name], ("precision", "recall", "f1", "support"), strict=True):
                _assert_printed(printed, row[key], f"{folder}: {name} {key}")
        assert set(table) == set(REPORT_ROWS) | set(metrics["per_class"]), f"{folder}: unexpected rows"
    # At least one report where the headline numbers all differ, so a swapped row cannot pass.
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    headline = [round(evaluated[key], 4) for key in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")]
    assert len(set(headline)) == len(headline), headline
