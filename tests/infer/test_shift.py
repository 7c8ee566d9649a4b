"""The lab-shift score: calibrated at training, computed by predict, evaluate, count and the app."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from two_domains import write_lab

from hematovision.cli import main
from hematovision.infer.shift import NARROWEST_BATCH, LabShift, ShiftReference, fit_reference

# ---- the score and its threshold, on features with a known distribution ----


def features(n: int, shift: float = 0.0, scale: float = 1.0, seed: int = 0, d: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(3.0 + shift, 2.0 * scale, size=(n, d))


def test_in_lab_batches_stay_below_the_threshold_and_shifted_ones_cross_it() -> None:
    shift = fit_reference(features(500), features(200, seed=1), test_features=features(200, seed=2))
    reference = ShiftReference.from_card(json.loads(json.dumps(shift)))  # as read back from model_card.json
    assert reference is not None and reference.threshold is not None
    assert 1.0 < reference.threshold < 1.5
    assert shift["test_batches_over_threshold"] < 0.05
    rng = np.random.default_rng(3)
    in_lab = reference.image_scores(features(2000, seed=4))
    warned = [reference.assess(in_lab[rng.integers(0, 2000, 32)]).shifted for _ in range(300)]
    assert np.mean(warned) < 0.05
    # Another lab moves the features (mean) and stretches them (scale): both raise the score.
    for moved in (features(32, shift=1.5, seed=5), features(32, scale=1.6, seed=6)):
        result = reference.assess(reference.image_scores(moved))
        assert result.shifted and result.score > reference.threshold
        assert "these images differ from the training data" in result.message()
        assert "hematovision adapt" in result.message()
    # Fewer images: a wider threshold, so a single typical image does not warn.
    assert reference.threshold_for(1) > reference.threshold_for(8) > reference.threshold_for(32) == reference.threshold
    # More images: a narrower one, down to NARROWEST_BATCH's; so a whole folder of a mildly shifted lab
    # warns where a batch of 32 of it would not, and a whole in-lab folder still does not.
    assert reference.threshold > reference.threshold_for(64) > reference.threshold_for(NARROWEST_BATCH)
    assert reference.threshold_for(NARROWEST_BATCH) == reference.threshold_for(10 * NARROWEST_BATCH)
    assert reference.threshold_for(NARROWEST_BATCH) > reference.image_score_mean
    mild = reference.image_scores(features(500, shift=0.45, seed=7))
    assert not reference.assess(mild[:32]).shifted and reference.assess(mild).shifted
    assert not reference.assess(reference.image_scores(features(2000, seed=8))).shifted


def test_single_class_batches_are_part_of_the_calibration() -> None:
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(0, 1, (400, 32)), rng.normal(0, 3, (100, 32))])
    val = np.concatenate([rng.normal(0, 1, (160, 32)), rng.normal(0, 3, (40, 32))])
    labels = np.r_[np.zeros(160, int), np.ones(40, int)]
    with_classes = fit_reference(train, val, labels)["threshold"]
    random_only = fit_reference(train, val)["threshold"]
    # A batch of only the wide class (e.g. a folder of one cell type) must not warn.
    reference = ShiftReference.from_card(fit_reference(train, val, labels))
    assert not reference.assess(reference.image_scores(rng.normal(0, 3, (32, 32)))).shifted
    assert with_classes > random_only


def test_class_conditional_score_warns_on_cells_between_the_classes() -> None:
    # Two well separated classes; another lab's cells land between them, no farther from the overall
    # mean than the training cells are (what a fine-tuned network did with BCCD's crops).
    rng = np.random.default_rng(0)
    centres = np.where(np.arange(64) % 2, 3.0, -3.0)

    def cells(n: int, sign: np.ndarray) -> np.ndarray:
        return sign[:, None] * centres + rng.normal(0, 1, (n, 64))

    train_labels, val_labels = np.repeat([0, 1], 200), np.repeat([0, 1], 100)
    signs = lambda labels: np.where(labels == 0, 1.0, -1.0)  # noqa: E731
    train, val = cells(400, signs(train_labels)), cells(200, signs(val_labels))
    between = rng.normal(0, 1, (32, 64))
    plain = ShiftReference.from_card(json.loads(json.dumps(fit_reference(train, val, val_labels))))
    shift = fit_reference(train, val, val_labels, train_labels=train_labels)
    assert shift["method"].startswith("class-conditional") and len(shift["class_means"]) == 2
    classes = ShiftReference.from_card(json.loads(json.dumps(shift)))
    assert plain is not None and classes is not None and classes.class_means is not None
    assert not plain.assess(plain.image_scores(between)).shifted  # the plain score misses them
    assert classes.assess(classes.image_scores(between)).shifted
    for label in (0, 1):  # a folder of one cell type does not warn
        one_class = cells(32, signs(np.full(32, label)))
        assert not classes.assess(classes.image_scores(one_class)).shifted
    assert classes.assess(classes.image_scores(cells(32, signs(np.zeros(32, int))) * 1.6)).shifted  # stretched
    # A card whose class vectors do not fit is not used.
    broken = dict(shift, class_std=shift["class_std"][:10])
    assert ShiftReference.from_card(broken) is None
    assert ShiftReference.from_card({k: v for k, v in shift.items() if k != "class_std"}) is None


def test_a_few_extreme_features_do_not_decide_the_score() -> None:
    reference = ShiftReference.standardised()
    typical = np.random.default_rng(0).normal(size=(1, 500))
    spiked = typical.copy()
    spiked[0, :3] = 1e4  # a feature nearly constant in training, lit up once
    assert reference.image_scores(spiked)[0] < reference.image_scores(typical)[0] + 1.0


def test_cards_without_a_usable_reference_never_warn() -> None:
    assert ShiftReference.from_card(None) is None
    assert ShiftReference.from_card({}) is None
    assert ShiftReference.from_card({"threshold": "high"}) is None
    assert ShiftReference.from_card({"threshold": 1.0, "mean": [0.0, 1.0], "std": [1.0]}) is None
    assert ShiftReference.standardised().assess([50.0, 60.0]).shifted is False  # no threshold: reported only
    assert ShiftReference.standardised().assess([]) is None
    assert LabShift(0.9, 1.2, 10).to_dict()["message"] is None


# ---- end to end: a frozen run trained on one lab, shown its own cells and another lab's ----


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labs")
    return {"train": write_lab(root / "train", 14, seed=0), "same": write_lab(root / "same", 12, seed=1),
            "other": write_lab(root / "other", 12, seed=2, other=True)}


@pytest.fixture(scope="module")
def frozen_run(labs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("runs") / "frozen"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEMATOVISION_HOME", str(home))
        assert main(["train", "--data", str(labs["train"]), "--out", str(out), "--mode", "frozen",
                     "--image-size", "48"]) == 0
    torch.set_num_threads(previous)
    return out


def test_train_stores_a_calibrated_threshold(frozen_run: Path) -> None:
    shift = json.loads((frozen_run / "model_card.json").read_text())["shift"]
    assert shift["threshold"] > 0 and shift["batch"] == 32 and "val split" in shift["calibrated_on"]
    assert "mean" not in shift  # a frozen linear head's input is already standardised: no overall vectors
    assert shift["method"].startswith("class-conditional") and len(shift["class_means"]) == 3


def test_the_other_lab_scores_higher_and_warns(frozen_run: Path, labs: dict[str, Path]) -> None:
    from hematovision.data.folder import load_images, scan_image_folder
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(frozen_run)
    results = {}
    for name in ("same", "other"):
        images = load_images(scan_image_folder(labs[name]).samples, predictor.prep).images
        predictor.reset_shift()
        predictor.predict(list(images))
        results[name] = predictor.lab_shift()
    assert results["other"].score > 2 * results["same"].score
    assert results["other"].shifted and not results["same"].shifted
    assert results["same"].n_images == 36


def test_evaluate_and_predict_store_the_score_and_warn_once(frozen_run: Path, labs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(frozen_run), "--data", str(labs["other"]), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("these images differ from the training data") == 1
    lab_shift = json.loads((tmp_path / "ev" / "metrics.json").read_text())["lab_shift"]
    assert lab_shift["shifted"] and lab_shift["n_images"] == 36
    assert "lab-shift score" in (tmp_path / "ev" / "report.md").read_text()

    assert main(["evaluate", str(frozen_run), "--data", str(labs["same"]), "--out", str(tmp_path / "ev2")]) == 0
    assert "differ from the training data" not in capsys.readouterr().out
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["lab_shift"]["shifted"] is False

    out = tmp_path / "p.csv"
    assert main(["predict", str(frozen_run), str(labs["other"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("run `hematovision adapt`") == 1
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 36 and len({row["lab_shift_score"] for row in rows}) == 1
    assert float(rows[0]["lab_shift_score"]) > float(rows[0]["lab_shift_threshold"])
    assert main(["predict", str(frozen_run), str(labs["same"]), "--out", str(tmp_path / "p.json")]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert records[0]["lab_shift_score"] < records[0]["lab_shift_threshold"]


def test_runs_without_a_reference_write_what_they_always_wrote(frozen_run: Path, labs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(frozen_run, old)
    card = json.loads((old / "model_card.json").read_text())
    del card["shift"]
    (old / "model_card.json").write_text(json.dumps(card))
    assert main(["predict", str(old), str(labs["other"]), "--out", str(tmp_path / "p.csv")]) == 0
    assert "lab_shift_score" not in (tmp_path / "p.csv").read_text()
    assert main(["evaluate", str(old), "--data", str(labs["other"]), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["lab_shift"] is None


def test_count_stores_the_white_cells_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from hematovision.cli import count as count_cli
    from hematovision.segment.count import count_fields

    class Classifier:  # a sample's white cells seen as another lab's
        class_names = ["lymphocyte", "neutrophil"]
        reset = 0

        def predict(self, images: list[np.ndarray]) -> np.ndarray:
            return np.tile([0.3, 0.7], (len(images), 1))

        def reset_shift(self) -> None:
            self.reset += 1

        def lab_shift(self) -> LabShift:
            return LabShift(5.0, 1.3, 12)

    field = tmp_path / "field.png"
    Image.fromarray(np.full((120, 160, 3), 230, np.uint8)).save(field)
    classifier = Classifier()
    summary = count_fields([field], tmp_path / "out", classifier)
    assert classifier.reset == 1
    assert summary["lab_shift"]["shifted"] and summary["lab_shift"]["score"] == 5.0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["lab_shift"]["threshold"] == 1.3
    # The command prints the warning once.
    patched = SimpleNamespace(images=[field], model=tmp_path, out=tmp_path / "out2", rbc_diameter=100.0,
                              review_below=0.6)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hematovision.segment.count.load_classifier", lambda _: classifier)
        count_cli.run(patched)
    assert capsys.readouterr().out.count("these images differ from the training data") == 1


def test_the_app_answers_with_the_requests_score(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    import torch
    from fastapi.testclient import TestClient
    from PIL import Image

    from hematovision.data.classes import WBC5
    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model
    from hematovision.serve.app import create_app
    from hematovision.serve.settings import Settings

    def predictor(shift: dict | None) -> SimpleNamespace:
        torch.manual_seed(0)
        card = {"backbone": "tiny_cnn", "mode": "finetune", **({"shift": shift} if shift else {})}
        return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                               temperature=1.0, card=card)

    def png(seed: int) -> tuple[str, bytes, str]:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        return (f"{seed}.png", buffer.getvalue(), "image/png")

    far = {"threshold": 1.5, "image_score_mean": 1.0, "batch": 32, "mean": [50.0] * 16, "std": [1.0] * 16}
    for shift, expected in ((far, True), (None, None)):
        settings = Settings(db=tmp_path / f"{expected}.db", auth=False)  # the score, not the login, is tested
        with TestClient(create_app(settings, predictor=predictor(shift)), base_url="http://localhost") as client:
            body = client.post("/api/v1/predict", files=[("files", png(0)), ("files", png(1))]).json()
        if expected is None:
            assert body["lab_shift"] is None  # old runs: the field is there, empty
        else:
            assert body["lab_shift"]["shifted"] and body["lab_shift"]["n_images"] == 2
            assert "hematovision adapt" in body["lab_shift"]["message"]


def test_out_of_fold_reference_takes_its_threshold_from_held_out_cells() -> None:
    from hematovision.infer.shift import fit_reference_out_of_fold

    # Few cells, many features (adapt's fine-tuning): a network's own training cells score lower than new
    # cells of the same lab, so a threshold from them would warn on the lab itself.
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(30, 100)), np.repeat([0, 1, 2], 10)
    fold = np.arange(30) % 3
    folds = [(features[fold != f], features[fold == f]) for f in range(3)]
    shift = fit_reference_out_of_fold(features, folds, np.concatenate([labels[fold == f] for f in range(3)]))
    own_cells = fit_reference(features, features, labels)
    assert shift["threshold"] > own_cells["threshold"] + 0.05
    assert "3 cross-validation folds (30 held-out cells" in shift["calibrated_on"]
    reference = ShiftReference.from_card(shift)
    assert reference is not None and reference.mean is not None
    same_lab = rng.normal(size=(32, 100))
    assert not reference.assess(reference.image_scores(same_lab)).shifted
    assert reference.assess(reference.image_scores(same_lab * 1.5 + 0.5)).shifted
    fold_labels = [labels[fold != f] for f in range(3)]
    with_classes = fit_reference_out_of_fold(features, folds, np.concatenate([labels[fold == f] for f in range(3)]),
                                             labels=labels, fold_labels=fold_labels)
    assert with_classes["method"].startswith("class-conditional") and len(with_classes["class_means"]) == 3
    with pytest.raises(ValueError, match="together"):
        fit_reference_out_of_fold(features, folds, labels=labels)
