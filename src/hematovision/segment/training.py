"""A U-Net from a mask dataset, end to end: the seeded split, training, the held-out test.

``hematovision segment train`` runs :func:`split_mask_dataset`, then :func:`train_and_test_unet`.
The training loop itself and the run folder are in :mod:`hematovision.segment.unet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hematovision._io import write_json
from hematovision.segment.masks import (
    BCCD_LEVELS,
    SegSample,
    find_seg_samples,
    read_near_duplicates,
    split_seg_samples,
)

if TYPE_CHECKING:
    from hematovision.segment.unet import UNetConfig

TEST_METRICS_FILE = "test_metrics.json"


def split_mask_dataset(
    root: str | Path, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0, crop_to_cell: bool = False,
) -> tuple[dict[str, list[SegSample]], bool]:
    """Find the image/mask pairs of a dataset folder and split them for training.

    Args:
        root: ``images/`` + ``masks/`` folder (Zheng layout) or a BCCD folder.
        test_fraction: share held out for the final scores.
        val_fraction: share used to pick the best epoch.
        seed: shuffling seed.
        crop_to_cell: crop around the labelled cell; always on for BCCD, whose masks label one
            cell in a whole frame.

    Returns:
        ``{"test": [...], "val": [...], "train": [...]}`` and whether to crop around the cell.
    """
    samples = find_seg_samples(root)
    crop = crop_to_cell or samples[0].levels == BCCD_LEVELS
    # BCCD has near-duplicate frames (the same cells, shifted); they stay on one side of the split.
    split = split_seg_samples(samples, test_fraction, val_fraction, seed, read_near_duplicates(root))
    return split, crop


def train_and_test_unet(
    split: dict[str, list[SegSample]], data_root: str | Path, out_dir: str | Path, config: UNetConfig,
) -> tuple[dict, dict[str, dict[str, float]] | None]:
    """Train a U-Net on a split, then score the saved best model on the split's test images.

    Args:
        split: from :func:`split_mask_dataset`.
        data_root: the dataset folder (recorded in the run's config).
        out_dir: the U-Net run folder to write; the test scores go to ``test_metrics.json`` in it.
        config: model and optimisation settings.

    Returns:
        The training history, and the test summary by score (``None`` without test images).
    """
    from hematovision.segment.metrics import evaluate_segmenter
    from hematovision.segment.unet import load_unet, predict_labels, train_unet

    out_dir = Path(out_dir)
    split_info: dict = {name: [s.name for s in items] for name, items in split.items()}
    split_info["data"] = str(data_root)
    history = train_unet(split["train"], split["val"], out_dir, config, split_info)
    model, config = load_unet(out_dir)
    if not split["test"]:
        return history, None
    # With crops, the crop comes from the ground truth as in training: segmentation given a detection.
    rows, summary = evaluate_segmenter(
        split["test"], lambda image: predict_labels(model, image, config), crop_to_cell=config.crop_to_cell,
        binary=config.mode == "binary",
    )
    write_json(out_dir / TEST_METRICS_FILE,
               {"split": "test", "images": len(rows), "summary": summary, "per_image": rows})
    return history, summary
