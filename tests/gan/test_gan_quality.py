"""Quality functions on tiny arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from hematovision.gan import quality


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(50, 8))
    assert quality.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift() -> None:
    features = np.random.default_rng(1).normal(size=(40, 6))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    # Same covariance, so only the mean term remains: |shift|^2 = 14.25.
    assert quality.frechet_distance(features, features + shift) == pytest.approx(14.25, rel=1e-9)


def test_frechet_distance_of_known_gaussians() -> None:
    rng = np.random.default_rng(2)
    # N(0, I) vs N(0, 4I) in d dimensions: d * (1 + 4 - 2 * 2) = d.
    a, b = rng.normal(size=(20000, 3)), 2.0 * rng.normal(size=(20000, 3))
    assert quality.frechet_distance(a, b) == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("n_a, n_b, dim", [(60, 50, 10), (12, 15, 40), (30, 8, 20)])
def test_frechet_distance_matches_scipy_sqrtm(n_a: int, n_b: int, dim: int) -> None:
    # The second case has fewer samples than dimensions: rank-deficient covariances.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(n_a, dim)), rng.normal(0.3, 1.5, size=(n_b, dim))
    assert quality.frechet_distance(a, b) == pytest.approx(quality.frechet_distance_sqrtm(a, b), rel=1e-5)


def test_frechet_distance_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        quality.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        quality.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_matched_frechet_draws_the_requested_size() -> None:
    rng = np.random.default_rng(4)
    reference, candidates = rng.normal(size=(20, 4)), rng.normal(size=(50, 4))
    distances = quality.matched_frechet(reference, candidates, size=20, repeats=3, seed=0)
    assert distances.shape == (3,) and np.all(distances >= 0)
    assert np.array_equal(distances, quality.matched_frechet(reference, candidates, size=20, repeats=3, seed=0))
    with pytest.raises(ValueError):
        quality.matched_frechet(reference, candidates[:10], size=20)


def test_nearest_neighbours_finds_copies_at_zero_distance() -> None:
    reference = np.random.default_rng(5).normal(size=(30, 5))
    query = reference[[7, 3]] * 2.5  # a scaled copy has cosine distance 0
    index, distance = quality.nearest_neighbours(query, reference, batch=1)
    assert index.tolist() == [7, 3]
    assert np.allclose(distance, 0.0, atol=1e-12)
    _, far = quality.nearest_neighbours(-reference[:1], reference[:1])
    assert far[0] == pytest.approx(2.0)


def test_leave_one_out_nearest_sees_duplicates() -> None:
    features = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert quality.leave_one_out_nearest(features).tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_recall_and_balanced_accuracy() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 1])
    assert quality.per_class_recall(y_true, y_pred, 3).tolist()[:2] == [0.75, 1.0]
    assert np.isnan(quality.per_class_recall(y_true, y_pred, 3)[2])
    assert quality.balanced_accuracy(y_true, y_pred, 3) == pytest.approx(0.875)


def test_paired_bootstrap_delta() -> None:
    y_true = np.array([0] * 10 + [1] * 10)
    same = y_true.copy()
    assert quality.paired_bootstrap_recall_delta(y_true, same, same, 0) == (0.0, 0.0, 0.0)
    better = same.copy()
    worse = same.copy()
    worse[:5] = 1  # half of class 0 missed
    delta, low, high = quality.paired_bootstrap_recall_delta(y_true, worse, better, 0, seed=1)
    assert delta == pytest.approx(0.5)
    assert 0.0 < low <= delta <= high <= 1.0


def test_linear_probe_separates_separable_classes() -> None:
    rng = np.random.default_rng(6)
    features = np.concatenate([rng.normal(-3, 1, (30, 4)), rng.normal(3, 1, (30, 4))])
    labels = np.array([0] * 30 + [1] * 30)
    probe = quality.fit_linear_probe(features, labels)
    assert np.mean(probe.predict(features) == labels) == 1.0


def test_mean_pairwise_distance_of_known_sets() -> None:
    from hematovision.gan.quality import mean_pairwise_distance

    assert mean_pairwise_distance(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_distance(np.eye(4)) == pytest.approx(1.0)  # orthogonal rows
    # Two copies of a and one b orthogonal to it: pairs (a, a) 0, (a, b) 1 twice -> 2/3.
    assert mean_pairwise_distance(np.array([[1.0, 0], [2.0, 0], [0, 3.0]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        mean_pairwise_distance(np.ones((1, 3)))
