"""Reading images safely: any mode in, RGB uint8 out, with clear errors for bad files."""

from __future__ import annotations

import io
import os
import stat
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


def display_path(path: str | Path) -> str:
    """A path as text that can always be printed and written to UTF-8 files.

    File names are bytes on POSIX; one that is not valid UTF-8 reaches Python with surrogate
    escapes, which ``print``, the CSV writer and JSON readers refuse. Such bytes are shown as
    ``\\xNN`` escapes instead (``bad\\xffname.png``); valid names are returned unchanged.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def not_a_file_reason(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as an image file without trying, or ``None`` if it can be tried.

    Looks only at the directory entry (``stat``), so a FIFO is never opened (opening one blocks
    until a writer appears) and a dangling symbolic link is named as such. A missing or unreadable
    file gets ``None``: opening it gives the system's own reason.
    """
    try:
        info = os.stat(path)
    except OSError:
        if os.path.islink(path):
            return f"a symbolic link to a missing file ({display_path(os.readlink(path))})"
        return None
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return "the file is empty" if info.st_size == 0 else None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return f"not a regular file: {kind}"


def check_file(path: str | Path) -> None:
    """Refuse, without opening it, a path that is not a non-empty regular file (or a link to one).

    Raises:
        ImageLoadError: a FIFO, socket, device or folder, a dangling symbolic link, or an empty file.
    """
    reason = not_a_file_reason(path)
    if reason is not None:
        raise ImageLoadError(f"{display_path(path)}: {reason}")


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
        ImageLoadError: the file is missing, not a regular file (a FIFO, a folder, a dangling
            link), empty, not an image, truncated, too large or too small.
    """
    name = "<bytes>" if isinstance(source, bytes) else display_path(source)
    if not isinstance(source, bytes):
        check_file(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as error:
        raise ImageLoadError(f"{name}: cannot open ({error.strerror or error})") from error
    with handle:
        if handle.seek(0, io.SEEK_END) == 0:
            raise ImageLoadError(f"{name}: the file is empty")
        handle.seek(0)
        try:
            image = Image.open(handle)
        except UnidentifiedImageError as error:
            raise ImageLoadError(f"{name}: not a recognised image file") from error
        except Image.DecompressionBombError as error:
            raise ImageLoadError(f"{name}: image is too large ({error})") from error
        except (MemoryError, RecursionError):
            raise
        except Exception as error:
            # Pillow's plugins raise many types on malformed headers (struct.error, IndexError, a
            # ValueError for a PNG text chunk over MAX_TEXT_CHUNK, ...); each means a bad file.
            raise ImageLoadError(f"{name}: {decode_problem(error, 'the image cannot be decoded')}") from error
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
        except (MemoryError, RecursionError):
            raise
        except Exception as error:  # as above: any decoder failure is a bad file, not a bug
            raise ImageLoadError(f"{name}: {decode_problem(error, 'corrupt or truncated image')}") from error


def decode_problem(error: Exception, what: str) -> str:
    """A decoder's complaint in words: ``what (details)``, the PNG text-chunk limit explained."""
    message = display_path(str(error))  # an OSError's text may hold a file name that is not UTF-8
    if "MAX_TEXT_CHUNK" in message or "MAX_TEXT_MEMORY" in message:
        # Metadata, not pixels: Pillow stops at 1 MB of decompressed text per chunk (64 MB in all)
        # so that a small file cannot inflate into gigabytes of text. The limit is kept and the
        # file refused, as the server does: images from microscopes carry no such metadata.
        return "a PNG text chunk (metadata) decompresses to more than Pillow's 1 MB safety limit"
    return f"{what} ({message or type(error).__name__})"


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
