"""Stain robustness: stain normalisation to a reference, and stain and optics augmentation.

Two labs' images of the same cell differ in stain (dye batch, staining time: the hue and depth of
the purple nucleus and the pink cytoplasm), in optics (focus, resolution, noise, uneven light) and
in the camera's white balance. Two remedies, usable together or apart:

- **normalisation**: :func:`normalize_stain` maps an image's colours onto a reference fitted on the
  training images by :func:`fit_stain_reference`, either Reinhard (per-channel CIELAB mean and
  std) or Macenko (the two-stain optical-density matrix; computed by torchstain, the
  ``hematovision[stain]`` extra). ``Preprocessing.prepare`` applies it at training and inference
  alike; the reference is a plain dict stored in the model card's preprocessing.
- **augmentation**: :func:`augment_stain` shows the model other labs' stains and optics while it
  trains (``TrainTransform(strong=True)`` and the frozen mode's augmented copies).

All functions take and return RGB uint8 images (H, W, 3). Normalisation never invents colours
for an image with nothing to normalise: a blank, white or black image comes back unchanged.

Which normalisation: Reinhard, for blood smears. Measured on 150 bccd_wbc_crops and 150 pbc_dev
images, normalised to a reference fitted on 200 other pbc_dev images, the distance between the two
labs' average CIELAB mean and std fell from 25.3 to 1.1 (Reinhard) and to 16.5 (Macenko), the
colour of the darkest tenth of pixels (nuclei) from 26.9 to 9.2 and 12.3. Macenko's two-stain
model fits May-Grünwald-Giemsa poorly: red cells are too faint in red and blue to count as
stained, so an image's "eosin" vector comes from the white cell, PBC's own images change (their
CIELAB b mean moves 8 units), and 126 of the 150 BCCD images have stain vectors too far from PBC's
to be unmixed safely and are left as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

STAIN_METHODS = ("reinhard", "macenko")

# How far labs differ, measured on 60 images from each of five labs in ../shared/data (pbc_dev,
# bccd_wbc_crops, txl_pbc_multilab/raabin, wbc_seg_zheng, txl_pbc_multilab/bcd): the standard
# deviation, over the labs, of the lab's average per-image CIELAB mean (L, a, b), and of the log
# of its average per-image CIELAB std. One unit of augmentation strength samples that spread.
LAB_MEAN_SPREAD = (7.2, 4.5, 11.1)
LAB_LOG_STD_SPREAD = (0.35, 0.27, 0.21)

# An image whose lightness varies less than this (CIELAB L units) has nothing to normalise.
_MIN_L_STD = 2.0
# Reinhard may stretch or shrink an image's contrast at most this much: a near-flat channel
# (a grey image's chroma, a washed-out smear) must not have its noise blown up to full contrast.
_MAX_GAIN = 3.0
# An image whose grey levels vary less than this (0-255) is blank: nothing to normalise.
_MIN_GREY_STD = 2.0
# Macenko's transmitted light, after each image is white-balanced to its brightest pixels.
_MACENKO_IO = 250.0
# Macenko needs this many stained pixels to estimate an image's two stain vectors.
_MIN_STAINED_PIXELS = 64
# An image whose own H or E vector is further than this (degrees) from the reference's is not
# normalised by Macenko (see _macenko); the reference's own images stay within ~15 degrees.
_MAX_STAIN_ANGLE = 25.0
# Pixels sampled per image to fit a Macenko reference (keeps large images from dominating).
_FIT_PIXELS_PER_IMAGE = 4096
# Optical-density units of skimage's HED space (its log scale: log(rgb) / log(1e-6)).
_LOG_ADJUST = np.log(1e-6)


def lab_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel CIELAB mean and std of an RGB uint8 image: two arrays of 3 (L, a, b)."""
    lab = _rgb_to_lab(image).reshape(-1, 3)
    return lab.mean(axis=0, dtype=np.float64), lab.std(axis=0, dtype=np.float64)


def fit_stain_reference(images: Sequence[np.ndarray], method: str = "reinhard", max_images: int = 200,
                        seed: int = 0) -> dict[str, Any]:
    """The stain reference of a set of (training) images, as a JSON-ready dict.

    Args:
        images: RGB uint8 images (H, W, 3), any sizes.
        method: ``reinhard``: the median over images of each image's CIELAB mean and std (the
            median ignores odd images; blank ones are left out), which is exactly what
            :func:`normalize_stain` matches each image to. ``macenko``: torchstain's Macenko fit
            on pixels pooled from every sampled image (an equal number from each).
        max_images: at most this many images, sampled with ``seed``, are used.
        seed: which images (and, for Macenko, which pixels) are sampled.

    Returns:
        ``{"method": "reinhard", "target_means": [L, a, b], "target_stds": [L, a, b], ...}`` or
        ``{"method": "macenko", "he_matrix": 3x2, "max_concentrations": [H, E], "io", "alpha", "beta", ...}``.

    Raises:
        ValueError: unknown method, or no image with stained content to fit on.
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"unknown stain normalisation {method!r} (known: {', '.join(STAIN_METHODS)})")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(images))[:max_images] if len(images) > max_images else np.arange(len(images))
    sample = [np.asarray(images[i]) for i in chosen]
    if method == "reinhard":
        stats = [lab_statistics(image) for image in sample if image.size]
        stats = [(mean, std) for mean, std in stats if std[0] >= _MIN_L_STD]
        if not stats:
            raise ValueError("cannot fit a stain reference: no image has any content (all blank)")
        means = np.median([mean for mean, _ in stats], axis=0)
        stds = np.median([std for _, std in stats], axis=0)
        return {"method": "reinhard", "target_means": _rounded(means), "target_stds": _rounded(stds),
                "colour_space": "CIELAB (D65), scikit-image", "n_images": len(stats)}
    normalizers = _torchstain_normalizers()
    io, alpha, beta = _MACENKO_IO, 1.0, 0.15  # transmitted light after white balance; torchstain's alpha and beta
    pixels, white_points = [], []
    for image in sample:
        flat = image.reshape(-1, 3)
        if len(flat) and not _is_flat(image):
            white = _white_point(image)
            white_points.append(white)
            chosen_pixels = rng.choice(len(flat), min(len(flat), _FIT_PIXELS_PER_IMAGE), replace=False)
            pixels.append(flat[chosen_pixels] * (io / white))
    pooled = np.concatenate(pixels)[:, None, :] if pixels else np.zeros((0, 1, 3))
    if _stained_pixels(pooled, io, beta) < _MIN_STAINED_PIXELS:
        raise ValueError("cannot fit a stain reference: the images have (almost) no stained pixels")
    normalizer = normalizers.NumpyMacenkoNormalizer()
    try:
        with _strict_floats():
            normalizer.fit(pooled, Io=io, alpha=alpha, beta=beta)
    except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError) as error:
        raise ValueError(f"cannot fit a stain reference: the Macenko estimate failed on these images ({error})") from None
    he, max_c = np.asarray(normalizer.HERef, np.float64), np.asarray(normalizer.maxCRef, np.float64)
    if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
        raise ValueError("cannot fit a stain reference: the Macenko estimate is degenerate on these images")
    return {"method": "macenko", "he_matrix": [_rounded(row) for row in he], "max_concentrations": _rounded(max_c),
            "white_point": _rounded(np.median(white_points, axis=0)), "io": io, "alpha": alpha, "beta": beta,
            "library": f"torchstain {_torchstain_version()}", "n_images": len(white_points)}


def check_stain_reference(reference: Any) -> dict[str, Any]:
    """Return ``reference`` if it is a usable stain reference; otherwise raise ``ValueError`` saying why."""
    if not isinstance(reference, dict) or reference.get("method") not in STAIN_METHODS:
        method = reference.get("method") if isinstance(reference, dict) else reference
        raise ValueError(f"stain reference: method must be one of {', '.join(STAIN_METHODS)}, found {method!r}")
    shapes = ({"target_means": (3,), "target_stds": (3,)} if reference["method"] == "reinhard"
              else {"he_matrix": (3, 2), "max_concentrations": (2,), "white_point": (3,)})
    for key, shape in shapes.items():
        try:
            value = np.asarray(reference[key], np.float64)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"stain reference ({reference['method']}): {key} is missing or not numbers") from None
        if value.shape != shape or not np.isfinite(value).all():
            raise ValueError(f"stain reference ({reference['method']}): {key} must be {shape} finite numbers")
    if reference["method"] == "reinhard" and min(reference["target_stds"]) <= 0:
        raise ValueError("stain reference (reinhard): target_stds must be above 0")
    if reference["method"] == "macenko" and min(*reference["max_concentrations"], *reference["white_point"]) <= 0:
        raise ValueError("stain reference (macenko): max_concentrations and white_point must be above 0")
    return reference


def normalize_stain(image: np.ndarray, reference: dict[str, Any]) -> np.ndarray:
    """Map ``image``'s stain onto the reference's (see :func:`fit_stain_reference`).

    Args:
        image: RGB uint8 (H, W, 3).
        reference: a stain reference dict, as stored in ``Preprocessing.stain``.

    Returns:
        RGB uint8 of the same shape. A blank, white or black image, or one whose stains cannot
        be estimated, is returned unchanged (never NaN, never an invented colour).
    """
    check_stain_reference(reference)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"normalize_stain needs an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if image.size == 0:
        return image
    if reference["method"] == "reinhard":
        return _reinhard(image, np.asarray(reference["target_means"]), np.asarray(reference["target_stds"]))
    return _macenko(image, reference)


def _reinhard(image: np.ndarray, target_means: np.ndarray, target_stds: np.ndarray) -> np.ndarray:
    lab = _rgb_to_lab(image)
    flat = lab.reshape(-1, 3)
    mean, std = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
    if std[0] < _MIN_L_STD:
        return image
    gain = np.clip(target_stds / np.maximum(std, 1e-6), 1 / _MAX_GAIN, _MAX_GAIN)
    lab = (lab - mean.astype(np.float32)) * gain.astype(np.float32) + target_means.astype(np.float32)
    return _lab_to_rgb(lab, fallback=image)


def _macenko(image: np.ndarray, reference: dict[str, Any]) -> np.ndarray:
    # torchstain assumes a white background (zero optical density in every channel). Blood-smear
    # backgrounds are tinted (PBC's plasma is peach), and a tint cannot be written as the two
    # stains: it would be repainted in them. So each image is white-balanced to its own brightest
    # pixels first, and the result is given the reference's white point.
    io = float(reference.get("io", _MACENKO_IO))
    alpha, beta = float(reference.get("alpha", 1.0)), float(reference.get("beta", 0.15))
    if _is_flat(image):
        return image
    balanced = image.astype(np.float64) * (io / _white_point(image))
    if _stained_pixels(balanced, io, beta) < _MIN_STAINED_PIXELS:
        return image
    normalizers = _torchstain_normalizers()
    own, normalizer = normalizers.NumpyMacenkoNormalizer(), normalizers.NumpyMacenkoNormalizer()
    normalizer.HERef = np.asarray(reference["he_matrix"], np.float64)
    try:
        with _strict_floats(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The image's own stain amounts (what normalize() will scale to the reference's): a
            # stain the image barely has must not be amplified into a colour it never showed.
            own.fit(balanced, Io=io, alpha=alpha, beta=beta)
            own_max = np.asarray(own.maxCRef, np.float64)
            if _largest_angle(np.asarray(own.HERef, np.float64), normalizer.HERef) > _MAX_STAIN_ANGLE:
                # The image's stains are not the reference's two (another dye, or one stain
                # estimated twice): unmixing it into them repaints nuclei in impossible colours.
                return image
            normalizer.maxCRef = np.clip(np.asarray(reference["max_concentrations"], np.float64),
                                         own_max / _MAX_GAIN, own_max * _MAX_GAIN)
            normalized, _, _ = normalizer.normalize(balanced, Io=io, alpha=alpha, beta=beta, stains=False)
    except (FloatingPointError, np.linalg.LinAlgError, ValueError, IndexError):
        # Degenerate stains (one stain only, a near-uniform image): keep the image as it is.
        return image
    white = np.asarray(reference["white_point"], np.float64) / io
    return (np.clip(normalized * white, 0, 255) + 0.5).astype(np.uint8)


def augment_stain(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Another lab's look for ``image``: its stain, focus, resolution, noise and illumination, at random.

    Stain (90% of calls), in one of two stain spaces chosen at random:

    - CIELAB, as RandStainNA (Shen et al. 2022): the image is Reinhard-mapped to a virtual
      template whose per-channel mean and std are the image's own moved by a draw from the
      spread between labs (:data:`LAB_MEAN_SPREAD`, :data:`LAB_LOG_STD_SPREAD`);
    - HED colour deconvolution (Tellez et al. 2018), with scikit-image's stain vectors: each
      stain's optical density is scaled by ``1 ± 0.4·strength`` and shifted by ``± 0.01·strength``.

    Optics, each independently: Gaussian blur (30%), lost resolution (25%, up to 2.5x), an illumination
    gradient and vignetting (40%), sensor noise (30%). Blur and resolution scale with the image
    side, so the same strength means the same optics at any input size.

    Args:
        image: RGB uint8 (H, W, 3).
        rng: the randomness (the same generator state gives the same result).
        strength: 0 returns a copy of the image; 1 samples the spread measured between labs.

    Returns:
        RGB uint8 of the same shape.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if strength == 0 or image.size == 0:
        return image.copy()
    x = image.astype(np.float32) / 255.0
    space = rng.random()
    if space < 0.45:
        x = _random_lab_template(x, rng, strength)
    elif space < 0.9:
        x = _jitter_hed(x, rng, strength)
    side = min(image.shape[:2])
    if rng.random() < 0.3:
        from scipy.ndimage import gaussian_filter

        sigma = rng.uniform(0.002, 0.006 * strength + 0.002) * side
        x = gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")
    if rng.random() < 0.25:
        x = _lose_resolution(x, rng.uniform(1.2, 1.2 + 1.3 * strength))
    if rng.random() < 0.4:
        x = x * _illumination(image.shape[:2], rng, strength)[..., None]
    if rng.random() < 0.3:
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.005 + 0.03 * strength), x.shape).astype(np.float32)
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _random_lab_template(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(x)
    flat = lab.reshape(-1, 3)
    mean = flat.mean(axis=0)
    # Draws beyond two spreads are cut back to two: the tails give stains no lab would accept.
    target_mean = mean + np.clip(rng.normal(0.0, 1.0, 3), -2, 2) * LAB_MEAN_SPREAD * strength
    target_mean[0] = np.clip(target_mean[0], 30.0, 95.0)
    gain = np.exp(np.clip(rng.normal(0.0, 1.0, 3), -2, 2) * LAB_LOG_STD_SPREAD * strength)
    lab = (lab - mean) * gain.astype(np.float32) + target_mean.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-gamut colours are clipped, which is what we want
        return lab2rgb(lab).astype(np.float32)


def _jitter_hed(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    # Optical densities are deconvolved with skimage's HED vectors and recombined without
    # clipping negative concentrations (skimage's rgb2hed/hed2rgb round trip clips them, which
    # shifts blood-smear colours by ~8 grey levels on average even with no change at all).
    from skimage.color import hed_from_rgb, rgb_from_hed

    od = np.log(np.maximum(x, 1e-6)) / _LOG_ADJUST
    stains = od @ hed_from_rgb.astype(np.float32)
    scale = rng.uniform(1 - 0.4 * strength, 1 + 0.4 * strength, 3).clip(0.05, None)
    shift = rng.uniform(-0.01 * strength, 0.01 * strength, 3)
    stains = stains * scale.astype(np.float32) + shift.astype(np.float32)
    return np.exp((stains @ rgb_from_hed.astype(np.float32)) * _LOG_ADJUST).astype(np.float32)


def _lose_resolution(x: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    height, width = x.shape[:2]
    small = (max(4, round(width / factor)), max(4, round(height / factor)))
    channels = [Image.fromarray(x[..., c]).resize(small, Image.BILINEAR).resize((width, height), Image.BICUBIC)
                for c in range(3)]
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def _illumination(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A multiplicative light field: a linear gradient in a random direction times a vignette."""
    height, width = shape[:2]
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    yy, xx = yy / max(height - 1, 1) * 2 - 1, xx / max(width - 1, 1) * 2 - 1
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0, 0.15 * strength) * (np.cos(angle) * xx + np.sin(angle) * yy)
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    vignette = 1 - rng.uniform(0, 0.2 * strength) * ((yy - cy) ** 2 + (xx - cx) ** 2) / 2
    return (gradient * vignette).astype(np.float32)


def _rgb_to_lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(image.astype(np.float32) / 255.0)  # float32 in, float32 out: about 3x faster than uint8


def _lab_to_rgb(lab: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-gamut colours are clipped, which is what we want
        rgb = lab2rgb(lab)
    if not np.isfinite(rgb).all():
        return fallback
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _largest_angle(he: np.ndarray, reference_he: np.ndarray) -> float:
    """The larger of the angles (degrees) between an image's H and E vectors and the reference's."""
    cosines = (he * reference_he).sum(axis=0) / (np.linalg.norm(he, axis=0) * np.linalg.norm(reference_he, axis=0))
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def _is_flat(image: np.ndarray) -> bool:
    """Whether an image is (nearly) one colour: blank, white, black."""
    return float(image.reshape(-1, 3).mean(axis=1, dtype=np.float32).std()) < _MIN_GREY_STD


def _white_point(image: np.ndarray) -> np.ndarray:
    """The background light: the mean colour of the brightest 2% of pixels (at least 1 per channel)."""
    flat = image.reshape(-1, 3).astype(np.float64)
    brightness = flat.sum(axis=1)
    return np.maximum(flat[brightness >= np.percentile(brightness, 98)].mean(axis=0), 1.0)


def _stained_pixels(image: np.ndarray, io: float, beta: float) -> int:
    """Pixels whose optical density is at least ``beta`` in every channel (Macenko's stained pixels)."""
    od = -np.log((np.asarray(image, np.float32).reshape(-1, 3) + 1) / io)
    return int(np.count_nonzero((od >= beta).all(axis=1)))


def _strict_floats() -> Any:
    # Inside torchstain a degenerate image shows up as a division by zero or an invalid value
    # (then NaN cast to uint8); raising turns it into the "return the image unchanged" fallback.
    return np.errstate(divide="raise", invalid="raise", over="raise", under="ignore")


def _torchstain_normalizers() -> Any:
    from hematovision._optional import optional_import

    return optional_import("torchstain.numpy.normalizers", "stain")


def _torchstain_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchstain")
    except PackageNotFoundError:
        return "unknown"


def _rounded(values: Any) -> list[float]:
    # Rounded once, when fitted, so the reference in memory and the one read back from the card are the same.
    return [round(float(v), 5) for v in np.asarray(values).ravel()]
