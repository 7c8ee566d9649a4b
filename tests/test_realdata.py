"""Checks on the real PBC images (skipped where ../shared/data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hematovision.data.folder import label_indices, load_images, scan_image_folder


def test_pretrained_backbone_beats_random_initialisation(shared_data: Path) -> None:
    """Frozen ImageNet features separate PBC cells far better than the same network at random init."""
    from sklearn.linear_model import LogisticRegression

    from hematovision.data.transforms import Preprocessing, normalize
    from hematovision.models import create_model
    from hematovision.models.frozen import PooledFeatures

    root = shared_data / "pbc_dev"
    if not root.is_dir():
        pytest.skip("../shared/data/pbc_dev not present")
    folder = scan_image_folder(root)
    rng = np.random.default_rng(0)
    chosen = []
    for name in folder.class_names:
        files = [s for s in folder.samples if s.label == name]
        chosen += [files[i] for i in rng.choice(len(files), 24, replace=False)]
    loaded = load_images(chosen, 96)
    labels = label_indices(loaded.samples, folder.class_names)
    is_train = np.tile(np.arange(24) < 16, len(folder.class_names))
    prep = Preprocessing(96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    accuracy = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        features = PooledFeatures(create_model("efficientnet_lite0", 1000, pretrained=pretrained)).eval()
        with torch.no_grad():
            x = features(normalize(loaded.images, prep)).numpy()
        x = (x - x[is_train].mean(0)) / (x[is_train].std(0) + 1e-6)
        head = LogisticRegression(C=0.1, max_iter=2000).fit(x[is_train], labels[is_train])
        accuracy[pretrained] = head.score(x[~is_train], labels[~is_train])
    assert accuracy[True] >= 0.6, accuracy
    assert accuracy[True] - accuracy[False] >= 0.2, accuracy
