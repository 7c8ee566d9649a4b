"""The frozen mode's head: the same seed gives the same head, whatever the global random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hematovision.train.frozen import fit_frozen_classifier


@pytest.mark.parametrize("head", ["mlp", "logreg"])
def test_the_same_seed_fits_the_same_head(head: str, one_thread: None) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 24))
    labels = rng.integers(0, 3, 240)
    features = (centres[labels] + rng.normal(scale=2.0, size=(240, 24))).astype(np.float32)
    heads = []
    for global_seed in (1, 2):  # what ran before the fit (feature extraction, other models) differs
        torch.manual_seed(global_seed)
        classifier, _ = fit_frozen_classifier(nn.Identity(), features[:180], labels[:180], features[180:],
                                              labels[180:], 3, head=head, seed=0)
        heads.append(classifier.head.state_dict())
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=0, atol=0, msg=key)


def test_a_two_class_logistic_head_tells_the_classes_apart(one_thread: None) -> None:
    """scikit-learn gives one row for two classes; copied into both rows it made a constant head."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    features = rng.normal(size=(120, 8)).astype(np.float32)
    features[:, 0] += 3.0 * labels
    classifier, _ = fit_frozen_classifier(nn.Identity(), features[::2], labels[::2], features[1::2], labels[1::2], 2)
    with torch.no_grad():
        predicted = classifier(torch.as_tensor(features[1::2])).argmax(1).numpy()
    assert (predicted == labels[1::2]).mean() >= 0.9
