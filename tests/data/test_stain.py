"""Stain normalisation and stain/optics augmentation (hematovision.data.stain)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hematovision.data.stain import (
    STAIN_METHODS,
    augment_stain,
    check_stain_reference,
    fit_stain_reference,
    lab_statistics,
    normalize_stain,
)
from hematovision.data.transforms import Preprocessing, resize

# Stain vectors (optical density per RGB channel) of a purple nuclear dye and a pink eosin-like dye.
NUCLEAR = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


def smear(rng: np.random.Generator, size: int = 64, depth: float = 1.0, light: tuple[float, float, float] = (1, 1, 1),
          nuclear: np.ndarray = NUCLEAR) -> np.ndarray:
    """A synthetic smear crop built from optical densities: pink red cells and one purple nucleus.

    ``depth`` scales how much dye took (staining time), ``light`` tints the lamp and camera,
    ``nuclear`` is the nuclear dye's colour: the three ways another lab's image differs.
    """
    yy, xx = np.mgrid[:size, :size]
    eosin = np.zeros((size, size))
    for _ in range(6):
        cy, cx = rng.uniform(0, size, 2)
        eosin[(yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.15) ** 2] = 0.35
    cy, cx = size / 2 + rng.uniform(-3, 3, 2)
    cell = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.25) ** 2
    nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.15) ** 2
    eosin[cell] = 0.15
    hema = np.where(nucleus, 0.9, np.where(cell, 0.25, 0.0))
    od = depth * (hema[..., None] * nuclear + eosin[..., None] * EOSIN) + rng.normal(0, 0.01, (size, size, 3))
    rgb = 250 * np.exp(-od) * np.asarray(light)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def lab_distance(images: list[np.ndarray], target: tuple[np.ndarray, np.ndarray]) -> float:
    """Distance (CIELAB units) between a set's average per-image mean and std and a target's."""
    stats = [np.concatenate(lab_statistics(image)) for image in images]
    return float(np.linalg.norm(np.mean(stats, axis=0) - np.concatenate(target)))


def _lab_target(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stats = [lab_statistics(image) for image in images]
    return np.mean([m for m, _ in stats], axis=0), np.mean([s for _, s in stats], axis=0)


def _needs(method: str) -> None:
    if method == "macenko":
        pytest.importorskip("torchstain")


BLANKS = {
    "white": np.full((40, 40, 3), 255, np.uint8),
    "black": np.zeros((40, 40, 3), np.uint8),
    "grey": np.full((40, 40, 3), 128, np.uint8),
    "faint": np.full((40, 40, 3), 240, np.uint8) + (np.arange(40) % 2).astype(np.uint8)[:, None, None],
    "one pixel": np.full((1, 1, 3), 200, np.uint8),
}


# --- augmentation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 64, 3), (48, 80, 3), (32, 32, 3)])
def test_augmentation_keeps_shape_dtype_and_range_and_changes_the_image(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    image = resize(smear(rng, 96), shape[0]) if shape[0] == shape[1] else smear(rng, 96)[: shape[0], : shape[1]]
    changed = 0
    for seed in range(20):
        out = augment_stain(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += not np.array_equal(out, image)
    assert changed >= 18  # almost every call changes the stain or the optics


def test_augmentation_is_seeded() -> None:
    image = smear(np.random.default_rng(1))
    first = augment_stain(image, np.random.default_rng(7))
    assert np.array_equal(first, augment_stain(image, np.random.default_rng(7)))
    assert not np.array_equal(first, augment_stain(image, np.random.default_rng(8)))


def test_augmentation_strength_zero_is_the_identity_and_negative_is_refused() -> None:
    image = smear(np.random.default_rng(2))
    assert np.array_equal(augment_stain(image, np.random.default_rng(0), strength=0), image)
    with pytest.raises(ValueError):
        augment_stain(image, np.random.default_rng(0), strength=-1)


def test_augmentation_spreads_stains_as_widely_as_labs_differ() -> None:
    # Strength 1 samples the between-lab spread of the CIELAB means (7, 4.5 and 11 units):
    # the copies of one image must vary by a comparable amount, not by a shade.
    image = smear(np.random.default_rng(3))
    means = np.array([lab_statistics(augment_stain(image, np.random.default_rng(s)))[0] for s in range(60)])
    assert means.std(axis=0)[0] > 3 and means.std(axis=0)[2] > 3
    weak = np.array([lab_statistics(augment_stain(image, np.random.default_rng(s), 0.2))[0] for s in range(60)])
    assert (weak.std(axis=0) < means.std(axis=0)).all()


@pytest.mark.parametrize("name", list(BLANKS))
def test_augmentation_of_blank_images_stays_in_range(name: str) -> None:
    out = augment_stain(BLANKS[name], np.random.default_rng(0))
    assert out.shape == BLANKS[name].shape and out.dtype == np.uint8


# --- normalisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", STAIN_METHODS)
def test_normalisation_brings_another_labs_images_closer_to_the_reference(method: str) -> None:
    _needs(method)
    rng = np.random.default_rng(0)
    ours = [smear(rng) for _ in range(12)]
    reference = fit_stain_reference(ours, method)
    target = _lab_target(ours)
    # Another lab: stains that took 60% more, a bluish lamp, and a bluer nuclear dye (10 degrees off).
    bluer = NUCLEAR + np.array([0.1, 0.0, -0.1])
    theirs = [smear(rng, depth=1.6, light=(0.85, 0.92, 1.0), nuclear=bluer / np.linalg.norm(bluer)) for _ in range(12)]
    before = lab_distance(theirs, target)
    after = lab_distance([normalize_stain(image, reference) for image in theirs], target)
    assert before > 10
    assert after < 0.5 * before, (before, after)
    # Our own images move less than the other lab's had to. Macenko moves them more than Reinhard:
    # pink cells are too faint in red and blue to count as stained for torchstain, so an image's two
    # stain vectors come from the white cell alone and its reconstruction is lossy (so on PBC too).
    own = lab_distance([normalize_stain(image, reference) for image in ours], target)
    assert own < (0.2 if method == "reinhard" else 0.5) * before, (own, before)


@pytest.mark.parametrize("method", STAIN_METHODS)
@pytest.mark.parametrize("name", list(BLANKS))
def test_blank_white_and_black_images_come_back_unchanged(method: str, name: str) -> None:
    _needs(method)
    reference = fit_stain_reference([smear(np.random.default_rng(i)) for i in range(4)], method)
    image = BLANKS[name]
    out = normalize_stain(image, reference)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, image)


@pytest.mark.parametrize("method", STAIN_METHODS)
def test_any_image_gives_finite_uint8_of_the_same_shape(method: str) -> None:
    _needs(method)
    reference = fit_stain_reference([smear(np.random.default_rng(i)) for i in range(4)], method)
    rng = np.random.default_rng(5)
    odd = [rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),  # noise
           np.concatenate([np.zeros((20, 40, 3), np.uint8), np.full((20, 40, 3), 255, np.uint8)]),  # two flat halves
           smear(rng, depth=0.05), smear(rng, depth=6.0)]  # barely stained, nearly black
    for image in odd:
        out = normalize_stain(image, reference)
        assert out.dtype == np.uint8 and out.shape == image.shape


def test_prepare_normalises_before_the_resize() -> None:
    reference = fit_stain_reference([smear(np.random.default_rng(i)) for i in range(4)], "reinhard")
    image = smear(np.random.default_rng(9), depth=1.5, size=80)
    prep = Preprocessing(32, stain=reference)
    assert np.array_equal(prep.prepare(image), resize(normalize_stain(image, reference), 32))


# --- references -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", STAIN_METHODS)
def test_reference_round_trips_through_the_model_card(method: str, tmp_path: Path) -> None:
    _needs(method)
    from hematovision.run import ModelCard, read_card, write_card

    reference = fit_stain_reference([smear(np.random.default_rng(i)) for i in range(6)], method)
    assert reference["method"] == method
    card = ModelCard(class_names=["a", "b"], mode="finetune", backbone="tiny_cnn",
                     preprocessing=Preprocessing(32, stain=reference))
    write_card(tmp_path, card)
    back = read_card(tmp_path).preprocessing.stain
    assert back == json.loads(json.dumps(reference)) == reference
    image = smear(np.random.default_rng(11), depth=1.4)
    assert np.array_equal(normalize_stain(image, back), normalize_stain(image, reference))


def test_fitting_is_seeded_and_ignores_blank_images() -> None:
    images = [smear(np.random.default_rng(i)) for i in range(8)]
    assert fit_stain_reference(images, "reinhard") == fit_stain_reference(images, "reinhard")
    with_blanks = images + [BLANKS["white"]] * 3
    assert fit_stain_reference(with_blanks, "reinhard")["n_images"] == len(images)
    with pytest.raises(ValueError, match="blank"):
        fit_stain_reference([BLANKS["white"], BLANKS["black"]], "reinhard")
    with pytest.raises(ValueError, match="unknown stain"):
        fit_stain_reference(images, "vahadane")


@pytest.mark.parametrize("reference", [
    None, {"method": "vahadane"}, {"method": "reinhard", "target_means": [1, 2], "target_stds": [1, 1, 1]},
    {"method": "reinhard", "target_means": [50, 0, 0], "target_stds": [1, float("nan"), 1]},
    {"method": "reinhard", "target_means": [50, 0, 0], "target_stds": [1, 0, 1]},
    {"method": "macenko", "he_matrix": [[0.6, 0.1], [0.7, 0.9], [0.3, 0.1]], "max_concentrations": [1.0, 1.0]},
])
def test_broken_references_are_refused_with_a_reason(reference: object) -> None:
    with pytest.raises(ValueError, match="stain reference"):
        check_stain_reference(reference)
    with pytest.raises(ValueError, match="stain reference"):
        normalize_stain(BLANKS["grey"], reference)  # type: ignore[arg-type]
