from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from hematovision.evaluate.metrics import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    softmax,
)

Y_TRUE = np.array([0, 0, 1, 1, 2, 2, 2, 1])
Y_PROB = np.array([
    [0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
    [0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6],
])


def test_metrics_equal_scikit_learn() -> None:
    result = classification_metrics(Y_TRUE, Y_PROB, ["a", "b", "c"])
    y_pred = Y_PROB.argmax(1)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, y_pred))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, y_pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, y_pred, average="macro"))
    assert result["log_loss"] == pytest.approx(skm.log_loss(Y_TRUE, Y_PROB))
    assert result["roc_auc_ovr"] == pytest.approx(skm.roc_auc_score(Y_TRUE, Y_PROB, multi_class="ovr"))
    assert result["confusion_matrix"] == skm.confusion_matrix(Y_TRUE, y_pred).tolist()
    assert result["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    assert result["n_images"] == 8


def test_expected_calibration_error_by_hand() -> None:
    # Two bins used: confidence 0.9 (2 right of 2) and 0.6 (1 right of 2).
    y_prob = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y_true = np.array([0, 0, 1, 1])
    expected = 0.5 * abs(1.0 - 0.9) + 0.5 * abs(0.5 - 0.6)
    assert expected_calibration_error(y_true, y_prob, n_bins=10) == pytest.approx(expected)


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    fitted = fit_temperature(true_logits * 3.0, labels)  # logits three times too sharp
    assert fitted == pytest.approx(3.0, rel=0.1)


def test_absent_class_gives_no_auc() -> None:
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]])
    result = classification_metrics(np.array([0, 0, 1]), probabilities, ["a", "b", "c"])
    assert result["roc_auc_ovr"] is None
    assert result["per_class"]["c"]["support"] == 0
