"""A per-lab run scores each image on the statistics of the training lab it comes from (LabRoutedLinear)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from two_domains import train_on_one_thread, write_lab

from hematovision.cli import main
from hematovision.models.frozen import LabRoutedLinear
from hematovision.run import load_run
from hematovision.train.frozen import fit_frozen_classifier

CLASS_MEANS = np.random.default_rng(0).normal(0, 1.0, (3, 24))


def lab_rows(n: int, offset: float, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n cells per class of one lab: the class pattern seen through the lab's gain and offset."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n)
    return scale * (CLASS_MEANS[labels] + rng.normal(0, 0.6, (len(labels), 24))) + offset, labels


def accuracy(model: nn.Module, x: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model.forward_head(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == labels).mean())


def test_each_training_lab_is_scored_on_its_own_statistics() -> None:
    # Two labs whose gain and offset differ by far more than the classes do: the labs' average
    # statistics are neither lab's, so a head fitted on each lab's own standardisation misreads both.
    (a, ya), (b, yb) = lab_rows(60, 0.0, 1.0, 1), lab_rows(60, 6.0, 3.0, 2)
    (va, vya), (vb, vyb) = lab_rows(20, 0.0, 1.0, 3), lab_rows(20, 6.0, 3.0, 4)
    train, labels = np.concatenate([a, b]), np.concatenate([ya, yb])
    val, val_labels = np.concatenate([va, vb]), np.concatenate([vya, vyb])
    sources = (np.array(["a"] * len(a) + ["b"] * len(b)), np.array(["a"] * len(va) + ["b"] * len(vb)))
    model, summary = fit_frozen_classifier(nn.Identity(), train, labels, val, val_labels, 3, sources=sources)
    assert isinstance(model.head, LabRoutedLinear)
    routing = summary["routing"]
    assert routing["labs"] == ["a", "b"] and routing["val_routed_to_own_lab"] >= 0.95

    plain = fit_frozen_classifier(nn.Identity(), train, labels, val, val_labels, 3, sources=sources)[0]
    assert plain.drop_routing() and not plain.drop_routing() and type(plain.head) is nn.Linear
    for x, y in (lab_rows(30, 0.0, 1.0, 5), lab_rows(30, 6.0, 3.0, 6)):
        assert accuracy(model, x, y) >= 0.95
    # The average is where the plain head goes wrong (here on lab a's cells).
    assert min(accuracy(plain, *lab_rows(30, 0.0, 1.0, 5)), accuracy(plain, *lab_rows(30, 6.0, 3.0, 6))) <= 0.8

    # A third lab's cells fit neither lab's statistics: they keep the average, exactly as before.
    far, _ = lab_rows(20, -15.0, 0.5, 7)
    z = torch.as_tensor((far - model.feature_mean.numpy()) / model.feature_std.numpy(), dtype=torch.float32)
    routed, lab = model.head.routed(z)
    assert (lab == -1).all()
    torch.testing.assert_close(model.head(z), plain.head(z))


@pytest.fixture(scope="module")
def two_lab_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routing")
    first, second = write_lab(root / "first", 20, seed=0), write_lab(root / "second", 20, seed=1, other=True)
    return train_on_one_thread(tmp_path_factory, tmp_path_factory.mktemp("runs") / "two_labs", "--data", str(first),
                               "--data", str(second), "--mode", "frozen", "--image-size", "48", "--lab-standardise")


def test_a_two_lab_run_routes_its_own_images_and_exports_the_routing(two_lab_run: Path, tmp_path: Path,
                                                                      one_thread: None) -> None:
    card = json.loads((two_lab_run / "model_card.json").read_text())
    routing = card["frozen"]["head"]["routing"]
    assert len(routing["labs"]) == 2 and len(routing["limits"]) == 2
    _, model = load_run(two_lab_run)  # the card says how to build the routed head its weights fit
    assert isinstance(model.head, LabRoutedLinear)

    pytest.importorskip("onnxruntime")
    assert main(["export", str(two_lab_run), "--no-openvino", "--no-calibrate"]) == 0
    report = json.loads((two_lab_run / "export.json").read_text())
    # Checked on validation images of both labs: routed ones among them (random inputs route to none).
    assert "validation images" in report["onnx"]["checked_on"]
    assert report["onnx"]["argmax_agreement"] == 1.0 and report["onnx"]["logits_max_abs_diff"] < 1e-3, report["onnx"]


def test_adapt_drops_the_training_labs_routing(two_lab_run: Path, tmp_path: Path, one_thread: None) -> None:
    third = write_lab(tmp_path / "third", 8, seed=9, other=True)
    out = tmp_path / "adapted"
    assert main(["adapt", str(two_lab_run), "--out", str(out), "--data", str(third), "--no-finetune"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert "routing" not in card["frozen"]["head"]
    assert any("routing to the training labs' statistics" in line for line in card["adaptation"]["adapted"])
    _, model = load_run(out)
    assert type(model.head) is nn.Linear


def test_evaluate_reports_where_the_images_were_routed(two_lab_run: Path, tmp_path: Path, one_thread: None) -> None:
    first = write_lab(tmp_path / "more_of_first", 12, seed=11)  # new cells of the first training lab
    out = tmp_path / "ev"
    assert main(["evaluate", str(two_lab_run), "--data", str(first), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    routing = metrics["lab_routing"]
    assert set(routing) == {"first", "second", "none"} and sum(routing.values()) == pytest.approx(1.0)
    assert routing["first"] >= 0.8 and routing["second"] <= 0.1
    assert "lab routing" in (out / "report.md").read_text()
    # Without per-lab standardisation the features are not kept, and nothing is claimed.
    kept = tmp_path / "kept"
    assert main(["evaluate", str(two_lab_run), "--data", str(first), "--out", str(kept), "--no-lab-standardise"]) == 0
    assert json.loads((kept / "metrics.json").read_text())["lab_routing"] is None
