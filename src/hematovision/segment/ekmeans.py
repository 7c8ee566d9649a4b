"""EK-means segmentation of a white cell into nucleus, cytoplasm and background.

EK-means is k-means whose initial centres are the centres of a converged fuzzy c-means
run (:mod:`hematovision.segment.fcm`). Plain k-means depends on where it starts: with a
small, dark nucleus among many bright background pixels, a random start often puts two
centres in the background and none in the nucleus. FCM's soft memberships pull every
centre towards a real mode of the colour distribution first, so the k-means that follows
starts near the right answer, converges in a few rounds and gives the same result for
any seed.

**Colour space: CIELAB.** k-means measures Euclidean distance, and Lab is built so that
Euclidean distance follows perceived colour difference. The three regions separate along
its axes on stained smears (Zheng held-out statistics, mean L*, a*, b*): nucleus
≈ (31, 41, -21) dark purple, cytoplasm ≈ (64, 17, 12), background ≈ (96, -6, 29). In RGB
the same separation is spread across correlated channels, and HSV's hue is unstable on
the near-white background (low saturation) and wraps around at red. Lab also lets the
clusters be named without training: the darkest cluster (lowest L*) is the nucleus and the
brightest is the background.

Clustering gives colour classes, not a cell; a few morphological steps turn them into one
(:func:`clusters_to_labels`): the nucleus is the dark component(s) nearest the image
centre, the cell is the non-background region connected to it, holes filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from hematovision.errors import HematoVisionError
from hematovision.segment.fcm import fuzzy_cmeans
from hematovision.segment.kmeans import kmeans
from hematovision.segment.masks import CYTOPLASM, NUCLEUS

INITS = ("fcm", "kmeans++", "random")


@dataclass(frozen=True)
class ColourClusters:
    """Result of clustering an image's pixel colours.

    Attributes:
        labels: (H, W) cluster index per pixel, ordered by lightness (0 = darkest).
        centers: (K, 3) Lab centres, darkest first.
        iterations: k-means rounds run (after initialisation).
    """

    labels: np.ndarray
    centers: np.ndarray
    iterations: int


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W, 3) float CIELAB (D65)."""
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(image))


def cluster_colours(
    image: np.ndarray,
    n_clusters: int = 3,
    init: str = "fcm",
    seed: int = 0,
    fcm_eps: float = 1e-3,
    max_fcm_points: int = 6000,
) -> ColourClusters:
    """Cluster pixel colours in Lab with k-means, initialised by FCM (EK-means) or at random.

    Args:
        image: (H, W, 3) uint8 RGB.
        n_clusters: K (3: nucleus, cytoplasm, background; 4 adds red cells).
        init: ``"fcm"`` (EK-means), ``"kmeans++"`` or ``"random"``.
        seed: random seed of the initialisation.
        fcm_eps: FCM stops when no membership changes by more than this.
        max_fcm_points: FCM runs on at most this many randomly chosen pixels; it only has to
            find the modes, and its cost grows with points x iterations.

    Returns:
        Per-pixel cluster indices sorted by lightness, and the centres.
    """
    if init not in INITS:
        raise HematoVisionError(f"unknown init {init!r}; use one of {INITS}")
    lab = rgb_to_lab(image)
    points = lab.reshape(-1, 3)
    rng = np.random.default_rng(seed)
    if init == "fcm":
        subset = points if len(points) <= max_fcm_points else points[rng.choice(len(points), max_fcm_points, replace=False)]
        start: str | np.ndarray = fuzzy_cmeans(subset, n_clusters, eps=fcm_eps, seed=seed).centers
    else:
        start = init
    result = kmeans(points, n_clusters, init=start, seed=seed)
    # Name clusters by lightness so that index 0 is always the darkest (the nucleus candidate).
    order = np.argsort(result.centers[:, 0])
    rank = np.empty_like(order)
    rank[order] = np.arange(n_clusters)
    labels = rank[result.labels].reshape(lab.shape[:2])
    return ColourClusters(labels=labels, centers=result.centers[order], iterations=result.iterations)


def clusters_to_labels(clusters: np.ndarray, min_fraction: float = 0.004) -> np.ndarray:
    """Turn lightness-ordered colour clusters into a nucleus/cytoplasm/background label map.

    The darkest cluster is the nucleus colour, the second darkest the cytoplasm colour, the
    rest background (and red cells, when K = 4). Then, spatially:

    1. nucleus = the dark components larger than ``min_fraction`` of the image, keeping the one
       nearest the image centre and any others within a nucleus-width of it (the lobes of a
       neutrophil are separate components);
    2. cell = the non-background component that contains the nucleus, holes filled, opened
       with a small disc to cut thin bridges to touching red cells.

    Args:
        clusters: (H, W) cluster indices, 0 = darkest.
        min_fraction: smallest kept nucleus piece, as a fraction of the image area.

    Returns:
        (H, W) uint8 labels 0 background, 1 cytoplasm, 2 nucleus (all 0 when no nucleus is found).
    """
    height, width = clusters.shape
    labels = np.zeros((height, width), dtype=np.uint8)
    dark = clusters == 0
    nucleus = _central_components(dark, min_pixels=max(4, int(min_fraction * height * width)))
    if not nucleus.any():
        return labels
    stained = clusters <= 1
    stained = ndi.binary_opening(stained, structure=_disc(2)) | nucleus
    components, _ = ndi.label(stained)
    keep = np.unique(components[nucleus])
    cell = ndi.binary_fill_holes(np.isin(components, keep[keep > 0]))
    labels[cell] = CYTOPLASM
    labels[nucleus] = NUCLEUS
    return labels


def segment_ekmeans(
    image: np.ndarray, n_clusters: int = 3, init: str = "fcm", seed: int = 0
) -> np.ndarray:
    """Segment a single-cell image (cell roughly centred) with EK-means or a plain k-means.

    Args:
        image: (H, W, 3) uint8 RGB, any size.
        n_clusters: colour clusters (3 or 4).
        init: ``"fcm"`` for EK-means, ``"kmeans++"`` or ``"random"`` for plain k-means.
        seed: random seed.

    Returns:
        (H, W) uint8 labels 0 background, 1 cytoplasm, 2 nucleus. A blank or saturated image
        (no colour spread) gives all background.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise HematoVisionError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if _is_flat(image):
        return np.zeros(image.shape[:2], dtype=np.uint8)
    clusters = cluster_colours(image, n_clusters=n_clusters, init=init, seed=seed)
    return clusters_to_labels(clusters.labels)


def _is_flat(image: np.ndarray, min_range: int = 12) -> bool:
    # A blank, saturated or nearly uniform image has nothing to cluster; k-means on it would
    # split noise and call the darker half a nucleus.
    flat = image.reshape(-1, 3)
    return bool((flat.max(axis=0).astype(int) - flat.min(axis=0)).max() < min_range)


def _central_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    components, count = ndi.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(components.ravel())
    big = [i for i in range(1, count + 1) if sizes[i] >= min_pixels]
    if not big:
        return np.zeros_like(mask)
    centre = np.array(mask.shape) / 2.0
    centroids = ndi.center_of_mass(mask, components, big)
    distances = np.array([np.hypot(*(np.array(c) - centre)) for c in centroids])
    main = big[int(distances.argmin())]
    # Lobes of one nucleus lie within about the main piece's diameter of it.
    reach = 2.0 * np.sqrt(sizes[main] / np.pi) + 2.0
    dist_to_main = ndi.distance_transform_edt(components != main)
    kept = [i for i in big if i == main or dist_to_main[components == i].min() <= reach]
    return np.isin(components, kept)


def _disc(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius
