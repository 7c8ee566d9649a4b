"""Which frozen-feature recipe: pooled features and heads compared on pbc_dev's held-out split.

Uses the same seeded, stratified, duplicate-grouped 70/15/15 split as ``hematovision train``
(seed 0) and the same :class:`FeatureExtractor`. Features are saved to ``--cache`` so that heads
and combinations can be compared without extracting again. Each extraction of 5,129 images takes
3–20 min on two cores, depending on backbone and load.

Usage: python benchmarks/frozen_recipes.py [--data ../shared/data/pbc_dev] [--cache runs/frozen_recipes]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/pbc_dev"))
    parser.add_argument("--cache", type=Path, default=Path("runs/frozen_recipes"))
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from hematovision.data.folder import label_indices, load_images, scan_image_folder
    from hematovision.data.splits import content_groups, train_val_test_split
    from hematovision.train.features import FeatureExtractor

    folder = scan_image_folder(args.data)
    samples = folder.samples
    split = np.array(train_val_test_split([s.label for s in samples], content_groups(samples), seed=0))
    labels = label_indices(samples, folder.class_names)
    args.cache.mkdir(parents=True, exist_ok=True)

    # (name, backbone, size, taps, tap_std)
    recipes = [("lite0_224", "efficientnet_lite0", 224), ("lite2_260", "efficientnet_lite2", 260)]
    features = {}
    for name, backbone, size in recipes:
        path = args.cache / f"{name}.npy"
        if not path.exists():
            extractor = FeatureExtractor(backbone, size)
            np.save(path, extractor.extract(load_images(samples, size).images, progress=True))
        features[name] = np.load(path)
    # Slices of the lite0 vector: [stage2..5 mean+std (848) | final 1280].
    candidates = {
        "lite0 final features only": features["lite0_224"][:, -1280:],
        "lite0 stages 2-5 mean+std + final": features["lite0_224"],
        "lite2 stages 2-5 mean+std + final": features["lite2_260"],
        "lite0 + lite2 (concatenated)": np.concatenate([features["lite0_224"], features["lite2_260"]], axis=1),
    }
    train, val, test = split == "train", split == "val", split == "test"
    print("| features | dim | C | val accuracy | test accuracy |\n|---|---:|---:|---:|---:|")
    for name, x in candidates.items():
        best = None
        for c in (0.02, 0.05, 0.2):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
            model.fit(x[train], labels[train])
            val_accuracy = model.score(x[val], labels[val])
            if best is None or val_accuracy > best[0]:
                best = (val_accuracy, c, model.score(x[test], labels[test]))
        print(f"| {name} | {x.shape[1]} | {best[1]} | {best[0]:.4f} | {best[2]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
