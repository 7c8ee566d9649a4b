"""``hematovision gan report``: the numbers, recomputed, not only the headings.

Three tiny GANs (32 px, 2 iterations) are trained on the train rows of a split and reported on
through the CLI with the default EfficientNet-Lite0 features. The report compares sets cut to
the held-out size m by random draws; the split is sized so that every draw is either the whole
set (one possible Fréchet distance) or one of a few enumerable subsets, each computed here from
the cached features with scipy. Every other figure (probes, memorisation, diversity,
augmentation) is recomputed with numpy/scikit-learn, and ``report.md`` must show what
``metrics.json`` holds.

===========  =====  ============  ===========================================
class        train  held-out (m)  draws of m
===========  =====  ============  ===========================================
basophil     4      4             train: whole set; synthetic: 15 subsets of 6
monocyte     3      2             train: 3 subsets; synthetic: 15 subsets of 6
neutrophil   6      6             train and synthetic: whole sets
===========  =====  ============  ===========================================
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import linalg
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hematovision.cli import main

CLASSES = ["basophil", "monocyte", "neutrophil"]
TRAIN = {"basophil": 4, "monocyte": 3, "neutrophil": 6}
TEST = {"basophil": 4, "monocyte": 2, "neutrophil": 6}
N_SYNTHETIC = 6
GAN = ["--size", "32", "--iterations", "2", "--width", "4", "--batch-size", "4", "--threads", "1", "--no-progress"]
LITE0_FEATURES = 2 * (40 + 80 + 112 + 192) + 1280  # pooled mean+std of stages 2-5, and the head


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train the GANs and write the report; returns paths and the split as built."""
    import torch

    from hematovision.data.folder import Sample
    from hematovision.data.splits import write_split_csv

    root = tmp_path_factory.mktemp("gan_report")
    rng = np.random.default_rng(0)
    colours = {"basophil": (70, 30, 120), "monocyte": (120, 100, 160), "neutrophil": (170, 90, 170)}
    yy, xx = np.mgrid[:40, :40]
    samples, parts = [], []
    for label in CLASSES:
        (root / "data" / label).mkdir(parents=True)
        for i in range(TRAIN[label] + TEST[label]):
            image = np.full((40, 40, 3), 225, np.uint8) + rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
            image[(yy - 20) ** 2 + (xx - 20) ** 2 < rng.uniform(8, 13) ** 2] = colours[label]
            path = root / "data" / label / f"{label}_{i}.png"
            Image.fromarray(image).save(path)
            samples.append(Sample(path, label))
            parts.append("train" if i < TRAIN[label] else "test")
    split = write_split_csv(root / "split.csv", samples, parts, [str(i) for i in range(len(samples))])
    previous = torch.get_num_threads()
    try:
        assert main(["gan", "train", "--split", str(split), "--all", "--out", str(root / "run"), *GAN]) == 0
        assert main(["gan", "report", str(root / "run"), "--split", str(split), "--out", str(root / "report"),
                     "--n-synthetic", str(N_SYNTHETIC), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(previous)
    out = root / "report"
    return {
        "out": out,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "markdown": (out / "report.md").read_text(),
        "train": [s for s, p in zip(samples, parts) if p == "train"],
        "test": [s for s, p in zip(samples, parts) if p == "test"],
    }


@pytest.fixture(scope="module")
def features(report: dict) -> dict[str, np.ndarray]:
    """The report's cached features and labels, in the report's order."""
    out = report["out"]
    loaded = {name: np.load(out / f"features_{name}.npz")["features"].astype(np.float64)
              for name in ("real_train", "real_test", "synthetic")}
    return {
        "train": loaded["real_train"], "test": loaded["real_test"], "syn": loaded["synthetic"],
        "y_train": np.array([CLASSES.index(s.label) for s in report["train"]]),
        "y_test": np.array([CLASSES.index(s.label) for s in report["test"]]),
        "y_syn": np.repeat(np.arange(len(CLASSES)), N_SYNTHETIC),  # classes in sorted order
    }


# ----------------------------------------------------------------------------- references


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussian fits, with scipy's symmetric eigensolver.

    Both covariances live in the span of the centred rows, so they are written in an
    orthonormal basis of that span (at most N + M - 2 dimensions) first. Then
    ``tr sqrt(Ca Cb) = tr sqrt(Ca^1/2 Cb Ca^1/2)``, the square roots of a symmetric PSD
    matrix's eigenvalues (the package takes singular values of a cross product instead).
    """
    ca, cb = a - a.mean(0), b - b.mean(0)
    basis = linalg.orth(np.concatenate([ca, cb]).T)
    pa, pb = ca @ basis, cb @ basis
    cov_a, cov_b = pa.T @ pa / (len(a) - 1), pb.T @ pb / (len(b) - 1)
    values, vectors = linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    cross = np.sqrt(np.clip(linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def cosine_nearest(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance (1 - cosine similarity) from each query row to its nearest reference row."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    return 1.0 - (q @ r.T).max(axis=1)


def mean_pairwise(x: np.ndarray) -> float:
    """Mean cosine distance over the ordered pairs of distinct rows."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    return float(np.mean([1.0 - unit[i] @ unit[j] for i in range(n) for j in range(n) if i != j]))


def probe(x: np.ndarray, y: np.ndarray, class_weight: str | None = None):
    """The report's documented head: standardised logistic regression, C = 1, seed 0."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, class_weight=class_weight,
                                                              random_state=0)).fit(x, y)


def recalls(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    values = recall_score(y_true, y_pred, labels=range(len(CLASSES)), average=None, zero_division=0)
    return dict(zip(CLASSES, map(float, values)))


def _rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Table rows of one report section: first cell → the other cells."""
    section = markdown.split(heading, 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _num(cell: str) -> float:
    """A printed number: "12.5%" → 0.125, "3.142" → 3.142."""
    value = float(re.fullmatch(r"([-+]?[\d.]+)\s*(%?)", cell)[1])
    return value / 100 if cell.endswith("%") else value


# ----------------------------------------------------------------------------- tests


def test_counts_and_setup(report: dict, features: dict) -> None:
    metrics = report["metrics"]
    assert metrics["classes"] == CLASSES and metrics["size"] == 32
    assert metrics["train_counts"] == TRAIN and metrics["test_counts"] == TEST
    assert metrics["n_synthetic_per_class"] == N_SYNTHETIC
    assert metrics["feature_dim"] == LITE0_FEATURES
    assert features["train"].shape == (13, LITE0_FEATURES) and features["test"].shape == (12, LITE0_FEATURES)
    assert features["syn"].shape == (18, LITE0_FEATURES)
    for name in CLASSES:
        assert metrics["gan_training"][name]["iterations"] == 2
        assert metrics["gan_training"][name]["num_train_images"] == TRAIN[name]  # the train rows only
    rows = _rows(report["markdown"], "| class | real train |")
    for name in CLASSES:
        assert rows[name][:3] == [str(TRAIN[name]), str(TEST[name]), "2"]
    assert rows["all"][:2] == ["13", "12"]


def test_cached_features_are_the_features_of_the_split_images(report: dict, features: dict) -> None:
    # The report works at the GAN's 32 px, then upsamples for the 224-px backbone.
    from hematovision.train.features import FeatureExtractor

    def prepared(sample) -> np.ndarray:
        small = Image.open(sample.path).convert("RGB").resize((32, 32), Image.BICUBIC)
        return np.asarray(small.resize((224, 224), Image.BICUBIC))

    extractor = FeatureExtractor()
    for part in ("train", "test"):
        fresh = extractor.extract(np.stack([prepared(s) for s in report[part]]))
        np.testing.assert_allclose(features[part], fresh, rtol=1e-4, atol=1e-4)


def test_frechet_distances_recomputed_with_scipy(report: dict, features: dict) -> None:
    fd, f = report["metrics"]["check3_frechet"], features

    def subsets(reference: np.ndarray, candidates: np.ndarray) -> list[float]:
        """The distance of every possible draw of len(reference) rows of ``candidates``."""
        return [frechet(reference, candidates[list(rows)])
                for rows in itertools.combinations(range(len(candidates)), len(reference))]

    for k, name in enumerate(CLASSES):
        reference = f["test"][f["y_test"] == k]
        train, syn = f["train"][f["y_train"] == k], f["syn"][f["y_syn"] == k]
        assert fd[name]["n_reference"] == len(reference) == TEST[name]
        for key, candidates in (("real_train", train), ("synthetic", syn)):
            values, possible = fd[name][key], subsets(reference, candidates)
            assert len(values) == 10
            if len(possible) == 1:  # the whole set each time: one value, ten times
                assert values == pytest.approx(possible * 10, rel=1e-4), (name, key)
            for value in values:  # each reported value is the distance of one possible draw
                assert min(abs(value - p) for p in possible) <= 1e-4 * max(possible), (name, key, value)
        # Other classes with at least m training cells: the mean of 3 draws lies among the possible ones.
        expected_others = [other for j, other in enumerate(CLASSES)
                           if j != k and TRAIN[other] >= TEST[name]]
        assert sorted(fd[name]["other_classes"]) == expected_others
        for other in expected_others:
            possible = subsets(reference, f["train"][f["y_train"] == CLASSES.index(other)])
            assert min(possible) - 1e-6 <= fd[name]["other_classes"][other] <= max(possible) + 1e-6
    assert sorted(fd["monocyte"]["other_classes"]) == ["basophil", "neutrophil"]
    reference = f["test"][f["y_test"] == 0]
    # The reference itself: a set against itself is ~0; a shifted copy is the squared shift further away.
    assert frechet(reference, reference) == pytest.approx(0.0, abs=1e-6 * np.abs(reference).max() ** 2)
    shift = np.full(reference.shape[1], 0.01)
    assert frechet(reference, reference + shift) == pytest.approx(np.sum(shift**2), rel=1e-3)

    rows = _rows(report["markdown"], "### 3. Fréchet")
    for name in CLASSES:
        real, syn = np.array(fd[name]["real_train"]), np.array(fd[name]["synthetic"])
        cells = rows[name]
        assert int(cells[0]) == fd[name]["n_reference"]
        assert [float(v) for v in cells[1].split(" ± ")] == pytest.approx([real.mean(), real.std()], abs=0.051)
        assert [float(v) for v in cells[2].split(" ± ")] == pytest.approx([syn.mean(), syn.std()], abs=0.051)
        assert float(cells[3]) == pytest.approx(syn.mean() / real.mean(), abs=0.0051)
        others = fd[name]["other_classes"]
        if others:
            nearest = min(others, key=others.get)
            assert cells[4] == f"{nearest}: {others[nearest]:.1f}"
        else:
            assert cells[4] == "–"


def test_memorisation_and_diversity_recomputed(report: dict, features: dict) -> None:
    metrics, f = report["metrics"], features
    memo_rows = _rows(report["markdown"], "### 4. Memorisation")
    diversity_rows = _rows(report["markdown"], "### Diversity")
    for k, name in enumerate(CLASSES):
        train = f["train"][f["y_train"] == k]
        d_syn = cosine_nearest(f["syn"][f["y_syn"] == k], train)
        d_held = cosine_nearest(f["test"][f["y_test"] == k], train)
        memo = metrics["check4_memorisation"][name]
        np.testing.assert_allclose(memo["distances_synthetic"], d_syn, atol=1e-9)
        np.testing.assert_allclose(memo["distances_heldout"], d_held, atol=1e-9)
        p5 = np.percentile(d_held, 5)
        expected = {"synthetic_median": np.median(d_syn), "synthetic_min": d_syn.min(),
                    "heldout_median": np.median(d_held), "heldout_min": d_held.min(), "heldout_p5": p5,
                    "synthetic_below_heldout_p5": np.mean(d_syn < p5)}
        for key, value in expected.items():
            assert memo[key] == pytest.approx(value, abs=1e-9), key
        # Leave-one-out among train cells: distance to the nearest *other* train cell (the report
        # computes this one in float32, hence the looser tolerance).
        others = [cosine_nearest(train[i:i + 1], np.delete(train, i, axis=0))[0] for i in range(len(train))]
        assert memo["train_leave_one_out_median"] == pytest.approx(np.median(others), abs=1e-6)
        printed = [_num(cell) for cell in memo_rows[name]]
        assert printed[:5] == pytest.approx([memo[key] for key in ("synthetic_median", "synthetic_min", "heldout_median",
                                                                     "heldout_p5", "heldout_min")], abs=0.00051)
        assert printed[5] == pytest.approx(memo["synthetic_below_heldout_p5"], abs=0.00051)

        diversity = metrics["diversity"][name]
        # float32 in the report too: 1 - cosine loses ~1e-7 to cancellation.
        assert diversity["synthetic"] == pytest.approx(mean_pairwise(f["syn"][f["y_syn"] == k]), abs=1e-6)
        assert diversity["real_train"] == pytest.approx(mean_pairwise(train), abs=1e-6)
        printed = [float(cell) for cell in diversity_rows[name]]
        assert printed == pytest.approx([diversity["synthetic"], diversity["real_train"],
                                         diversity["synthetic"] / diversity["real_train"]], abs=0.0051)


def test_probe_checks_recomputed(report: dict, features: dict) -> None:
    metrics, f = report["metrics"], features
    real_probe = probe(f["train"], f["y_train"])
    pred_syn, pred_real = real_probe.predict(f["syn"]), real_probe.predict(f["test"])
    c1 = metrics["check1_real_to_synthetic"]
    assert c1["per_class"] == pytest.approx(recalls(f["y_syn"], pred_syn))
    assert c1["overall"] == pytest.approx(np.mean(pred_syn == f["y_syn"]))
    assert c1["same_probe_on_heldout_real"] == pytest.approx(recalls(f["y_test"], pred_real))
    assert c1["same_probe_on_heldout_real_overall"] == pytest.approx(np.mean(pred_real == f["y_test"]))

    pred_from_syn = probe(f["syn"], f["y_syn"]).predict(f["test"])
    c2 = metrics["check2_synthetic_to_real"]
    assert c2["accuracy"] == pytest.approx(np.mean(pred_from_syn == f["y_test"]))
    assert c2["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(f["y_test"], pred_from_syn))
    assert c2["per_class"] == pytest.approx(recalls(f["y_test"], pred_from_syn))
    assert c2["real_trained_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(f["y_test"], pred_real))

    rows = _rows(report["markdown"], "### 1. Real-trained")
    for name in CLASSES:
        assert [_num(c) for c in rows[name]] == pytest.approx(
            [c1["per_class"][name], c1["same_probe_on_heldout_real"][name]], abs=0.00051)
    rows = _rows(report["markdown"], "### 2. Synthetic-trained")
    assert [_num(c) for c in rows["synthetic only"]] == pytest.approx(
        [c2["accuracy"], c2["balanced_accuracy"], *(c2["per_class"][n] for n in CLASSES)], abs=0.00051)


def test_augmentation_check_recomputed(report: dict, features: dict) -> None:
    c5, f = report["metrics"]["check5_augmentation"], features
    # The scarce classes are topped up to neutrophil's 6 train cells with their first synthetic cells.
    assert c5["synthetic_added"] == {"basophil": 2, "monocyte": 3}
    extra = [f["syn"][f["y_syn"] == 0][:2], f["syn"][f["y_syn"] == 1][:3]]
    predictions = {
        "real": probe(f["train"], f["y_train"]).predict(f["test"]),
        "real_balanced": probe(f["train"], f["y_train"], "balanced").predict(f["test"]),
        "real_plus_synthetic": probe(np.concatenate([f["train"], *extra]),
                                     np.concatenate([f["y_train"], [0, 0, 1, 1, 1]])).predict(f["test"]),
    }
    y = f["y_test"]
    rows = _rows(report["markdown"], "### 5. Does adding")
    for variant, pred in predictions.items():
        values = c5["variants"][variant]
        assert values["accuracy"] == pytest.approx(np.mean(pred == y))
        assert values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert values["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert values["recall"] == pytest.approx(recalls(y, pred))
        assert values["correct"] == {n: int(np.sum((pred == y) & (y == k))) for k, n in enumerate(CLASSES)}
        printed = [_num(c) for c in rows[variant.replace("_", " ")]]
        assert printed == pytest.approx([values["accuracy"], values["balanced_accuracy"], values["macro_f1"],
                                         *(values["recall"][n] for n in CLASSES)], abs=0.00051)
    for variant in ("real_balanced", "real_plus_synthetic"):
        for k, name in enumerate(CLASSES):
            delta, low, high = c5["delta_vs_real"][variant][name]
            recall_k = [np.mean(predictions[v][y == k] == k) for v in (variant, "real")]
            assert delta == pytest.approx(recall_k[0] - recall_k[1])
            assert -1.0 <= low <= high <= 1.0
