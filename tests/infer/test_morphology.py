"""The morphology expert: cell measurements that a lab's stain does not set, fused with the network."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from two_domains import train_on_one_thread, write_lab

from hematovision.cli import main
from hematovision.data.transforms import Preprocessing
from hematovision.infer.morphology import FEATURES, MorphologyExpert, cell_features
from hematovision.run import ModelCard, RunFolderError

SIDE = 112
SHARE, PIECES, HUES = FEATURES.index("nucleus_share"), FEATURES.index("nucleus_pieces"), slice(11, 17)


def _cell(nucleus_radius: float, lobes: int = 1, background: tuple[float, ...] = (236, 226, 232),
          cytoplasm: tuple[float, ...] = (205, 175, 205), nucleus: tuple[float, ...] = (95, 55, 135),
          gain: tuple[float, ...] = (1.0, 1.0, 1.0), seed: int = 0) -> np.ndarray:
    """A white cell of radius 30 px: a round nucleus, or ``lobes`` separate lobes on a ring."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    centre = SIDE / 2
    image = np.empty((SIDE, SIDE, 3))
    image[:] = background
    image[(yy - centre) ** 2 + (xx - centre) ** 2 <= 30**2] = cytoplasm
    if lobes == 1:
        image[(yy - centre) ** 2 + (xx - centre) ** 2 <= nucleus_radius**2] = nucleus
    else:
        for k in range(lobes):
            cy, cx = centre + 15 * np.sin(2 * np.pi * k / lobes), centre + 15 * np.cos(2 * np.pi * k / lobes)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= nucleus_radius**2] = nucleus
    image = image * np.asarray(gain) + rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_measurements_of_synthetic_cells() -> None:
    round_cell = cell_features(_cell(20))
    assert round_cell.shape == (len(FEATURES),) and np.isfinite(round_cell).all()
    assert round_cell[SHARE] == pytest.approx((20 / 30) ** 2, abs=0.08)
    assert round_cell[PIECES] == 1
    np.testing.assert_allclose([round_cell[HUES][:3].sum(), round_cell[HUES][3:].sum()], 1.0, atol=1e-6)
    assert cell_features(_cell(8, lobes=3))[PIECES] == 3  # a segmented nucleus: three lobes
    assert cell_features(_cell(12))[SHARE] < round_cell[SHARE] - 0.2
    # Any size of prepared image is measured at the working side.
    small = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(_cell(20)).resize((56, 56)))
    assert cell_features(small)[SHARE] == pytest.approx(round_cell[SHARE], abs=0.08)


def test_another_labs_tint_and_light_leave_the_measurements_nearly_unchanged() -> None:
    here = cell_features(_cell(20))
    # A yellow cast of the lamp or camera (per-channel gains on the whole image) and a dimmer light.
    there = cell_features(_cell(20, gain=(0.9, 0.85, 0.6)))
    assert there[SHARE] == pytest.approx(here[SHARE], abs=0.05)
    # Hues are shares of the absorbance against the image's own background: the tint divides out.
    np.testing.assert_allclose(there[HUES], here[HUES], atol=0.05)


def test_no_cell_gives_nan_and_the_expert_then_adds_no_opinion() -> None:
    blank = cell_features(np.full((SIDE, SIDE, 3), 200, np.uint8))
    assert np.isnan(blank).all()
    f, k = len(FEATURES), 3
    expert = MorphologyExpert(np.zeros(f), np.ones(f), np.ones((k, f)), np.array([0.0, 1.0, 2.0]), fusion=1.0)
    np.testing.assert_allclose(expert.logits(blank[None]), [[0.0, 1.0, 2.0]])  # the bias alone
    network = np.array([[5.0, 0.0, 0.0]])
    fused = expert.fuse(network, blank[None])
    np.testing.assert_allclose(np.exp(fused).sum(), 1.0, rtol=1e-5)  # log-probabilities of the expert alone
    assert fused.argmax() == 2
    half = replace(expert, fusion=0.5).fuse(network, blank[None])
    assert half.argmax() == 0 and np.isfinite(half).all()


def test_a_damaged_morphology_section_is_refused_in_one_line() -> None:
    f = len(FEATURES)
    good = MorphologyExpert(np.zeros(f), np.ones(f), np.zeros((2, f)), np.zeros(2)).to_dict()
    card = ModelCard(class_names=["a", "b"], mode="finetune", backbone="tiny_cnn", preprocessing=Preprocessing(32),
                     morphology=good)
    ModelCard.from_dict(card.to_dict())  # a round trip keeps it
    for damage, words in [({"std": [0.0] * f}, "non-positive"), ({"weight": [[0.0] * f] * 3}, "shapes"),
                          ({"mean": [float("nan")] * f}, "non-finite"), ({"features": ["x"]}, "features"),
                          ({"fusion": 2.0}, "out of range")]:
        with pytest.raises(RunFolderError, match=f"morphology: .*{words}"):
            ModelCard.from_dict({**card.to_dict(), "morphology": {**good, **damage}})


@pytest.fixture(scope="module")
def morph_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("labs")
    labs = {"train": write_lab(root / "train", 24, seed=0), "other": write_lab(root / "other", 12, seed=4, other=True)}
    out = train_on_one_thread(tmp_path_factory, tmp_path_factory.mktemp("runs") / "morph", "--data", str(labs["train"]),
                              "--mode", "frozen", "--image-size", "48", "--lab-standardise", "--morphology")
    return out, labs


def test_train_fits_the_expert_and_another_labs_cells_get_it(morph_run: tuple[Path, dict[str, Path]], tmp_path: Path,
                                                              one_thread: None) -> None:
    from hematovision.data.folder import load_rgb
    from hematovision.infer.morphology import measure
    from hematovision.infer.predictor import Predictor

    run, labs = morph_run
    card = json.loads((run / "model_card.json").read_text())
    section = card["morphology"]
    assert section["standardisation"] == "per_lab" and section["features"] == list(FEATURES) and section["lab"] is None
    assert set(section["fit"]) >= {"C", "val_balanced_accuracy", "not_measured"}

    # On the training labs' own statistics the network speaks alone ...
    images = [load_rgb(p) for p in sorted(labs["other"].rglob("*.png"))[:6]]
    predictor = Predictor.from_run_dir(run, backend="torch")
    assert predictor.morphology is not None and predictor.morphology.lab is None
    network = predictor.logits(images)
    assert not predictor.kept_morphology().size
    # ... evaluate re-scores another lab's folder on its own statistics with the expert ...
    assert main(["evaluate", str(run), "--data", str(labs["other"]), "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())["lab_standardisation"]
    assert record["applied"] and record["morphology"] and "morphology expert" in record["description"]
    # ... and a run adapted to the lab fuses it into every prediction, with the lab's statistics.
    adapted = tmp_path / "adapted"
    assert main(["adapt", str(run), "--out", str(adapted), "--unlabelled", str(labs["other"])]) == 0
    lab_card = json.loads((adapted / "model_card.json").read_text())
    assert lab_card["morphology"]["lab"] == "other" and lab_card["morphology"]["mean"] != section["mean"]
    assert "morphology expert" in " ".join(lab_card["adaptation"]["adapted"])
    lab_predictor = Predictor.from_run_dir(adapted, backend="torch")
    expert = lab_predictor.morphology
    assert expert is not None
    fused = lab_predictor.logits(images)
    # Measured before the stain normalisation (none here): the same numbers as measure() on the file.
    measured = np.stack([measure(image, lab_predictor.prep) for image in images])
    lab_predictor.morphology = None
    np.testing.assert_allclose(fused, expert.fuse(lab_predictor.logits(images), measured), rtol=1e-5, atol=1e-5)
    assert not np.allclose(fused, network)
    # The web app's engine fuses the same expert into its answers.
    from hematovision.evaluate.metrics import softmax
    from hematovision.serve.engine import Engine

    lab_predictor.morphology = expert
    engine = Engine(lab_predictor, adapted, backend="torch", threads=1)
    answers = engine.run_batch([engine.prepare(image) for image in images])
    served = np.array([[answer.probabilities[name] for name in lab_predictor.class_names] for answer in answers])
    np.testing.assert_allclose(served, softmax(fused, lab_predictor.temperature), rtol=1e-4, atol=1e-5)


def test_morphology_needs_lab_standardise(morph_run: tuple[Path, dict[str, Path]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, labs = morph_run
    assert main(["train", "--data", str(labs["train"]), "--out", str(tmp_path / "run"), "--morphology"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--morphology goes with --lab-standardise" in err[0]


def test_few_shot_adapt_fits_the_labs_own_expert_only_when_it_pays(morph_run: tuple[Path, dict[str, Path]],
                                                                   tmp_path: Path, one_thread: None) -> None:
    run, labs = morph_run
    out = tmp_path / "few"
    assert main(["adapt", str(run), "--out", str(out), "--data", str(labs["other"]), "--k-per-class", "5",
                 "--no-finetune"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    record = card["adaptation"]["morphology"]
    assert "out-of-fold" in record and "network alone" in record
    if record.startswith("no morphology expert"):
        assert "morphology" not in card
    else:
        assert card["morphology"]["lab"] == "other" and card["morphology"]["standardisation"] == "training"
        assert record in card["adaptation"]["adapted"]


def test_the_choice_is_out_of_fold() -> None:
    """An expert that cannot beat the network out-of-fold is left out; one that can is kept."""
    from hematovision.adapt import morphology as adapt_morphology

    f, k = len(FEATURES), 2
    source = MorphologyExpert(np.zeros(f), np.ones(f), np.zeros((k, f)), np.zeros(k), fusion=0.5)
    card = ModelCard(class_names=["a", "b"], mode="finetune", backbone="tiny_cnn", preprocessing=Preprocessing(32),
                     morphology=source.to_dict())
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    measured = rng.normal(0, 1, (40, f))
    measured[:, 0] += 3 * labels  # one measurement tells the classes apart
    perfect = np.stack([1 - labels, labels], axis=1) * 4.0
    _, section, record = adapt_morphology.lab_expert(card, measured, labels, perfect, "lab", seed=0)
    assert section is None and record is not None and record.startswith("no morphology expert")
    coin = rng.normal(0, 1, (40, 2))  # a network that guesses
    fused, section, record = adapt_morphology.lab_expert(card, measured, labels, coin, "lab", seed=0)
    assert section is not None and section["lab"] == "lab" and (fused.argmax(1) == labels).mean() >= 0.75


def test_cells_are_measured_before_stain_normalisation() -> None:
    """Reinhard's mapping moves what the finder and the hues see: the expert measures the lab's own colours."""
    from hematovision.data.stain import fit_stain_reference
    from hematovision.infer.morphology import measure, prepare_measured

    image = _cell(20, lobes=3, gain=(0.9, 0.85, 0.6))
    reference = fit_stain_reference([_cell(14, cytoplasm=(150, 190, 230), nucleus=(40, 120, 60), seed=s)
                                     for s in range(3)], "reinhard")
    prep = Preprocessing(64, cell_scale=0.38, stain=reference)
    prepared = prepare_measured(image, prep)
    np.testing.assert_array_equal(prepared.pixels, prep.prepare(image))
    unstained = Preprocessing(64, cell_scale=0.38)
    np.testing.assert_allclose(prepared.measured, measure(image, unstained), equal_nan=True)
    assert not np.allclose(prepared.measured, cell_features(prepared.pixels), equal_nan=True)
