"""Reading images safely: any mode in, RGB uint8 out, with clear errors for bad files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hematovision.errors import HematoVisionError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

# 40 megapixels is far above any microscope field we expect (a 640x480 BCCD frame is 0.3 MP)
# and far below what would exhaust memory; larger images are refused before decoding.
DEFAULT_MAX_PIXELS = 40_000_000
MIN_SIDE = 8


class ImageLoadError(HematoVisionError, ValueError):
    """A file could not be used as an image; the message says why."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (content is checked when it is read)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_rgb(
    source: str | Path | bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """Decode an image into an RGB ``uint8`` array of shape (H, W, 3).

    Grayscale, palette, RGBA (composited on white) and 16-bit images are converted.
    The pixel count is checked from the header before decoding, so a decompression
    bomb is refused without allocating it.

    Args:
        source: a file path or the file's bytes.
        max_pixels: refuse images with more pixels than this.
        min_side: refuse images whose shorter side is below this.

    Raises:
        ImageLoadError: the file is missing, not an image, truncated, too large or too small.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as error:
        raise ImageLoadError(f"{name}: cannot open ({error.strerror or error})") from error
    with handle:
        try:
            image = Image.open(handle)
        except UnidentifiedImageError as error:
            raise ImageLoadError(f"{name}: not a recognised image file") from error
        except Image.DecompressionBombError as error:
            raise ImageLoadError(f"{name}: image is too large ({error})") from error
        width, height = image.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{name}: image is {width}x{height} = {width * height:,} pixels, "
                f"above the limit of {max_pixels:,}"
            )
        if min(width, height) < min_side:
            raise ImageLoadError(f"{name}: image is {width}x{height}, smaller than {min_side} px")
        try:
            image.load()
            return _to_rgb_array(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageLoadError(f"{name}: corrupt or truncated image ({error})") from error


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float grayscale: rescale the used range to 0..255 rather than clipping.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = ((array - low) * scale).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(array)
