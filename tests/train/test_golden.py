"""Golden outputs: tiny seeded trainings whose predictions are stored, so a changed result fails loudly.

Two recipes are trained from scratch on the synthetic discs of ``tests/synthetic.py``: a
``tiny_cnn`` fine-tune and a frozen ``efficientnet_lite0`` with the logistic head. Each run's
raw logits, temperature and calibrated probabilities on a fixed set of probe images (made in
memory by :func:`probe_images`, never read from disk) are compared with
``tests/fixtures/golden/<recipe>.json`` within the tolerance stored there.

A run folder written by today's code is kept in ``tests/fixtures/legacy_run_v1``; later code
must still load it and predict the same probabilities.

Regenerating is a deliberate act, only when a change of results is intended (say so in the
commit message); see ``tests/fixtures/golden/README.md``::

    HEMATOVISION_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/train/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import CLASS_STYLES, make_dataset, synthetic_cell

import hematovision
from hematovision.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures"
GOLDEN = FIXTURES / "golden"
LEGACY_RUN = FIXTURES / "legacy_run_v1"
REGENERATE = {part.strip() for part in os.environ.get("HEMATOVISION_REGENERATE_GOLDEN", "").split(",") if part.strip()}

DATA = ("golden_dataset(DATA) in tests/train/test_golden.py: tests/synthetic.py make_dataset per class, 40 px, "
        "14 neutrophil (seed 0), 8 lymphocyte (seed 1), 11 eosinophil (seed 2)")
RECIPES = {
    "tiny_cnn_finetune": ["train", "--data", "{data}", "--out", "{out}", "--mode", "finetune", "--backbone", "tiny_cnn",
                          "--no-pretrained", "--image-size", "32", "--epochs", "6", "--patience", "20",
                          "--batch-size", "8", "--lr", "0.01", "--seed", "1"],
    "efficientnet_lite0_frozen": ["train", "--data", "{data}", "--out", "{out}", "--mode", "frozen",
                                  "--backbone", "efficientnet_lite0", "--image-size", "64", "--head", "logreg", "--seed", "0"],
}
# Chosen by measurement (README.md): well above the differences between repeated runs (and, for the
# frozen recipe, between 1 and 2 threads), well below what a one-step change of the recipe moves.
# The fine-tune is compared at one thread only: tiny_cnn's conv biases before BatchNorm make its
# results depend on the thread count (README.md, "Thread count").
TOLERANCE = {"logits": 1e-3, "probabilities": 1e-3, "temperature_relative": 1e-3}


def golden_dataset(root: Path) -> Path:
    """The training data: synthetic discs, deliberately imbalanced so that class balancing matters."""
    for seed, (label, count) in enumerate((("neutrophil", 14), ("lymphocyte", 8), ("eosinophil", 11))):
        make_dataset(root, per_class=count, size=40, seed=seed, classes=(label,))
    return root


def probe_images() -> list[np.ndarray]:
    """Nine fixed 40-px images: two plain cells per class, and three half-and-half blends of two classes.

    The blends lie near decision boundaries, where the probabilities are not saturated.
    """
    rng = np.random.default_rng(2024)
    images = [synthetic_cell(label, 40, rng) for label in CLASS_STYLES for _ in range(2)]
    for first, second in (("neutrophil", "lymphocyte"), ("lymphocyte", "eosinophil"), ("eosinophil", "neutrophil")):
        mixed = 0.5 * synthetic_cell(first, 40, rng) + 0.5 * synthetic_cell(second, 40, rng).astype(np.float64)
        images.append(mixed.round().astype(np.uint8))
    return images


def train_and_probe(recipe: str, work: Path) -> tuple[Path, dict]:
    """Train ``recipe`` on fresh synthetic data under ``work``; return the run folder and its probe outputs."""
    from hematovision.infer.predictor import Predictor

    data = golden_dataset(work / "data")
    out = work / recipe
    assert main([arg.format(data=data, out=out) for arg in RECIPES[recipe]]) == 0
    predictor = Predictor.from_run_dir(out)
    images = probe_images()
    card = json.loads((out / "model_card.json").read_text())  # the file, as any reader sees it
    checks = {"finetune.best_epoch": card["finetune"]["best_epoch"]} if card["mode"] == "finetune" else {
        "frozen.num_features": card["frozen"]["num_features"], "frozen.head.C": card["frozen"]["head"]["C"]}
    return out, {
        "class_names": predictor.class_names,
        "temperature": predictor.temperature,
        "logits": predictor.logits(images).astype(np.float64).tolist(),
        "probabilities": predictor.predict(images).tolist(),
        "checks": checks,
    }


def _rounded(values: list[list[float]]) -> list[list[float]]:
    return [[float(f"{value:.7g}") for value in row] for row in values]


def _write_golden(path: Path, recipe: str, outputs: dict) -> None:
    import sklearn

    record = {
        "about": "Golden outputs of tests/train/test_golden.py; regenerate only for an intended change of results (README.md).",
        "recipe": recipe,
        "command": "hematovision " + " ".join(RECIPES[recipe]),
        "data": DATA,
        "probe": "probe_images() in tests/train/test_golden.py (in memory, numpy seed 2024)",
        "versions": {"hematovision": hematovision.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "scikit-learn": sklearn.__version__},
        "torch_threads": torch.get_num_threads(),
        "tolerance": TOLERANCE,
        "class_names": outputs["class_names"],
        "checks": outputs["checks"],
        "temperature": outputs["temperature"],
        "logits": _rounded(outputs["logits"]),
        "probabilities": _rounded(outputs["probabilities"]),
    }
    path.write_text(json.dumps(record, indent=1) + "\n")


def assert_matches_golden(outputs: dict, golden: dict) -> None:
    """Compare probe outputs with a golden record; the message names what moved and by how much."""
    tolerance = golden["tolerance"]
    assert outputs["class_names"] == golden["class_names"]
    assert outputs["checks"] == golden["checks"], "the recipe chose differently (best epoch, C, or feature count)"
    for key in ("logits", "probabilities"):
        values, expected = np.array(outputs[key]), np.array(golden[key])
        assert values.shape == expected.shape, key
        moved = np.abs(values - expected).max()
        assert moved <= tolerance[key], f"{key} moved by up to {moved:.3g} (tolerance {tolerance[key]})"
    assert outputs["temperature"] == pytest.approx(golden["temperature"], rel=tolerance["temperature_relative"])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_training_reproduces_the_golden_outputs(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                one_thread: None) -> None:
    # A private feature cache: features cached by other code must not stand in for fresh ones.
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    run, outputs = train_and_probe(recipe, tmp_path)
    path = GOLDEN / f"{recipe}.json"
    regenerated = []
    if REGENERATE & {"1", "golden", recipe}:
        _write_golden(path, recipe, outputs)
        regenerated.append(str(path))
    if "legacy_run_v1" in REGENERATE and recipe == "tiny_cnn_finetune":
        _write_legacy_run(run, outputs)
        regenerated.append(str(LEGACY_RUN))
    if regenerated:
        pytest.skip(f"regenerated {', '.join(regenerated)}; review the diff and say why in the commit")
    assert path.is_file(), f"{path} is missing; see tests/fixtures/golden/README.md"
    assert_matches_golden(outputs, json.loads(path.read_text()))


def _write_legacy_run(run: Path, outputs: dict) -> None:
    """Keep the run folder's card and weights (the files prediction reads) and the probe outputs."""
    LEGACY_RUN.mkdir(parents=True, exist_ok=True)
    card = json.loads((run / "model_card.json").read_text())
    card["data"]["source"] = DATA  # was the temporary folder of the run; nothing reads it back
    (LEGACY_RUN / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copyfile(run / "model.safetensors", LEGACY_RUN / "model.safetensors")
    (LEGACY_RUN / "expected.json").write_text(json.dumps({
        "about": "Probe outputs of this run folder when it was made; later code must load it and give the same.",
        "probe": "probe_images() in tests/train/test_golden.py",
        "made_by": f"hematovision {hematovision.__version__} (git {_git_head()}), torch {torch.__version__}",
        "logits": _rounded(outputs["logits"]),
        "probabilities": _rounded(outputs["probabilities"]),
    }, indent=1) + "\n")


def _git_head() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def test_a_run_folder_of_todays_format_still_loads_and_predicts_the_same(one_thread: None) -> None:
    from hematovision.infer.predictor import Predictor

    card = json.loads((LEGACY_RUN / "model_card.json").read_text())
    assert card["format"] == 1 and card["mode"] == "finetune" and card["backbone"] == "tiny_cnn"
    # The fixture itself is intact: the weights are the ones the card was written for.
    weights = (LEGACY_RUN / "model.safetensors").read_bytes()
    assert card["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    expected = json.loads((LEGACY_RUN / "expected.json").read_text())
    predictor = Predictor.from_run_dir(LEGACY_RUN)
    images = probe_images()
    assert predictor.class_names == ["eosinophil", "lymphocyte", "neutrophil"]
    # Inference alone (no training): only float rounding may differ, hence the tight tolerance.
    assert predictor.logits(images) == pytest.approx(np.array(expected["logits"]), abs=1e-5)
    assert predictor.predict(images) == pytest.approx(np.array(expected["probabilities"]), abs=1e-5)
