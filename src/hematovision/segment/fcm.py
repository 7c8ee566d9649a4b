"""Fuzzy c-means (Bezdek), vectorised over all points at once.

Each point gets a membership in every cluster instead of a hard label. The iteration
alternates two closed-form updates (fuzzifier ``m``)::

    u_ij = 1 / sum_k (d_ij / d_ik) ** (2 / (m - 1))        memberships
    c_j  = sum_i u_ij**m x_i / sum_i u_ij**m              centres

and stops when no membership moves by more than ``eps`` (the criterion of the EK-means
paper). FCM is slow compared with k-means but much less sensitive to where it starts,
which is why EK-means uses it only to choose k-means' initial centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.errors import HematoVisionError


@dataclass(frozen=True)
class FCMResult:
    """Output of :func:`fuzzy_cmeans`.

    Attributes:
        centers: (C, D) cluster centres.
        memberships: (N, C) memberships; each row sums to 1.
        iterations: number of update rounds run.
        converged: whether the membership change fell below ``eps``.
    """

    centers: np.ndarray
    memberships: np.ndarray
    iterations: int
    converged: bool


def fcm_memberships(points: np.ndarray, centers: np.ndarray, m: float = 2.0) -> np.ndarray:
    """Memberships of points in clusters with the given centres.

    Args:
        points: (N, D) float array.
        centers: (C, D) float array.
        m: fuzzifier, > 1 (2 is the usual choice).

    Returns:
        (N, C) memberships; a point lying exactly on a centre gets membership 1 there.
    """
    dist2 = _squared_distances(points, centers)
    exponent = 1.0 / (m - 1.0)
    # u_ij = d_ij^(-2/(m-1)) / sum_k d_ik^(-2/(m-1)), with squared distances; the tiny floor makes
    # a point sitting on a centre get (almost exactly) membership 1 instead of a division by zero.
    inverse = np.power(np.maximum(dist2, 1e-12), -exponent)
    return inverse / inverse.sum(axis=1, keepdims=True)


def fuzzy_cmeans(
    points: np.ndarray,
    n_clusters: int,
    m: float = 2.0,
    eps: float = 1e-3,
    max_iter: int = 300,
    seed: int | None = 0,
    init_centers: np.ndarray | None = None,
) -> FCMResult:
    """Cluster points with fuzzy c-means.

    Args:
        points: (N, D) array of features (e.g. pixel colours).
        n_clusters: number of clusters C.
        m: fuzzifier, > 1.
        eps: stop when the largest change of any membership is below this.
        max_iter: upper bound on update rounds.
        seed: seeds the random initial memberships (ignored with ``init_centers``).
        init_centers: optional (C, D) starting centres instead of random memberships.

    Returns:
        The centres, memberships and convergence information.

    Raises:
        HematoVisionError: fewer points than clusters, or a fuzzifier <= 1.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise HematoVisionError(f"points must be (N, D), got shape {points.shape}")
    if len(points) < n_clusters:
        raise HematoVisionError(f"need at least {n_clusters} points for {n_clusters} clusters, got {len(points)}")
    if m <= 1.0:
        raise HematoVisionError(f"the fuzzifier m must be > 1, got {m}")
    if init_centers is not None:
        memberships = fcm_memberships(points, np.asarray(init_centers, dtype=np.float64), m)
    else:
        rng = np.random.default_rng(seed)
        memberships = rng.dirichlet(np.ones(n_clusters), size=len(points))
    centers = _fcm_centers(points, memberships, m)
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is returned after the loop)
        new_memberships = fcm_memberships(points, centers, m)
        change = float(np.abs(new_memberships - memberships).max())
        memberships = new_memberships
        centers = _fcm_centers(points, memberships, m)
        if change < eps:
            converged = True
            break
    return FCMResult(centers=centers, memberships=memberships, iterations=iteration, converged=converged)


def _fcm_centers(points: np.ndarray, memberships: np.ndarray, m: float) -> np.ndarray:
    weights = memberships**m
    return (weights.T @ points) / np.maximum(weights.sum(axis=0)[:, None], 1e-12)


def _squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix product instead of an (N, C, D) temporary.
    dist2 = (points**2).sum(1)[:, None] - 2.0 * points @ centers.T + (centers**2).sum(1)[None, :]
    return np.maximum(dist2, 0.0)
