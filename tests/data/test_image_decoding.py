"""Image decoding keeps pixel values, and the size limits sit exactly where they are documented.

Every check runs through both readers the package has: ``load_rgb`` on a file path (what the
CLI, datasets and ``predict`` use) and the server's ``decode_image`` on uploaded bytes. Expected
values are written by hand from the documented conversions in ``data/images.py``: grey and
palette colours are kept exactly, transparency is composited on white, 16-bit greyscale has its
used range stretched linearly onto 0..255.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hematovision.data.images import DEFAULT_MAX_PIXELS, MIN_SIDE, ImageLoadError, load_rgb
from hematovision.serve.settings import Settings
from hematovision.serve.uploads import RawImage, UploadError, decode_image, sniff

Reader = Callable[[bytes], np.ndarray]


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(params=["cli", "serve"])
def read(request: pytest.FixtureRequest, tmp_path: Path) -> Reader:
    """Decode bytes as the CLI does (``load_rgb`` on a file) or as the server does (``decode_image``)."""
    if request.param == "cli":
        def from_file(data: bytes) -> np.ndarray:
            path = tmp_path / "image.bin"
            path.write_bytes(data)
            return load_rgb(path)

        return from_file

    def from_upload(data: bytes) -> np.ndarray:
        return decode_image(RawImage("upload", data, sniff(data) or "unknown"), Settings().max_pixels)

    return from_upload


def assert_rgb(array: np.ndarray, expected: np.ndarray) -> None:
    assert array.dtype == np.uint8 and array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)


# ---- pixel values ----

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_grey_values_stay_the_same(read: Reader, fmt: str) -> None:
    # Grey 100 on a mid-range ramp (not 0..255, so any stretching would show), every value kept.
    grey = np.full((16, 16), 100, np.uint8)
    grey[8:] = np.arange(60, 188).reshape(8, 16)
    array = read(encode(Image.fromarray(grey, "L"), fmt))
    assert tuple(array[0, 0]) == (100, 100, 100)
    assert_rgb(array, np.repeat(grey[..., None], 3, axis=2))


PALETTE = [(12, 200, 77), (250, 3, 128), (100, 100, 100), (0, 0, 255), (255, 255, 0)]


def palette_image() -> tuple[Image.Image, np.ndarray]:
    """A 16x16 "P" image using five palette entries, and its expected RGB."""
    indices = (np.arange(256) % len(PALETTE)).reshape(16, 16).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([value for colour in PALETTE for value in colour])
    return image, np.array(PALETTE, np.uint8)[indices]


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF"])
def test_palette_colours_survive_exactly(read: Reader, fmt: str) -> None:
    image, expected = palette_image()
    assert_rgb(read(encode(image, fmt)), expected)


def test_palette_transparency_becomes_white(read: Reader) -> None:
    image, expected = palette_image()
    # Palette entry 1 is transparent: composited on white; the others are opaque and kept.
    expected[np.asarray(image) == 1] = 255
    assert_rgb(read(encode(image, "PNG", transparency=1)), expected)


def test_rgba_is_composited_on_white(read: Reader) -> None:
    colour = (200, 100, 50)
    alphas = np.array([255, 0, 128, 64], np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.repeat(alphas, 2)[None, :]
    array = read(encode(Image.fromarray(rgba, "RGBA")))
    # out = colour * a + 255 * (1 - a), a = alpha / 255: opaque keeps its colour, transparent is white.
    a = alphas[:, None] / 255.0
    expected = np.array(colour)[None, :] * a + 255 * (1 - a)
    np.testing.assert_allclose(array[0, ::2].astype(float), expected, atol=1)
    assert tuple(array[0, 0]) == colour and tuple(array[0, 2]) == (255, 255, 255)
    assert (array == array[:1]).all()  # every row the same


def test_grey_with_alpha_is_composited_on_white(read: Reader) -> None:
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0] = 100
    la[:, :4, 1] = 255  # left half opaque
    la[:, 4:, 1] = 128  # right half half-transparent: 100 * 128/255 + 255 * 127/255 = 177.2
    array = read(encode(Image.fromarray(la, "LA")))
    assert (array[:, :4] == 100).all()
    assert np.abs(array[:, 4:].astype(int) - 177).max() <= 1


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_range_is_stretched_linearly(read: Reader, fmt: str) -> None:
    # Values 1000 + 10 k (k = 0..255): the used range 1000..3550 maps onto 0..255, so each
    # becomes k exactly; 2000 becomes grey 100.
    k = np.arange(256).reshape(16, 16)
    data = encode(Image.fromarray((1000 + 10 * k).astype(np.uint16)), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    array = read(data)
    assert tuple(array.reshape(-1, 3)[100]) == (100, 100, 100)
    assert_rgb(array, np.repeat(k.astype(np.uint8)[..., None], 3, axis=2))


# ---- size limits ----

class DecodingStarted(BaseException):
    """Raised by the patched ``ImageFile.load``: the header checks passed and decoding began.

    A ``BaseException``, so that no ``except Exception`` on the way turns it into a refusal.
    """


@pytest.fixture()
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Stop before any pixel is decoded; the list records the sizes decoding was started for."""
    started: list[tuple[int, int]] = []

    def load(self: ImageFile.ImageFile) -> None:
        started.append(self.size)
        raise DecodingStarted

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return started


def blank_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG: 40 MP of it is 5 MB in memory and ~5 kB compressed."""
    return encode(Image.new("1", (width, height)))


def test_cli_pixel_limit_is_forty_megapixels_from_the_header(no_decoding: list, tmp_path: Path) -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    at_limit, over = tmp_path / "at.png", tmp_path / "over.png"
    at_limit.write_bytes(blank_png(8000, 5000))  # exactly 40,000,000 pixels: accepted
    over.write_bytes(blank_png(754_717, 53))  # 40,000,001 = 53 x 754,717: refused
    with pytest.raises(DecodingStarted):
        load_rgb(at_limit)
    with pytest.raises(ImageLoadError) as refused:
        load_rgb(over)
    assert str(refused.value) == (
        f"{over}: image is 754717x53 = 40,000,001 pixels, above the limit of 40,000,000"
    )
    assert no_decoding == [(8000, 5000)]  # the refused image was never decoded


def test_server_pixel_limit_from_the_header(no_decoding: list) -> None:
    limit = Settings().max_pixels
    assert limit == 25_000_000
    with pytest.raises(DecodingStarted):
        decode_image(RawImage("at.png", blank_png(5000, 5000), "png"), limit)
    with pytest.raises(UploadError) as refused:
        decode_image(RawImage("over.png", blank_png(147_929, 169), "png"), limit)  # 25,000,001 pixels
    assert refused.value.status == 413
    assert str(refused.value) == "over.png: image is 147929x169 = 25,000,001 pixels, above the limit of 25,000,000"
    assert no_decoding == [(5000, 5000)]


@pytest.mark.parametrize("size", [(8, 8), (8, 1000), (1000, 8)])
def test_shorter_side_of_eight_is_accepted(read: Reader, size: tuple[int, int]) -> None:
    assert MIN_SIDE == 8
    assert read(encode(Image.new("RGB", size, (1, 2, 3)))).shape == (size[1], size[0], 3)


@pytest.mark.parametrize("size", [(7, 7), (7, 8), (8, 7), (7, 1000), (1000, 7)])
def test_shorter_side_below_eight_is_refused(read: Reader, size: tuple[int, int]) -> None:
    # The rule is on the shorter side: either dimension under 8 refuses the image, however long the other.
    with pytest.raises((ImageLoadError, UploadError)) as refused:
        read(encode(Image.new("RGB", size)))
    assert f"image is {size[0]}x{size[1]}, smaller than 8 px" in str(refused.value)
    if isinstance(refused.value, UploadError):
        assert refused.value.status == 400
