"""When should a person check a prediction? The review policy applied at inference.

Two signals flag an image for review:

* **Low confidence**: the calibrated top-class probability is below a threshold chosen
  on the validation split so that the predictions kept unflagged reach a target accuracy.
* **Out of distribution**: the image's features are far from every class seen in
  training. The score is the Mahalanobis distance (Lee et al., NeurIPS 2018) from the
  nearest class mean, with one shared covariance (Ledoit-Wolf shrinkage, since there are
  fewer images than feature dimensions), fitted on training features; the threshold is a
  high quantile of the validation scores, so about ``1 - quantile`` of real cells are
  flagged by it.

The policy is kept in the run folder: ``serving.json`` (thresholds and the evaluation)
and ``ood.npz`` (class means and precision matrix). ``hematovision export`` fits it
(:mod:`hematovision.export.calibrate`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hematovision._io import write_bytes, write_json
from hematovision.run import OOD_FILE, POLICY_FILE

DEFAULT_CONFIDENCE_THRESHOLD = 0.5  # used only for runs never calibrated; "less likely than not"


@dataclass
class ReviewPolicy:
    """Rules that flag a prediction for review.

    Attributes:
        confidence_threshold: flag when the top probability is below this.
        ood_threshold: flag when the OOD score is above this (``None``: no OOD check).
        class_means: (K, D) feature mean per class, for the OOD score.
        precision: (D, D) inverse of the shared feature covariance.
        calibrated: whether the thresholds come from validation data.
        info: how the thresholds were chosen and how they did on held-out data.
    """

    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    ood_threshold: float | None = None
    class_means: np.ndarray | None = None
    precision: np.ndarray | None = None
    calibrated: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    _white: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def has_ood(self) -> bool:
        """Whether an OOD score can be computed."""
        return self.class_means is not None and self.precision is not None

    def ood_scores(self, features: np.ndarray) -> np.ndarray | None:
        """Squared Mahalanobis distance to the nearest class mean, divided by D; (N, D) → (N,)."""
        if self.class_means is None or self.precision is None:
            return None
        if self._white is None:
            # Factorised once: per batch only a (N, D) x (D, D) product remains.
            white = whitener(self.precision)
            self._white = (white, self.class_means.astype(np.float32) @ white)
        return whitened_scores(features, *self._white)

    def reasons(self, confidence: float, ood_score: float | None) -> list[str]:
        """Why one prediction needs review (empty when it does not)."""
        reasons = []
        if confidence < self.confidence_threshold:
            reasons.append(f"low confidence ({confidence:.2f} < {self.confidence_threshold:.2f})")
        if ood_score is not None and self.ood_threshold is not None and ood_score > self.ood_threshold:
            reasons.append(
                f"unlike the training images (OOD score {ood_score:.2f} > {self.ood_threshold:.2f})"
            )
        return reasons

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (no matrices), for the model endpoint."""
        return {
            "confidence_threshold": self.confidence_threshold,
            "ood_threshold": self.ood_threshold,
            "ood_method": "mahalanobis" if self.has_ood else None,
            "calibrated": self.calibrated,
            **{key: value for key, value in self.info.items() if key != "evaluation"},
            "evaluation": self.info.get("evaluation"),
        }

    def save(self, run_dir: str | Path) -> None:
        """Write ``serving.json`` and (with an OOD model) ``ood.npz`` into ``run_dir``, atomically."""
        run_dir = Path(run_dir)
        if self.class_means is not None and self.precision is not None:  # self.has_ood, spelled out for the type checker
            buffer = io.BytesIO()
            np.savez(buffer, class_means=self.class_means.astype(np.float32), precision=self.precision.astype(np.float32))
            write_bytes(run_dir / OOD_FILE, buffer.getvalue())
        write_json(run_dir / POLICY_FILE, {
            "confidence_threshold": self.confidence_threshold,
            "ood_threshold": self.ood_threshold,
            "ood_file": OOD_FILE if self.has_ood else None,
            "calibrated": self.calibrated,
            **self.info,
        })

    @classmethod
    def load(cls, run_dir: str | Path) -> ReviewPolicy | None:
        """The policy saved in ``run_dir``, or ``None`` when it was never calibrated."""
        run_dir = Path(run_dir)
        path = run_dir / POLICY_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        means = precision = None
        if data.get("ood_file") and (run_dir / data["ood_file"]).is_file():
            with np.load(run_dir / data["ood_file"]) as arrays:
                means, precision = arrays["class_means"], arrays["precision"]
        info = {k: v for k, v in data.items() if k not in ("confidence_threshold", "ood_threshold", "ood_file",
                                                           "calibrated")}
        return cls(float(data["confidence_threshold"]),
                   None if data.get("ood_threshold") is None or means is None else float(data["ood_threshold"]),
                   means, precision, bool(data.get("calibrated", True)), info)


def current_policy(run_dir: str | Path, weights_sha256: str | None, views: int) -> ReviewPolicy | None:
    """The run's saved policy, only when it was fitted for these weights and test-time views.

    A policy calibrated before the weights changed (retraining into the same folder, a copied
    model file) would flag by the wrong thresholds, so it is ignored like a missing one.
    """
    try:
        policy = ReviewPolicy.load(run_dir)
    except (ValueError, KeyError, TypeError, OSError):
        return None  # a damaged serving.json: the run has no usable policy
    if policy is None:
        return None
    recorded = policy.info.get("source_sha256")
    if (recorded and weights_sha256 and recorded != weights_sha256) or int(policy.info.get("views", 1) or 1) != views:
        return None
    return policy


def whitener(precision: np.ndarray) -> np.ndarray:
    """A (D, D) matrix W with ``W @ W.T == precision``, so Mahalanobis distances become Euclidean ones."""
    values, vectors = np.linalg.eigh(precision.astype(np.float64))
    white: np.ndarray = (vectors * np.sqrt(np.clip(values, 0.0, None))).astype(np.float32)  # np.clip(.., None) is typed Any
    return white


def whitened_scores(features: np.ndarray, white: np.ndarray, white_means: np.ndarray) -> np.ndarray:
    """Squared distance to the nearest whitened mean, divided by D.

    Args:
        features: (N, D).
        white: (D, D) from :func:`whitener`.
        white_means: (K, D) class means multiplied by ``white``.

    Returns:
        (N,) float64 scores.
    """
    projected = np.asarray(features, dtype=np.float32) @ white
    # Differences are taken directly (not expanded into f'Pf - 2f'Pm + m'Pm), which would lose
    # the small distances to cancellation in float32.
    distances = ((projected[:, None, :] - white_means[None, :, :]) ** 2).sum(axis=2, dtype=np.float64)
    scores: np.ndarray = distances.min(axis=1) / projected.shape[1]  # numpy types reductions as Any (they may be scalars)
    return scores


def mahalanobis_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest mean, divided by the dimension D.

    Args:
        features: (N, D).
        means: (K, D).
        precision: (D, D).

    Returns:
        (N,) float64 scores; about 1 for typical in-distribution features.
    """
    white = whitener(precision)
    return whitened_scores(features, white, means.astype(np.float32) @ white)
