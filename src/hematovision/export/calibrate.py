"""Calibrating the review policy: thresholds and the OOD model fitted on the run's own split.

The policy itself (what it flags, how it is stored) is :class:`hematovision.infer.policy.ReviewPolicy`;
fitting it needs the training data, so it lives with the export.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hematovision.data.folder import Sample
from hematovision.data.transforms import Preprocessing
from hematovision.errors import DatasetError
from hematovision.evaluate.metrics import softmax
from hematovision.infer.policy import DEFAULT_CONFIDENCE_THRESHOLD, ReviewPolicy, mahalanobis_scores
from hematovision.run import SPLIT_FILE, read_split

log = logging.getLogger(__name__)

def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the shrunk shared precision matrix.

    Args:
        features: (N, D) training features.
        labels: (N,) integer class labels.

    Returns:
        ``(means, precision)``: (K', D) means of the K' classes present and the (D, D) precision.
    """
    from sklearn.covariance import LedoitWolf

    features = features.astype(np.float64)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    precision = np.linalg.pinv(covariance, hermitian=True)
    return means.astype(np.float32), precision.astype(np.float32)


def energy_scores(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy ``-T logsumexp(logits / T)`` (Liu et al., NeurIPS 2020); larger is stranger."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    peak = scaled.max(axis=1)
    return -temperature * (peak + np.log(np.exp(scaled - peak[:, None]).sum(axis=1)))


def confidence_threshold_for(
    confidences: np.ndarray, correct: np.ndarray, target_accuracy: float, floor: float = DEFAULT_CONFIDENCE_THRESHOLD
) -> tuple[float, float, float]:
    """The lowest threshold whose accepted predictions reach ``target_accuracy``.

    Args:
        confidences: (N,) top-class probabilities on validation data.
        correct: (N,) whether each prediction was right.
        target_accuracy: accuracy wanted among predictions at or above the threshold.
        floor: the threshold is never below this.

    Returns:
        ``(threshold, coverage, accuracy)``: the threshold, the fraction of validation
        predictions it accepts and their accuracy.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(-confidences, kind="stable")
    sorted_conf, sorted_correct = confidences[order], correct[order]
    running = np.cumsum(sorted_correct) / np.arange(1, len(order) + 1)
    threshold = 1.0 + 1e-9  # accept nothing unless some prefix is accurate enough
    # Walk from the most confident down; the last prefix meeting the target gives the threshold,
    # cut only where the confidence changes so equal confidences are treated alike.
    for i in range(len(order)):
        boundary = i == len(order) - 1 or sorted_conf[i + 1] < sorted_conf[i]
        if boundary and running[i] >= target_accuracy:
            threshold = float(sorted_conf[i])
    threshold = max(threshold, floor)
    accepted = confidences >= threshold
    coverage = float(accepted.mean()) if len(confidences) else 0.0
    accuracy = float(correct[accepted].mean()) if accepted.any() else float("nan")
    return float(min(threshold, 1.0)), coverage, accuracy


def roc_auc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling ``out`` (positives, higher scores) from ``in`` samples."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def non_cell_photos(crops_per_image: int = 4, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Photos that are not blood cells: scikit-image's sample images, whole and as random crops.

    Returns:
        RGB uint8 images (H, W, 3); images whose data file is missing are left out.
    """
    from skimage import data as skdata

    # The images scikit-image ships in its wheel (others need a download, impossible offline).
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text", "horse",
             "clock", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina",
             "colorwheel", "logo", "microaneurysms", "cell"]
    rng = np.random.default_rng(seed)
    photos: list[np.ndarray] = []
    for name in names:
        try:
            image = np.asarray(getattr(skdata, name)())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001
            # A sample missing offline is skipped (under pytest, scikit-image raises a "skip" for it).
            log.debug("scikit-image sample %r unavailable: %s", name, error)
            continue
        image = _as_rgb_uint8(image)
        if image is None or min(image.shape[:2]) < 32:
            continue
        photos.append(image)
        height, width = image.shape[:2]
        side = min(size, height, width)
        for _ in range(crops_per_image):
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            photos.append(np.ascontiguousarray(image[top:top + side, left:left + side]))
    return photos


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray | None:
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[-1] != 3:
        return None  # volumes and multi-channel stacks are not photos
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        low, high = image.min(), image.max()
        image = ((image - low) / (high - low + 1e-12) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def batched_forward(
    forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], images: np.ndarray, batch_size: int = 32,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``forward`` over (N, S, S, 3) uint8 images in batches; returns logits (N, K) and features (N, D)."""
    from tqdm.auto import tqdm

    logits, features = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch_logits, batch_features = forward(images[start:start + batch_size])
        logits.append(batch_logits)
        features.append(batch_features)
    if not logits:
        raise DatasetError("no images to compute features of")
    return np.concatenate(logits), np.concatenate(features)


def read_run_split(run_dir: str | Path, split_file: str = SPLIT_FILE) -> dict[str, list[Sample]]:
    """The run's split (see :func:`hematovision.run.read_split`), checked to be still on disk.

    Raises:
        DatasetError: no split file, or its images are no longer where they were.
    """
    parts = read_split(run_dir, split_file)
    missing = [s.path for samples in parts.values() for s in samples[:50] if not s.path.exists()]
    if missing:
        raise DatasetError(f"images of the run's split are missing, e.g. {missing[0]}; "
                           "calibration needs the training data where it was")
    return parts


def calibrate(
    forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    prep: Preprocessing,
    splits: dict[str, list[Sample]],
    temperature: float = 1.0,
    target_accuracy: float = 0.99,
    ood_quantile: float = 0.95,
    max_train: int = 3000,
    seed: int = 0,
) -> ReviewPolicy:
    """Fit the OOD model on training features and choose both thresholds on validation data.

    The returned policy's ``info["evaluation"]`` reports, on the held-out ``test`` split
    and on non-cell photos (:func:`non_cell_photos`), how often each rule fires, plus the
    AUROC of the Mahalanobis score, the energy score and the max-softmax baseline.

    Args:
        forward: (N, S, S, 3) uint8 → (logits (N, K), features (N, D)).
        class_names: the model's classes, in output order.
        prep: the model's preprocessing (how a file's pixels become its input).
        splits: samples per split; needs ``train`` and ``val``, uses ``test`` when present.
        temperature: the run's calibrated softmax temperature.
        target_accuracy: accuracy wanted among predictions not flagged for low confidence.
        ood_quantile: fraction of validation cells the OOD threshold lets through.
        max_train: most training images used for the OOD model (a seeded random subset).
        seed: seed of that subset and of the photo crops.
    """
    from hematovision.data.folder import label_indices, load_images

    for needed in ("train", "val"):
        if not splits.get(needed):
            raise DatasetError(f"calibration needs a '{needed}' split; the run has {sorted(splits)}")
    rng = np.random.default_rng(seed)
    train = list(splits["train"])
    if len(train) > max_train:
        train = [train[i] for i in sorted(rng.choice(len(train), max_train, replace=False))]

    loaded = load_images(train, prep, desc="train images")
    _, train_features = batched_forward(forward, loaded.images, desc="train features")
    means, precision = fit_mahalanobis(train_features, label_indices(loaded.samples, class_names))

    val = load_images(splits["val"], prep, desc="val images")
    val_logits, val_features = batched_forward(forward, val.images, desc="val features")
    val_probs = softmax(val_logits, temperature)
    val_true = label_indices(val.samples, class_names)
    threshold, coverage, accepted_accuracy = confidence_threshold_for(
        val_probs.max(axis=1), val_probs.argmax(axis=1) == val_true, target_accuracy
    )
    val_ood = mahalanobis_scores(val_features, means, precision)
    ood_threshold = float(np.quantile(val_ood, ood_quantile))
    info: dict[str, Any] = {
        "target_accuracy": target_accuracy,
        "ood_quantile": ood_quantile,
        "fitted_on": {"ood_model": f"train split, {len(loaded.samples)} images",
                      "thresholds": f"val split, {len(val.samples)} images"},
        "validation": {"coverage": coverage, "accepted_accuracy": accepted_accuracy,
                       "accuracy": float((val_probs.argmax(axis=1) == val_true).mean())},
    }
    policy = ReviewPolicy(threshold, ood_threshold, means, precision, calibrated=True, info=info)
    if splits.get("test"):
        info["evaluation"] = evaluate_policy(policy, forward, class_names, prep, splits["test"],
                                             temperature, seed)
    return policy


def evaluate_policy(
    policy: ReviewPolicy,
    forward: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    prep: Preprocessing,
    test: list[Sample],
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """How the review rules do on held-out cells and on photos that are not blood cells."""
    from hematovision.data.folder import label_indices, load_images
    loaded = load_images(test, prep, desc="test images")
    logits, features = batched_forward(forward, loaded.images, desc="test features")
    probs = softmax(logits, temperature)
    true = label_indices(loaded.samples, class_names)
    correct = probs.argmax(axis=1) == true
    low = probs.max(axis=1) < policy.confidence_threshold
    ood = policy.ood_scores(features)
    assert ood is not None and policy.ood_threshold is not None
    flagged = low | (ood > policy.ood_threshold)

    photos = non_cell_photos(seed=seed)
    photo_batch = np.stack([prep.prepare(p) for p in photos])
    photo_logits, photo_features = batched_forward(forward, photo_batch, desc="photo features")
    photo_probs = softmax(photo_logits, temperature)
    photo_ood = policy.ood_scores(photo_features)
    assert photo_ood is not None
    photo_flagged = (photo_probs.max(axis=1) < policy.confidence_threshold) | (photo_ood > policy.ood_threshold)

    def rate(mask: np.ndarray) -> float:
        return float(mask.mean()) if len(mask) else float("nan")

    return {
        "split": f"test ({len(loaded.samples)} images)",
        "accuracy": rate(correct),
        "flagged": rate(flagged),
        "flagged_low_confidence": rate(low),
        "flagged_ood": rate(ood > policy.ood_threshold),
        "accuracy_unflagged": rate(correct[~flagged]),
        "accuracy_flagged": rate(correct[flagged]),
        "errors_caught": rate(flagged[~correct]),
        "non_cell_photos": {
            "count": len(photos),
            "source": "scikit-image sample images, whole and 4 random crops each",
            "flagged": rate(photo_flagged),
            "flagged_ood": rate(photo_ood > policy.ood_threshold),
            "auroc_mahalanobis": roc_auc(ood, photo_ood),
            "auroc_energy": roc_auc(energy_scores(logits, temperature), energy_scores(photo_logits, temperature)),
            "auroc_max_softmax": roc_auc(-probs.max(axis=1), -photo_probs.max(axis=1)),
        },
    }
