"""Quality measures for synthetic images, as plain functions of feature arrays.

Everything here takes features (N, D) computed by one frozen backbone and labels, so the
functions are cheap, testable on tiny arrays with known answers, and independent of how
the images were made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2))`` with sample covariances.

    With a few hundred images in a ~1,600-d space both covariances are rank-deficient, so
    ``sqrtm(C_a @ C_b)`` is numerically fragile. The trace term is computed exactly instead:
    with centred data matrices ``X_a`` (N, D) and ``X_b`` (M, D), the eigenvalues of
    ``C_a C_b`` are the squared singular values of ``X_a X_b^T / sqrt((N-1)(M-1))``, so
    ``tr((C_a C_b)^(1/2))`` is that small (N, M) matrix's nuclear norm (sum of singular values).
    (With more samples than dimensions a (D, D) QR factor replaces ``X``, same answer.)
    This equals ``scipy.linalg.sqrtm``'s answer where that one is accurate (see the tests).

    The value is biased upwards for small sets: compare only distances computed with the
    same set sizes (e.g. against a real-vs-real floor).

    Args:
        features_a: (N, D), N >= 2.
        features_b: (M, D), M >= 2.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each set needs at least 2 samples for a covariance")
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    trace_a = float(np.sum(centred_a**2) / (len(a) - 1))
    trace_b = float(np.sum(centred_b**2) / (len(b) - 1))
    cross = _covariance_factor(centred_a) @ _covariance_factor(centred_b).T
    trace_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    return max(0.0, mean_term + trace_a + trace_b - 2.0 * trace_sqrt)


def _covariance_factor(centred: np.ndarray) -> np.ndarray:
    """A (k, D) matrix F with F^T F = the sample covariance, k = min(N, D)."""
    scale = np.sqrt(len(centred) - 1)
    if len(centred) <= centred.shape[1]:
        return centred / scale
    # More samples than dimensions: the (D, D) R of a QR factorisation has R^T R = X^T X.
    return np.linalg.qr(centred, mode="r") / scale


def frechet_distance_sqrtm(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The same distance through ``scipy.linalg.sqrtm`` on the full covariances (reference, slow for large D)."""
    from scipy import linalg

    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


def matched_frechet(
    reference: np.ndarray,
    candidates: np.ndarray,
    size: int,
    repeats: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Fréchet distances from ``reference`` to random subsets of ``candidates`` of ``size`` rows.

    Drawing the same number of rows from every candidate set (real, synthetic, another
    class) removes the small-sample bias from the comparison.

    Args:
        reference: (M, D) features, used whole.
        candidates: (N, D) features, N >= ``size``.
        size: rows drawn (without replacement) per repeat.
        repeats: number of random draws.

    Returns:
        (repeats,) distances.
    """
    if len(candidates) < size:
        raise ValueError(f"need at least {size} candidate rows, got {len(candidates)}")
    rng = np.random.default_rng(seed)
    return np.array([
        frechet_distance(reference, candidates[rng.choice(len(candidates), size, replace=False)])
        for _ in range(repeats)
    ])


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's nearest reference row by cosine distance (1 - cosine similarity).

    Cosine distance ignores the overall feature magnitude (image contrast, mostly) and is
    in [0, 2]; 0 means the same direction, i.e. the backbone sees the same picture.

    Args:
        query: (N, D).
        reference: (M, D).

    Returns:
        indices (N,) into ``reference`` and distances (N,).
    """
    query = np.asarray(query, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    ref = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    indices, distances = [], []
    for start in range(0, len(query), batch):
        part = query[start : start + batch]
        part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        similarity = part @ ref.T
        best = similarity.argmax(axis=1)
        indices.append(best)
        distances.append(1.0 - similarity[np.arange(len(part)), best])
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(indices), np.clip(np.concatenate(distances), 0.0, 2.0)


def leave_one_out_nearest(features: np.ndarray) -> np.ndarray:
    """Cosine distance from each row to its nearest *other* row of the same set: (N,)."""
    normed = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = normed @ normed.T
    np.fill_diagonal(similarity, -np.inf)
    return np.clip(1.0 - similarity.max(axis=1), 0.0, 2.0)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean cosine distance between all pairs of distinct rows: 0 when every row is the same picture.

    A collapsed generator gives near-identical cells for different latent vectors, so this is
    far below the same measure on real cells of the class.
    """
    n = len(features)
    if n < 2:
        raise ValueError("the pairwise distance needs at least two rows")
    normed = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = normed @ normed.T
    off_diagonal = similarity.sum() - np.trace(similarity)
    return float(np.clip(1.0 - off_diagonal / (n * (n - 1)), 0.0, 2.0))


def fit_linear_probe(features: np.ndarray, labels: np.ndarray, class_weight: str | None = None, c: float = 1.0,
                     seed: int = 0):
    """A standardised logistic-regression head on frozen features (scikit-learn pipeline).

    Args:
        features: (N, D).
        labels: (N,) integer classes.
        class_weight: ``None`` or ``"balanced"`` (weights inversely proportional to class frequency).
        c: inverse L2 strength.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=c, max_iter=3000, class_weight=class_weight, random_state=seed),
    )
    return probe.fit(features, labels)


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class absent from ``y_true``): (K,)."""
    recall = np.full(num_classes, np.nan)
    for k in range(num_classes):
        mask = y_true == k
        if mask.any():
            recall[k] = float(np.mean(y_pred[mask] == k))
    return recall


def paired_bootstrap_recall_delta(
    y_true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    class_index: int,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Recall(b) - recall(a) on one class, with a 95% paired-bootstrap interval over test images.

    Both predictions are on the same test images, so resampling those images together
    gives the uncertainty of the *difference*, which is narrower than either recall's.

    Returns:
        (delta, low, high).
    """
    members = np.flatnonzero(y_true == class_index)
    if len(members) == 0:
        raise ValueError(f"class {class_index} has no test images")
    hit_a = (pred_a[members] == class_index).astype(float)
    hit_b = (pred_b[members] == class_index).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    deltas = hit_b[draws].mean(1) - hit_a[draws].mean(1)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(hit_b.mean() - hit_a.mean()), float(low), float(high)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


def summarise_recall(recall: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``{class: recall}`` for JSON output."""
    return {name: float(value) for name, value in zip(class_names, recall)}
