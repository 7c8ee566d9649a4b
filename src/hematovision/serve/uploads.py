"""Checking uploads before anything is decoded or stored.

The type of a file is decided by its first bytes, never by its name or the client's
content type. Zips are opened member by member with limits on count, size and
compression ratio, and members whose path could escape a folder are refused. Every
problem raises :class:`UploadError`, which the API turns into a 4xx JSON answer.
"""

from __future__ import annotations

import io
import lzma
import posixpath
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hematovision.data.images import ImageLoadError, load_rgb
from hematovision.errors import HematoVisionError

# Leading bytes of the formats Pillow decodes and the app accepts.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "bmp": ".bmp", "tiff": ".tif", "webp": ".webp"}


class UploadError(HematoVisionError, ValueError):
    """An upload cannot be used; ``status`` is the HTTP code to answer with.

    Args:
        message: what is wrong, naming the file.
        status: 400 (malformed), 413 (too large or too many) or 415 (not an image).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """The limits one request must respect (see :class:`~hematovision.serve.settings.Settings`)."""

    max_file_bytes: int = 20 * 1024 * 1024
    max_files: int = 100
    max_pixels: int = 25_000_000
    max_zip_bytes: int = 200 * 1024 * 1024
    max_zip_ratio: float = 200.0
    max_request_pixels: int = 100_000_000


@dataclass(frozen=True)
class RawImage:
    """One image file taken from a request, not yet decoded.

    Attributes:
        filename: the client's name (for display only, never used as a path); zip members
            are shown as ``archive.zip/member.png``.
        data: the file's bytes.
        kind: the format found from the content (``jpeg``, ``png`` ...).
    """

    filename: str
    data: bytes
    kind: str


def sniff(data: bytes) -> str | None:
    """The format of ``data`` from its leading bytes: an image kind, ``"zip"`` or ``None``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    if data.startswith(_ZIP_SIGNATURES):
        return "zip"
    return None


def display_name(name: str | None, fallback: str = "upload") -> str:
    """A client file name made safe to show and store as text: no folders, no control characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(char for char in name if char.isprintable())[:200].strip()
    return name or fallback


def expand_uploads(files: list[tuple[str | None, bytes]], limits: UploadLimits) -> list[RawImage]:
    """Turn the request's files into image files, unpacking zips; check every limit.

    Args:
        files: ``(client file name, bytes)`` for each uploaded part, in order.
        limits: the limits to apply.

    Returns:
        The images in upload order (zip members in archive order).

    Raises:
        UploadError: no files, a file too large, too many images, a file that is neither an
            image nor a zip, or an unsafe/oversized zip.
    """
    if not files:
        raise UploadError("no files were uploaded; send one or more parts named 'files'", 400)
    images: list[RawImage] = []
    for index, (client_name, data) in enumerate(files):
        name = display_name(client_name, f"file-{index + 1}")
        if len(data) == 0:
            raise UploadError(f"{name}: the file is empty", 400)
        if len(data) > limits.max_file_bytes:
            raise UploadError(
                f"{name}: {len(data):,} bytes is above the per-file limit of {limits.max_file_bytes:,}", 413
            )
        kind = sniff(data)
        if kind == "zip":
            images.extend(_unzip(name, data, limits, room=limits.max_files - len(images)))
        elif kind is None:
            raise UploadError(
                f"{name}: not a supported image (JPEG, PNG, GIF, BMP, TIFF, WebP) or zip, judged by its content",
                415,
            )
        else:
            images.append(RawImage(name, data, kind))
        if len(images) > limits.max_files:
            raise UploadError(f"too many images in one request (more than {limits.max_files})", 413)
    check_pixel_budget(images, limits.max_request_pixels)
    return images


def header_pixels(image: RawImage) -> int:
    """Width × height from the image's header, without decoding; 0 when the header cannot be read
    (decoding then reports the file)."""
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            width, height = opened.size
    except (MemoryError, RecursionError, KeyboardInterrupt):
        raise
    except Exception:
        return 0
    return int(width) * int(height)


def check_pixel_budget(images: list[RawImage], max_request_pixels: int) -> None:
    """Refuse a request whose images decode to more than ``max_request_pixels`` in all.

    Small files can decode to many pixels (a blank 5000×5000 PNG is a few kB): the per-file and
    per-image limits alone let one request cost seconds of CPU.

    Raises:
        UploadError: 413 naming the total and the limit.
    """
    total = sum(header_pixels(image) for image in images)
    if total > max_request_pixels:
        raise UploadError(
            f"the images of this request ({len(images)}) are {total / 1e6:.1f} megapixels in all, above the limit of "
            f"{max_request_pixels / 1e6:g} megapixels per request; send them in smaller batches", 413)


def is_safe_member_name(name: str) -> bool:
    """Whether a zip member name stays inside the folder it is unpacked into."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    if len(name) >= 2 and name[1] == ":":  # a Windows drive letter such as C:
        return False
    normalized = posixpath.normpath(name)
    return not (normalized == ".." or normalized.startswith("../"))


def _unzip(archive: str, data: bytes, limits: UploadLimits, room: int) -> list[RawImage]:
    try:
        archive_file = zipfile.ZipFile(io.BytesIO(data))
        members = archive_file.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as error:
        raise UploadError(f"{archive}: not a readable zip ({error})", 400) from error
    images: list[RawImage] = []
    total = 0
    with archive_file:
        for member in members:
            if not is_safe_member_name(member.filename):
                raise UploadError(f"{archive}: member {member.filename!r} has an unsafe path", 400)
            base = posixpath.basename(member.filename)
            # Folders and the metadata files some zip tools add are not images of the batch.
            if member.is_dir() or base.startswith(".") or member.filename.startswith("__MACOSX/"):
                continue
            if len(images) >= room:
                raise UploadError(f"too many images in one request (more than {limits.max_files})", 413)
            if member.file_size > limits.max_file_bytes:
                raise UploadError(
                    f"{archive}/{member.filename}: {member.file_size:,} bytes unpacked is above the "
                    f"per-file limit of {limits.max_file_bytes:,}", 413,
                )
            if member.compress_size and member.file_size / member.compress_size > limits.max_zip_ratio:
                raise UploadError(f"{archive}/{member.filename}: compression ratio is too high (zip bomb?)", 413)
            # The sizes in the header can lie: zipfile inflates no more than the declared size
            # (checked above) and then fails the CRC check; the read is capped too, in case not.
            content = _read_member(archive_file, member, limits.max_file_bytes, archive)
            total += len(content)
            if total > limits.max_zip_bytes:
                raise UploadError(f"{archive}: more than {limits.max_zip_bytes:,} bytes unpacked", 413)
            kind = sniff(content)
            if kind == "zip":
                raise UploadError(f"{archive}/{member.filename}: zips inside zips are not accepted", 415)
            if kind is None:
                raise UploadError(f"{archive}/{member.filename}: not a supported image, judged by its content", 415)
            images.append(RawImage(f"{archive}/{display_name(member.filename)}", content, kind))
    if not images:
        raise UploadError(f"{archive}: the zip holds no images", 400)
    return images


def _read_member(archive_file: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, archive: str) -> bytes:
    try:
        with archive_file.open(member) as handle:
            content = handle.read(limit + 1)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError, zlib.error,
            lzma.LZMAError) as error:
        # RuntimeError: encrypted member; NotImplementedError: unknown compression method;
        # zlib.error / LZMAError: a corrupt deflate / LZMA stream (neither is an OSError).
        raise UploadError(f"{archive}/{member.filename}: cannot be unpacked ({error})", 400) from error
    if len(content) > limit:
        raise UploadError(f"{archive}/{member.filename}: unpacks to more than {limit:,} bytes", 413)
    return content


def decode_image(image: RawImage, max_pixels: int) -> np.ndarray:
    """Decode to RGB uint8 (H, W, 3), with the pixel limit checked before decoding.

    Raises:
        UploadError: 413 for too many pixels, 400 for corrupt, truncated or tiny images.
    """
    try:
        return load_rgb(image.data, max_pixels=max_pixels)
    except ImageLoadError as error:
        reason = str(error).replace("<bytes>", image.filename, 1)
        status = 413 if ("pixels" in reason or "too large" in reason) else 400
        raise UploadError(reason, status) from error
    except (MemoryError, RecursionError, KeyboardInterrupt):
        raise
    except Exception as error:
        # Pillow's plugins raise many types (struct.error, IndexError, ...) on malformed headers;
        # any of them means the upload is bad, not that the server is.
        raise UploadError(f"{image.filename}: the image cannot be decoded ({type(error).__name__})", 400) from error


def reencode(image: np.ndarray, kind: str) -> tuple[bytes, str]:
    """The decoded image encoded afresh, with no metadata: what is stored instead of the upload.

    Re-encoding keeps the pixels and drops everything else a file can carry (EXIF and text
    chunks, trailing data, a second format hidden in the same bytes). A JPEG upload, already
    lossy, is stored as a JPEG at quality 95 with full-resolution colour (about 54 dB PSNR to the
    decoded pixels; 0.5 ms for a 360 px cell where a PNG takes 15-30 ms, as much again as the
    model). Every other format is stored as a lossless PNG.

    Args:
        image: RGB uint8 (H, W, 3), as :func:`decode_image` gives it.
        kind: the upload's format, from :func:`sniff`.

    Returns:
        The new file's bytes and its format (``"jpeg"`` or ``"png"``).
    """
    buffer = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=95, subsampling=0)
        return buffer.getvalue(), "jpeg"
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)  # a fifth of level 6's time
    return buffer.getvalue(), "png"
