from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.data.images import ImageLoadError, load_rgb


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _with_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR to claim another size (a decompression bomb needs no real pixels)."""
    ihdr_start = 8 + 8  # signature, then length + type of the IHDR chunk
    body = bytearray(data[ihdr_start : ihdr_start + 13])
    body[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return data[:ihdr_start] + bytes(body) + crc + data[ihdr_start + 17 :]


def test_rgb_jpeg_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cell.jpg"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(path)
    image = load_rgb(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert abs(int(image[..., 0].mean()) - 200) < 5


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16))
    else:
        image = Image.new(mode, (32, 32))
    array = load_rgb(_png_bytes(image))
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_sixteen_bit_keeps_contrast() -> None:
    ramp = np.tile(np.linspace(1000, 3000, 32), (32, 1)).astype(np.uint16)
    array = load_rgb(_png_bytes(Image.fromarray(ramp)))
    assert array[..., 0].min() == 0 and array[..., 0].max() == 255


def test_transparent_pixels_become_white() -> None:
    array = load_rgb(_png_bytes(Image.new("RGBA", (16, 16), (0, 0, 0, 0))))
    assert (array == 255).all()


def test_truncated_jpeg_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_rgb(path)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_rgb(path)


def test_one_pixel_image_is_refused() -> None:
    with pytest.raises(ImageLoadError, match="smaller than"):
        load_rgb(_png_bytes(Image.new("RGB", (1, 1))))


@pytest.mark.parametrize("side", [20000, 8000])
def test_decompression_bomb_refused_before_decoding(side: int) -> None:
    # 20000² trips Pillow's own bomb guard, 8000² (64 MP) only ours; both fail before any pixel is decoded.
    bomb = _with_png_size(_png_bytes(Image.new("RGB", (8, 8))), side, side)
    with pytest.raises(ImageLoadError, match="too large|above the limit"):
        load_rgb(bomb)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="cannot open"):
        load_rgb(tmp_path / "absent.png")
