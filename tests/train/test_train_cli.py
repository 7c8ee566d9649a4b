from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hematovision.cli import main
from hematovision.errors import DatasetError, HematoVisionError


def _tiny_finetune(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn",
                 "--no-pretrained", "--image-size", "32", "--epochs", "15", "--patience", "20", "--batch-size", "8",
                 "--lr", "0.01", "--seed", "1", *extra])


@pytest.fixture(scope="module")
def tiny_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert _tiny_finetune(synthetic_dataset, out) == 0
    return out


def test_train_writes_a_complete_run_folder(tiny_run: Path) -> None:
    for name in ("model.safetensors", "model_card.json", "split.csv", "metrics.json", "report.md",
                 "confusion_matrix.png", "per_class_recall.png", "reliability.png", "training_curves.png"):
        assert (tiny_run / name).is_file(), name
    card = json.loads((tiny_run / "model_card.json").read_text())
    assert card["class_names"] == ["eosinophil", "lymphocyte", "neutrophil"]
    assert card["pretrained"] is False and "random" in card["weights"]
    assert card["files"]["model.safetensors"]["sha256"]
    rows = list(csv.DictReader(open(tiny_run / "split.csv")))
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["n_images"] == sum(row["split"] == "test" for row in rows)
    # Coloured discs are easy: a working loop learns them in a few epochs.
    assert metrics["accuracy"] >= 0.8


def test_evaluate_and_predict(tiny_run: Path, synthetic_dataset: Path, tmp_path: Path) -> None:
    extra = tmp_path / "external"
    shutil.copytree(synthetic_dataset, extra)
    (extra / "BASOPHIL").mkdir()
    shutil.copy(next((extra / "NEUTROPHIL").iterdir()), extra / "BASOPHIL" / "x.png")
    (extra / "NEUTROPHIL" / "broken.jpg").write_text("not an image")
    assert main(["evaluate", str(tiny_run), "--data", str(extra), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["unknown_classes"] == ["basophil"]
    assert metrics["n_images"] == 36 and len(metrics["unreadable_files"]) == 1
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class"):
        assert key in metrics

    out_csv = tmp_path / "pred.csv"
    assert main(["predict", str(tiny_run), str(extra / "LYMPHOCYTE"), str(extra / "NEUTROPHIL" / "broken.jpg"),
                 "--out", str(out_csv)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 13
    broken = [row for row in rows if row["error"]]
    assert len(broken) == 1 and "broken.jpg" in broken[0]["file"]
    good = [row for row in rows if not row["error"]]
    assert all(abs(sum(float(row[f"p_{c}"]) for c in ("eosinophil", "lymphocyte", "neutrophil")) - 1) < 1e-4 for row in good)
    assert sum(row["label"] == "lymphocyte" for row in good) >= 9

    out_json = tmp_path / "pred.json"
    assert main(["predict", str(tiny_run), str(extra / "EOSINOPHIL"), "--out", str(out_json), "--top-k", "2"]) == 0
    records = json.loads(out_json.read_text())
    assert set(records[0]) >= {"file", "label", "confidence", "top1", "top2", "probabilities"}


def test_evaluate_split_reproduces_the_runs_own_test_metrics(tiny_run: Path, tmp_path: Path) -> None:
    assert main(["evaluate", str(tiny_run), "--split", "test", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    original = json.loads((tiny_run / "metrics.json").read_text())
    assert again["n_images"] == original["n_images"] and again["views"] == 1
    assert again["accuracy"] == original["accuracy"]
    assert again["log_loss"] == pytest.approx(original["log_loss"], abs=1e-5)

    assert main(["evaluate", str(tiny_run), "--split", "test", "--tta", "8", "--out", str(tmp_path / "tta")]) == 0
    with_views = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert with_views["views"] == 8 and with_views["n_images"] == original["n_images"]
    from hematovision.data.images import load_rgb
    from hematovision.infer.predictor import Predictor

    image = load_rgb(next(p for p in Path(json.loads((tiny_run / "train_config.json").read_text())["data"]).rglob("*.png")))
    one_view = Predictor.from_run_dir(tiny_run).logits([image])
    eight_views = Predictor.from_run_dir(tiny_run, views=8).logits([image])
    assert not np.allclose(one_view, eight_views), "the 8 views changed nothing"

    assert main(["evaluate", str(tiny_run), "--split", "holdout"]) == 2


def test_frozen_test_time_views_are_used_in_prediction_too(synthetic_dataset: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    out = tmp_path / "frozen_tta"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "frozen",
                 "--image-size", "64", "--tta", "2"]) == 0
    assert json.loads((out / "model_card.json").read_text())["tta"] == 2
    assert main(["evaluate", str(out), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    original = json.loads((out / "metrics.json").read_text())
    # Prediction averages the features of the same 2 views the head was fitted on, so the numbers match.
    assert again["views"] == 2
    assert again["log_loss"] == pytest.approx(original["log_loss"], abs=1e-4)


def test_frozen_mode_with_pretrained_backbone(synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    out = tmp_path / "frozen"
    args = ["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "frozen", "--image-size", "64"]
    assert main(args) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["mode"] == "frozen" and card["frozen"]["num_features"] > 1280
    assert json.loads((out / "metrics.json").read_text())["accuracy"] >= 0.8
    assert list((tmp_path / "home" / "features").rglob("*.npy")), "features were not cached"
    # The saved frozen network reproduces the head's predictions.
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(out)
    from hematovision.data.images import load_rgb

    image = load_rgb(next((synthetic_dataset / "EOSINOPHIL").iterdir()))
    assert predictor.class_names[int(predictor.predict([image]).argmax())] == "eosinophil"


def test_frozen_mode_with_two_backbones(synthetic_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    out = tmp_path / "frozen2"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "frozen",
                 "--backbone", "efficientnet_lite0+efficientnet_lite1", "--image-size", "64"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["frozen"]["num_features"] > 2 * 1280
    from hematovision.infer.predictor import Predictor

    predictor = Predictor.from_run_dir(out)
    from hematovision.data.images import load_rgb

    image = load_rgb(next((synthetic_dataset / "LYMPHOCYTE").iterdir()))
    assert predictor.class_names[int(predictor.predict([image]).argmax())] == "lymphocyte"


def test_unknown_backbone_is_one_line(synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(tmp_path), "--backbone", "resnet9000"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


def test_interrupted_training_resumes(synthetic_dataset: Path, tmp_path: Path) -> None:
    from hematovision.train import finetune as finetune_module

    out = tmp_path / "resume"
    original = finetune_module.save_state
    calls = {"n": 0}

    def interrupt_after_two_epochs(path, state):
        original(path, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    finetune_module.save_state = interrupt_after_two_epochs
    try:
        assert _tiny_finetune(synthetic_dataset, out, "--epochs", "4") == 130  # Ctrl-C exit code
    finally:
        finetune_module.save_state = original
    state = finetune_module.load_state(out / "train_state.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert (out / "model.safetensors").is_file(), "the best finished epoch must survive the interruption"
    assert _tiny_finetune(synthetic_dataset, out, "--epochs", "4", "--resume") == 0
    history = finetune_module.load_state(out / "train_state.pt")["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]


def test_checkpoint_for_another_model_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from hematovision.infer.predictor import Predictor

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    card = json.loads((other / "model_card.json").read_text())
    card["class_names"] = card["class_names"] + ["basophil"]
    (other / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(HematoVisionError, match="does not fit this model"):
        Predictor.from_run_dir(other)


def test_missing_weight_file_and_non_run_folder(tiny_run: Path, tmp_path: Path) -> None:
    from hematovision.infer.predictor import Predictor

    with pytest.raises(HematoVisionError, match="not a HematoVision run folder"):
        Predictor.from_run_dir(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(HematoVisionError, match="weight file not found"):
        Predictor.from_run_dir(broken)


def test_single_class_dataset_is_refused(synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "one"
    shutil.copytree(synthetic_dataset / "NEUTROPHIL", data / "NEUTROPHIL")
    assert _tiny_finetune(data, tmp_path / "out") == 2
    assert "at least 2 classes" in capsys.readouterr().err


def test_frozen_mode_refuses_random_weights(synthetic_dataset: Path, tmp_path: Path) -> None:
    from hematovision.train.pipeline import TrainConfig, run_training

    with pytest.raises(DatasetError, match="frozen mode needs pretrained"):
        run_training(TrainConfig(out=tmp_path, data=synthetic_dataset, mode="frozen", pretrained=False))


def test_given_split_folders(synthetic_dataset: Path, tmp_path: Path) -> None:
    for split in ("train", "test"):
        for folder in synthetic_dataset.iterdir():
            target = tmp_path / "data" / split / folder.name
            target.mkdir(parents=True)
            files = sorted(folder.iterdir())
            for f in (files[:9] if split == "train" else files[9:]):
                shutil.copy(f, target / f.name)
    out = tmp_path / "run"
    assert main(["train", "--train-dir", str(tmp_path / "data" / "train"), "--test-dir", str(tmp_path / "data" / "test"),
                 "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn", "--no-pretrained",
                 "--image-size", "32", "--epochs", "1"]) == 0
    parts = [row["split"] for row in csv.DictReader(open(out / "split.csv"))]
    assert parts.count("test") == 9 and parts.count("val") > 0
    assert np.isclose(json.loads((out / "metrics.json").read_text())["n_images"], 9)


def test_strong_augment_flag_reaches_the_model_card(synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "strong"
    assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune", "--backbone", "tiny_cnn",
                 "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--strong-augment"]) == 0
    assert json.loads((out / "model_card.json").read_text())["finetune"]["strong_augment"] is True
