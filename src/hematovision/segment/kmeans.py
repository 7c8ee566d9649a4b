"""Plain k-means (Lloyd's algorithm) with the three initialisations EK-means is compared with.

``init`` is ``"random"`` (k distinct points drawn at random), ``"kmeans++"`` (Arthur and
Vassilvitskii's D² sampling) or explicit (K, D) centres, which is how EK-means passes the
fuzzy c-means centres in. The same Lloyd loop serves all three, so a comparison between
them measures the initialisation alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.errors import HematoVisionError
from hematovision.segment.fcm import _squared_distances


@dataclass(frozen=True)
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centers: (K, D) final centres.
        labels: (N,) index of the nearest centre for every point.
        inertia: sum of squared distances of points to their centre.
        iterations: Lloyd rounds run.
    """

    centers: np.ndarray
    labels: np.ndarray
    inertia: float
    iterations: int


def kmeans_plusplus_init(points: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre is drawn with probability ∝ squared distance to the nearest one.

    Args:
        points: (N, D) float array.
        n_clusters: K.
        rng: random generator.

    Returns:
        (K, D) initial centres.
    """
    centers = [points[rng.integers(len(points))]]
    closest = _squared_distances(points, centers[0][None])[:, 0]
    for _ in range(1, n_clusters):
        total = closest.sum()
        # All points coincide with the chosen centres: any point is as good as another.
        index = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=closest / total)
        centers.append(points[index])
        closest = np.minimum(closest, _squared_distances(points, points[index][None])[:, 0])
    return np.stack(centers)


def kmeans(
    points: np.ndarray,
    n_clusters: int,
    init: str | np.ndarray = "kmeans++",
    seed: int | None = 0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> KMeansResult:
    """Cluster points with Lloyd's k-means.

    Args:
        points: (N, D) array.
        n_clusters: K.
        init: ``"random"``, ``"kmeans++"`` or a (K, D) array of starting centres.
        seed: seeds the random initialisations.
        max_iter: upper bound on Lloyd rounds.
        tol: stop when no centre moves by more than this (squared distance).

    Returns:
        Centres, labels, inertia and the number of rounds.

    Raises:
        HematoVisionError: fewer points than clusters, an unknown init, or centres of the wrong shape.
    """
    points = np.asarray(points, dtype=np.float64)
    if len(points) < n_clusters:
        raise HematoVisionError(f"need at least {n_clusters} points for {n_clusters} clusters, got {len(points)}")
    rng = np.random.default_rng(seed)
    if isinstance(init, str):
        if init == "random":
            centers = points[rng.choice(len(points), size=n_clusters, replace=False)].copy()
        elif init in ("kmeans++", "k-means++"):
            centers = kmeans_plusplus_init(points, n_clusters, rng)
        else:
            raise HematoVisionError(f"unknown k-means init {init!r}; use 'random', 'kmeans++' or an array")
    else:
        centers = np.array(init, dtype=np.float64)
        if centers.shape != (n_clusters, points.shape[1]):
            raise HematoVisionError(f"init centres must have shape {(n_clusters, points.shape[1])}, got {centers.shape}")
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is returned after the loop)
        labels = _squared_distances(points, centers).argmin(axis=1)
        counts = np.bincount(labels, minlength=n_clusters)
        sums = np.zeros_like(centers)
        _add_rows(sums, labels, points)
        # An emptied cluster keeps its old centre rather than becoming NaN.
        new_centers = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        shift = float(((new_centers - centers) ** 2).sum(axis=1).max())
        centers = new_centers
        if shift <= tol:
            break
    dist2 = _squared_distances(points, centers)
    labels = dist2.argmin(axis=1)
    inertia = float(dist2[np.arange(len(points)), labels].sum())
    return KMeansResult(centers=centers, labels=labels, inertia=inertia, iterations=iteration)


def _add_rows(sums: np.ndarray, labels: np.ndarray, points: np.ndarray) -> None:
    # Per-dimension bincount: much faster than np.add.at for the few (colour) dimensions clustered here.
    for dim in range(points.shape[1]):
        sums[:, dim] = np.bincount(labels, weights=points[:, dim], minlength=len(sums))
