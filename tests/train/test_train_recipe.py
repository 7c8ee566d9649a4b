"""The training recipe, tested as behaviour rather than plumbing (issue 17).

Each test checks what a recipe *does* against an independent reference: the learning rate
applied at every optimizer step against the warm-up/cosine formula computed with ``math``,
the loss against label-smoothed, class-weighted cross-entropy written out in numpy, the class
frequencies actually fed to the model, the weights kept by early stopping against snapshots of
every epoch, the frozen logistic-regression C against scikit-learn, and the feature cache by
counting the images that pass through the backbone.

Everything runs on tiny synthetic discs (16-64 px), ``tiny_cnn`` and one thread; runs that
several tests read are module-scoped.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic import CLASS_STYLES, synthetic_cell
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hematovision.cli import main
from hematovision.data.transforms import Preprocessing
from hematovision.models import create_model
from hematovision.train import finetune as finetune_module
from hematovision.train.checkpoint import load_state
from hematovision.train.finetune import FinetuneConfig, finetune
from hematovision.train.optim import warmup_cosine_factor

# Lite0's mean+std-pooled stages 2-5 (40, 80, 112, 192 channels) plus the pooled 1280-channel head.
LITE0_FEATURES = 2 * (40 + 80 + 112 + 192) + 1280


@contextmanager
def _single_thread() -> Iterator[None]:
    """One torch thread for module-scoped runs (the ``one_thread`` fixture is per test)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_dataset(root: Path, counts: dict[str, int], size: int, seed: int = 0) -> Path:
    """``root/<CLASS>/<i>.png`` with ``counts[label]`` synthetic discs per class."""
    rng = np.random.default_rng(seed)
    for label, count in counts.items():
        folder = root / label.upper()
        folder.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(synthetic_cell(label, size, rng)).save(folder / f"{label}_{i:03d}.png")
    return root


def _smoothed_cross_entropy(logits: np.ndarray, target: np.ndarray, smoothing: float,
                            weight: np.ndarray | None) -> float:
    """Label-smoothed, class-weighted cross-entropy, mean reduction, as PyTorch defines it.

    Each sample's target is (1 - ε) on its class plus ε/K on every class; with class weights,
    every log-probability term is weighted by its class and the sum divided by Σ w[target].
    """
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    k = logits.shape[1]
    w = np.ones(k) if weight is None else np.asarray(weight, np.float64)
    nll = -(w[target] * log_p[np.arange(len(target)), target]).sum()
    uniform = -(log_p * w[None, :]).sum() / k
    return float(((1 - smoothing) * nll + smoothing * uniform) / w[target].sum())


def _split_rows(run: Path) -> list[dict]:
    with open(run / "split.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _card(run: Path) -> dict:
    return json.loads((run / "model_card.json").read_text())


def _uint8_to_tensor(batch: np.ndarray) -> torch.Tensor:
    """The test's own input mapping: uint8 NHWC → float NCHW in [0, 1] (what :data:`UNIT` gives)."""
    return torch.as_tensor(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0


def UNIT(size: int) -> Preprocessing:  # noqa: N802 - reads like the constant it stands for
    """Preprocessing that only scales to [0, 1], so the model sees what :func:`_uint8_to_tensor` gives."""
    return Preprocessing(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _tiny_images(labels: list[int], size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    styles = list(CLASS_STYLES)
    return np.stack([synthetic_cell(styles[label], size, rng) for label in labels])


# --- learning-rate schedule -------------------------------------------------------------------

def test_warmup_cosine_factor_hand_computed_values() -> None:
    """Warm-up over 2 steps, cosine over the next 4 down to 1%: values worked out by hand."""
    expected = [0.5, 1.0, 1.0, 0.855017857, 0.505, 0.154982143, 0.01, 0.01]  # step 7 is past the end
    got = [warmup_cosine_factor(step, warmup_steps=2, total_steps=6) for step in range(8)]
    assert got == pytest.approx(expected, abs=1e-8)
    # Without warm-up the schedule starts at the peak.
    assert warmup_cosine_factor(0, warmup_steps=0, total_steps=5) == pytest.approx(1.0)


@pytest.mark.parametrize(("n_images", "batch_size", "epochs", "max_steps", "warmup_epochs", "lr"), [
    (12, 4, 4, None, 1.0, 0.01),  # 3 steps per epoch, warm-up 3 of 12 steps
    (10, 4, 3, 2, 1.5, 0.05),     # capped at 2 steps per epoch; 1.5 epochs → 3 warm-up steps of 6
])
def test_finetune_applies_warmup_then_cosine_at_every_step(one_thread: None, tmp_path: Path, n_images: int,
                                                           batch_size: int, epochs: int, max_steps: int | None,
                                                           warmup_epochs: float, lr: float) -> None:
    labels = [i % 3 for i in range(n_images)]
    images = _tiny_images(labels, 8)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=3, pretrained=False)
    config = FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=False, patience=100,
                            max_steps_per_epoch=max_steps, warmup_epochs=warmup_epochs, seed=0)
    applied: list[float] = []
    # A global hook sees the learning rate each optimizer step actually uses, whatever builds the optimizer.
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: applied.append(optimizer.param_groups[0]["lr"]))
    try:
        finetune(model, UNIT(8), images, np.array(labels), images[:3], np.array(labels[:3]), 3, config, tmp_path)
    finally:
        handle.remove()

    steps_per_epoch = min(math.ceil(n_images / batch_size), max_steps or 10**9)
    total = steps_per_epoch * epochs
    warmup = int(steps_per_epoch * warmup_epochs)
    expected = [lr * (step + 1) / warmup if step < warmup
                else lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))))
                for step in range(total)]
    assert applied == pytest.approx(expected, rel=1e-9)
    assert applied[warmup - 1] == pytest.approx(lr) and max(applied) == pytest.approx(lr)
    assert all(a > b for a, b in zip(applied[warmup:], applied[warmup + 1 :])), "no cosine decay after the peak"


# --- loss: label smoothing and class weights ----------------------------------------------------

@pytest.mark.parametrize(("smoothing", "balance"), [(0.1, "loss"), (0.3, "none")])
def test_first_step_loss_is_smoothed_weighted_cross_entropy(one_thread: None, tmp_path: Path,
                                                            smoothing: float, balance: str) -> None:
    """One full-batch step: the reported training loss equals the hand-written loss of the initial model."""
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2)
    images = _tiny_images(list(labels), 16)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=3, pretrained=False)
    initial = create_model("tiny_cnn", num_classes=3, pretrained=False)
    initial.load_state_dict(model.state_dict())
    # Train-mode BatchNorm on the whole batch, as in the step; a full-batch mean is order-free.
    with torch.no_grad():
        logits = initial.train()(_uint8_to_tensor(images)).numpy()
    counts = np.bincount(labels, minlength=3)
    weight = len(labels) / (3 * counts) if balance == "loss" else None
    expected = _smoothed_cross_entropy(logits, labels, smoothing, weight)
    # The reference must tell the recipes apart, or the check below proves nothing.
    assert abs(expected - _smoothed_cross_entropy(logits, labels, 0.0, weight)) > 1e-3
    if weight is not None:
        assert abs(expected - _smoothed_cross_entropy(logits, labels, smoothing, None)) > 1e-3

    config = FinetuneConfig(epochs=1, batch_size=len(labels), augment=False, label_smoothing=smoothing,
                            balance=balance, seed=0)
    val = [0, 6, 10]  # one image per class
    result = finetune(model, UNIT(16), images, labels, images[val], labels[val], 3, config, tmp_path)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


# --- class balance, through the CLI on an imbalanced set ------------------------------------------

BALANCE_EPOCHS, BALANCE_BATCH = 8, 8


@pytest.fixture(scope="module")
def balance_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """``train --balance loss`` and ``--balance sampler`` on 40/10/5 images, recording every training loss call.

    Returns, per mode, the run folder, the training-set class counts (from split.csv) and the
    (logits, target, loss) of every training step.
    """
    root = tmp_path_factory.mktemp("balance")
    data = _write_dataset(root / "data", {"neutrophil": 40, "lymphocyte": 10, "eosinophil": 5}, size=24)
    original = torch.nn.functional.cross_entropy
    runs: dict[str, dict] = {}
    for mode in ("loss", "sampler"):
        calls: list[tuple[np.ndarray, np.ndarray, float]] = []

        def recording(input, target, *args, calls=calls, **kwargs):
            loss = original(input, target, *args, **kwargs)
            if input.requires_grad:  # training steps only; the validation loss is computed on plain arrays
                calls.append((input.detach().numpy().copy(), target.numpy().copy(), loss.item()))
            return loss

        out = root / mode
        with pytest.MonkeyPatch.context() as patch, _single_thread():
            patch.setattr(torch.nn.functional, "cross_entropy", recording)
            assert main(["train", "--data", str(data), "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn",
                         "--no-pretrained", "--image-size", "16", "--epochs", str(BALANCE_EPOCHS), "--batch-size",
                         str(BALANCE_BATCH), "--patience", "100", "--balance", mode, "--seed", "0"]) == 0
        class_names = _card(out)["class_names"]
        train = [row["label"] for row in _split_rows(out) if row["split"] == "train"]
        runs[mode] = {"out": out, "counts": np.array([train.count(name) for name in class_names]), "calls": calls}
    return runs


def _per_epoch_targets(run: dict) -> list[np.ndarray]:
    steps = math.ceil(run["counts"].sum() / BALANCE_BATCH)
    calls = run["calls"]
    assert len(calls) == BALANCE_EPOCHS * steps, "every epoch should run all its steps (patience 100)"
    return [np.concatenate([target for _, target, _ in calls[e * steps : (e + 1) * steps]]) for e in range(BALANCE_EPOCHS)]


def test_balance_loss_uses_inverse_frequency_weights_and_natural_frequencies(balance_runs: dict) -> None:
    run = balance_runs["loss"]
    counts = run["counts"]
    assert counts.min() < counts.max() / 4, "the training split should be imbalanced"
    # Natural frequencies: each epoch feeds every training image exactly once.
    for targets in _per_epoch_targets(run):
        assert np.bincount(targets, minlength=3).tolist() == counts.tolist()
    weight = counts.sum() / (3 * counts)
    for logits, target, loss in run["calls"]:
        assert loss == pytest.approx(_smoothed_cross_entropy(logits, target, 0.1, weight), rel=1e-5)
    # No --label-smoothing flag: the README's 0.1 is the default, and the card records it.
    finetune_card = _card(run["out"])["finetune"]
    assert finetune_card["label_smoothing"] == 0.1 and finetune_card["balance"] == "loss"


def test_balance_sampler_feeds_classes_equally(balance_runs: dict) -> None:
    run = balance_runs["sampler"]
    counts = run["counts"]
    per_epoch = _per_epoch_targets(run)
    steps = math.ceil(counts.sum() / BALANCE_BATCH)
    assert all(len(targets) == steps * BALANCE_BATCH for targets in per_epoch)
    drawn = np.bincount(np.concatenate(per_epoch), minlength=3)
    total = drawn.sum()

    def chi_square(expected_fraction: np.ndarray) -> float:
        expected = total * expected_fraction
        return float(((drawn - expected) ** 2 / expected).sum())

    # 13.8 is the 0.1% critical value of chi-square with 2 degrees of freedom.
    assert chi_square(np.full(3, 1 / 3)) < 13.8, f"drawn {drawn.tolist()} from training counts {counts.tolist()}"
    assert chi_square(counts / counts.sum()) > 100, "the draws look like the natural frequencies"
    # Balanced sampling is not weighted a second time in the loss.
    for logits, target, loss in run["calls"]:
        assert loss == pytest.approx(_smoothed_cross_entropy(logits, target, 0.1, None), rel=1e-5)
    assert _card(run["out"])["finetune"]["balance"] == "sampler"


# --- early stopping --------------------------------------------------------------------------

def test_early_stopping_fires_and_keeps_the_best_epoch(synthetic_dataset: Path, tmp_path: Path, one_thread: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation is scripted (bad, perfect, bad, bad, ...): with patience 2 training stops after epoch 4."""
    out = tmp_path / "early"
    real_evaluate = finetune_module.evaluate
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted_validation(model, batches, *args, **kwargs):
        real_evaluate(model, batches, *args, **kwargs)  # the model is still evaluated for real
        snapshots.append({key: value.detach().clone() for key, value in model.state_dict().items()})
        good = len(snapshots) == 2  # only epoch 2 is right
        return {"loss": 0.1 if good else 2.0, "accuracy": 1.0 if good else 0.3,
                "balanced_accuracy": 1.0 if good else 1 / 3}

    monkeypatch.setattr(finetune_module, "evaluate", scripted_validation)
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune", "--backbone",
                 "tiny_cnn", "--no-pretrained", "--image-size", "16", "--epochs", "10", "--patience", "2",
                 "--batch-size", "8", "--lr", "0.01", "--seed", "0"]) == 0

    history = load_state(out / "train_state.pt")["history"]
    best_epoch = _card(out)["finetune"]["best_epoch"]
    assert best_epoch == 2
    assert len(history) == best_epoch + 2 == len(snapshots), "did not stop after 2 epochs without improvement"
    # The recorded selection score (balanced accuracy, ties broken by validation loss) peaks at the kept epoch.
    scores = [row["val_balanced_accuracy"] - 1e-3 * row["val_loss"] for row in history]
    assert int(np.argmax(scores)) + 1 == best_epoch

    def same(weights: dict[str, torch.Tensor], snapshot: dict[str, torch.Tensor]) -> bool:
        return weights.keys() == snapshot.keys() and all(torch.equal(weights[k], snapshot[k]) for k in weights)

    kept, last = load_file(str(out / "model.safetensors")), load_file(str(out / "last.safetensors"))
    assert same(kept, snapshots[best_epoch - 1]), "model.safetensors is not the best epoch's weights"
    assert same(last, snapshots[-1]) and not same(kept, last)


# --- --classes -------------------------------------------------------------------------------

def test_classes_flag_keeps_only_those_classes(synthetic_dataset: Path, tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "two"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune", "--backbone",
                 "tiny_cnn", "--no-pretrained", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
                 "--classes", "lymphocyte,eosinophil"]) == 0
    kept = ["eosinophil", "lymphocyte"]
    card = _card(out)
    assert card["class_names"] == kept
    rows = _split_rows(out)
    assert sorted({row["label"] for row in rows}) == kept and len(rows) == 2 * 12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == kept and sorted(metrics["per_class"]) == kept
    assert np.array(metrics["confusion_matrix"]).shape == (2, 2)
    assert metrics["n_images"] == sum(row["split"] == "test" for row in rows)
    assert sum(card["data"]["n_images"].values()) == 24


# --- frozen mode: feature count and cache ------------------------------------------------------

@pytest.fixture(scope="module")
def frozen_runs(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Frozen Lite0 runs at 64 px sharing one private HEMATOVISION_HOME.

    ``first``: a fresh cache. ``again``: the identical training. ``mlp``: the MLP head on the same
    features. ``changed``: after one test image's content was replaced. For each run: the images
    that passed through the backbone and the (images, features) of every ``extract_cached`` call.
    """
    from hematovision.models.frozen import PooledFeatures
    from hematovision.train.features import FeatureExtractor

    root = tmp_path_factory.mktemp("frozen")
    data = root / "data"
    shutil.copytree(synthetic_dataset, data)  # private copy: one file is rewritten below
    forward, cached = PooledFeatures.forward, FeatureExtractor.extract_cached
    record: dict = {}

    def counting_forward(self, x):
        record["backbone_images"] += x.shape[0]
        return forward(self, x)

    def recording_extract_cached(self, images, *args, **kwargs):
        features = cached(self, images, *args, **kwargs)
        record["parts"].append((np.array(images), np.array(features)))
        return features

    runs: dict = {"data": data}

    def train(name: str, *extra: str) -> None:
        record.update(backbone_images=0, parts=[])
        out = root / name
        assert main(["train", "--data", str(data), "--out", str(out), "--mode", "frozen", "--image-size", "64", *extra]) == 0
        runs[name] = {"out": out, **record}

    with pytest.MonkeyPatch.context() as patch, _single_thread():
        patch.setenv("HEMATOVISION_HOME", str(root / "home"))
        patch.setattr(PooledFeatures, "forward", counting_forward)
        patch.setattr(FeatureExtractor, "extract_cached", recording_extract_cached)
        train("first")
        train("again")
        train("mlp", "--head", "mlp")
        changed = next(Path(row["file"]) for row in _split_rows(runs["first"]["out"]) if row["split"] == "test")
        Image.fromarray(synthetic_cell("eosinophil", 40, np.random.default_rng(99))).save(changed)
        runs["changed_file"] = changed
        train("changed")
    return runs


def test_frozen_lite0_has_2128_features(frozen_runs: dict) -> None:
    run = frozen_runs["first"]
    card = _card(run["out"])
    assert card["frozen"]["num_features"] == LITE0_FEATURES == 2128
    assert card["frozen"]["taps"] == [2, 3, 4, 5] and card["frozen"]["hidden"] == 0
    assert [features.shape[1] for _, features in run["parts"]] == [2128] * 3
    weights = load_file(str(run["out"] / "model.safetensors"))
    assert weights["feature_mean"].shape == (2128,) and weights["head.weight"].shape == (3, 2128)


def test_feature_cache_is_reused_by_an_identical_training(frozen_runs: dict) -> None:
    first, again = frozen_runs["first"], frozen_runs["again"]
    assert first["backbone_images"] == 36
    assert again["backbone_images"] == 0, "the identical training ran the backbone again"
    for (_, old), (_, new) in zip(first["parts"], again["parts"], strict=True):
        assert np.array_equal(old, new)
    assert frozen_runs["mlp"]["backbone_images"] == 0, "a different head should reuse the cached features"


def _changed_part(frozen_runs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(old features, new features, new images, changed row) of the split part holding the changed file."""
    old_parts, new_parts = frozen_runs["first"]["parts"], frozen_runs["changed"]["parts"]
    for (old_images, old), (new_images, new) in zip(old_parts, new_parts, strict=True):
        rows = np.flatnonzero((old_images != new_images).any(axis=(1, 2, 3)))
        if len(rows):
            assert len(rows) == 1
            return old, new, new_images, int(rows[0])
    raise AssertionError("no split part received the changed image")


def test_feature_cache_is_invalidated_when_a_file_changes(frozen_runs: dict) -> None:
    from hematovision.train.features import FeatureExtractor

    first, changed = frozen_runs["first"], frozen_runs["changed"]
    assert [(r["file"], r["split"]) for r in _split_rows(first["out"])] == \
           [(r["file"], r["split"]) for r in _split_rows(changed["out"])], "the changed file moved the split"
    old, new, new_images, row = _changed_part(frozen_runs)
    assert changed["backbone_images"] >= 1, "the changed file was served from the cache"
    assert changed["backbone_images"] <= len(new), "the parts without the changed file were not reused"
    others = np.arange(len(new)) != row
    np.testing.assert_allclose(new[others], old[others], rtol=1e-4, atol=1e-5)
    assert np.abs(new[row] - old[row]).max() > 0.1, "the changed image kept its old features"
    with _single_thread():
        fresh = FeatureExtractor("efficientnet_lite0", 64).extract(new_images[row : row + 1])[0]
    np.testing.assert_allclose(new[row], fresh, rtol=1e-4, atol=1e-4)


def test_feature_cache_recomputes_only_the_changed_image(frozen_runs: dict) -> None:
    """``extract_cached`` says each image's features are cached by content and config."""
    assert frozen_runs["changed"]["backbone_images"] == 1


# --- frozen heads ------------------------------------------------------------------------------

def test_mlp_head_run(frozen_runs: dict) -> None:
    out = frozen_runs["mlp"]["out"]
    frozen = _card(out)["frozen"]
    assert frozen["hidden"] == 512 and frozen["head"]["head"] == "mlp"
    weights = load_file(str(out / "model.safetensors"))
    head = {key: value.shape for key, value in weights.items() if key.startswith("head.")}
    assert head == {"head.0.weight": (512, 2128), "head.0.bias": (512,), "head.2.weight": (3, 512), "head.2.bias": (3,)}
    metrics = json.loads((out / "metrics.json").read_text())
    # Better than chance (1/3). Not yet as good as logistic regression (1.0 here): see the constant-feature bug below.
    assert metrics["accuracy"] >= 0.8 and frozen["head"]["val_balanced_accuracy"] >= 0.8


def _noisy_features(seed: int, n: int = 60, dims: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three classes separated weakly along 3 of ``dims`` dimensions: regularisation matters."""
    rng = np.random.default_rng(seed)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.normal(size=(n, dims))
        x[:, :3] += 0.8 * np.eye(3)[y]
        return x.astype(np.float32), y

    (x, y), (val_x, val_y) = draw(), draw()
    return x, y, val_x, val_y


def test_mlp_head_keeps_its_best_validation_epoch(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.metrics
    from torch import nn

    from hematovision.models.frozen import FrozenClassifier
    from hematovision.train.frozen import fit_head

    x, y, val_x, val_y = _noisy_features(seed=3)
    original = sklearn.metrics.balanced_accuracy_score
    epoch_scores: list[float] = []

    def recording(*args, **kwargs):
        score = original(*args, **kwargs)
        epoch_scores.append(float(score))
        return score

    monkeypatch.setattr(sklearn.metrics, "balanced_accuracy_score", recording)
    classifier = FrozenClassifier(nn.Identity(), 30, 3, hidden=512)
    summary = fit_head(classifier, x, y, val_x, val_y, 3, head="mlp", seed=0)
    monkeypatch.undo()

    assert len(epoch_scores) == summary["epochs"]
    best = max(epoch_scores)
    assert epoch_scores[-1] < best, "the last epoch is the best here, so keeping it proves nothing"
    assert epoch_scores[summary["best_epoch"] - 1] == best and summary["val_balanced_accuracy"] == best
    with torch.no_grad():
        predicted = classifier.forward_head(torch.as_tensor(val_x)).argmax(1).numpy()
    assert original(val_y, predicted) == pytest.approx(best), "the returned head is not the best epoch's"


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_feature_constant_in_training_cannot_swing_the_prediction(one_thread: None, head: str) -> None:
    """Lite's ReLU6 features can sit at 0 (or 6) on every training image and move on a new one."""
    from torch import nn

    from hematovision.models.frozen import FrozenClassifier
    from hematovision.train.frozen import fit_head

    x, y, val_x, val_y = _noisy_features(seed=5)
    x[:, -1] = val_x[:, -1] = 0.0
    classifier = FrozenClassifier(nn.Identity(), 30, 3, hidden=512 if head == "mlp" else 0)
    fit_head(classifier, x, y, val_x, val_y, 3, head=head, seed=0)
    moved = val_x.copy()
    moved[:, -1] = 6.0
    with torch.no_grad():
        before, after = classifier(torch.as_tensor(val_x)), classifier(torch.as_tensor(moved))
    # A feature the head never saw vary carries no evidence; a unit-scale nudge is the most it may give.
    assert (after - before).abs().max().item() < 10.0


def test_logreg_c_is_chosen_on_validation(one_thread: None) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from torch import nn

    from hematovision.models.frozen import FrozenClassifier
    from hematovision.train.frozen import fit_head

    x, y, val_x, val_y = _noisy_features(seed=5)
    grid = (0.001, 0.01, 0.1, 1.0, 10.0)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z, val_z = (x - mean) / std, (val_x - mean) / std
    fitted = [LogisticRegression(C=c, class_weight="balanced", max_iter=3000).fit(z, y) for c in grid]
    scores = [balanced_accuracy_score(val_y, model.predict(val_z)) for model in fitted]
    best = int(np.argmax(scores))
    assert 0 < best < len(grid) - 1 and max(scores) > sorted(scores)[-2], "the data do not single out one C"

    classifier = FrozenClassifier(nn.Identity(), 30, 3)
    summary = fit_head(classifier, x, y, val_x, val_y, 3, head="logreg", c_grid=grid)
    assert summary["C"] == grid[best] and summary["val_balanced_accuracy"] == pytest.approx(scores[best])
    # The folded head is that C's model: same coefficients, same validation predictions.
    np.testing.assert_allclose(classifier.head.weight.detach().numpy(), fitted[best].coef_, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        predicted = classifier(torch.as_tensor(val_x)).argmax(1).numpy()
    assert np.array_equal(predicted, fitted[best].predict(val_z))
