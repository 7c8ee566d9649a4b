"""The few-shot review threshold: a fitted curve of being right, not one lucky or unlucky cell."""

from __future__ import annotations

import numpy as np

from hematovision.adapt.head import smoothed_threshold_for
from hematovision.export.calibrate import confidence_threshold_for


def _cells(seed: int, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Mostly confident predictions whose chance of being right is their confidence (calibrated)."""
    rng = np.random.default_rng(seed)
    confidence = np.clip(rng.beta(6, 1, n), 0.3, 0.9999)
    return confidence, rng.random(n) < confidence


def _on_new_cells(rule, draws: int = 40, target: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and accuracy on 20,000 new cells of thresholds set on ``draws`` sets of 100 cells."""
    new_confidence, new_correct = _cells(999, 20_000)
    coverage, accuracy = [], []
    for seed in range(draws):
        accepted = new_confidence >= rule(*_cells(seed), target)[0]
        coverage.append(accepted.mean())
        accuracy.append(new_correct[accepted].mean() if accepted.any() else np.nan)
    return np.array(coverage), np.array(accuracy)


def test_the_fitted_threshold_is_steadier_than_the_walk_from_the_top() -> None:
    walk_coverage, walk_accuracy = _on_new_cells(confidence_threshold_for)
    fitted_coverage, fitted_accuracy = _on_new_cells(smoothed_threshold_for)
    assert walk_coverage.min() < 0.1 < fitted_coverage.min()  # no draw where nearly everything is flagged
    assert fitted_coverage.std() < walk_coverage.std()
    assert np.nanmin(fitted_accuracy) >= np.nanmin(walk_accuracy) and np.nanmean(fitted_accuracy) >= 0.94


def test_it_reports_what_it_accepts_on_the_cells() -> None:
    confidence, correct = _cells(3)
    threshold, coverage, accuracy, rule = smoothed_threshold_for(confidence, correct, 0.95)
    accepted = confidence >= threshold
    assert rule == "fitted" and 0.5 <= threshold <= 1
    assert coverage == accepted.mean() and accuracy == correct[accepted].mean()


def test_cells_that_cannot_fit_a_curve_keep_the_plain_rule() -> None:
    confidence = np.linspace(0.5, 0.99, 30)
    for correct in (np.ones(30, bool), np.zeros(30, bool), confidence < 0.7):  # the last: confidence ranks backwards
        assert smoothed_threshold_for(confidence, correct, 0.9)[3] == "empirical"
        assert smoothed_threshold_for(confidence, correct, 0.9)[0] == confidence_threshold_for(confidence, correct, 0.9)[0]
