"""``hematovision data inspect`` on folders whose contents are known file by file.

Every number the command prints (and writes with ``--json``) is compared with what the
fixtures built: counts per class and split, image sizes and modes, the exact duplicate
groups, the unreadable files. Bad inputs must end with exit code 2 and one line.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.cli import main


def _save(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A noisy image of the given size and mode; a distinct seed gives distinct bytes."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(path)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` without holding those pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def flat_dataset(tmp_path: Path) -> Path:
    """ROOT/<class>/*: 10 image files in 3 classes, two duplicate pairs, two unreadable files.

    ======================  ==========  =====  ======================================
    file                    size (WxH)  mode   note
    ======================  ==========  =====  ======================================
    NEUTROPHIL/n0.png       24x20       RGB
    NEUTROPHIL/n1.png       24x20       RGB
    NEUTROPHIL/n1_copy.png  24x20       RGB    copy of n1 (same class)
    NEUTROPHIL/n2.png       16x40       RGB
    lymphocyte/l0.png       32x32       L
    lymphocyte/l1.png       32x32       P
    lymphocyte/dup.png      24x20       RGB    copy of neutrophil n0 (across classes)
    lymphocyte/fake.png     -           -      a text file: no readable header
    eosinophil/e0.png       32x32       RGB
    eosinophil/trunc.png    48x40       RGB    first half of a PNG: header reads, pixels do not
    eosinophil/notes.txt                       not an image: ignored
    ======================  ==========  =====  ======================================
    """
    root = tmp_path / "flat"
    neutrophil, lymphocyte, eosinophil = root / "NEUTROPHIL", root / "lymphocyte", root / "eosinophil"
    n0 = _save(neutrophil / "n0.png", 24, 20, seed=1)
    n1 = _save(neutrophil / "n1.png", 24, 20, seed=2)
    shutil.copy(n1, neutrophil / "n1_copy.png")
    _save(neutrophil / "n2.png", 16, 40, seed=3)
    _save(lymphocyte / "l0.png", 32, 32, "L", seed=4)
    _save(lymphocyte / "l1.png", 32, 32, "P", seed=5)
    shutil.copy(n0, lymphocyte / "dup.png")
    (lymphocyte / "fake.png").write_text("this is not an image\n")
    _save(eosinophil / "e0.png", 32, 32, seed=6)
    whole = _save(tmp_path / "whole.png", 48, 40, seed=7).read_bytes()
    (eosinophil / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (eosinophil / "notes.txt").write_text("counted by hand")
    return root


def _table(out: str, first_column: str = "class") -> dict[str, list[str]]:
    """The per-class table of the printed report: first cell → the other cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first_column])
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def _line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


def _pairs(text: str) -> dict[str, int]:
    """``"24x20 ×4, 32x32 ×3"`` → ``{"24x20": 4, "32x32": 3}``."""
    return {key: int(count) for key, count in (item.split(" ×") for item in text.split(", "))}


def test_flat_folder_counts_sizes_duplicates_and_unreadable(flat_dataset: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    report_file = tmp_path / "report.json"
    assert main(["data", "inspect", str(flat_dataset), "--json", str(report_file)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_file.read_text())

    expected_counts = {"eosinophil": 2, "lymphocyte": 4, "neutrophil": 4}
    assert report["n_images"] == 10 and report["splits"] is None
    assert report["classes"] == ["eosinophil", "lymphocyte", "neutrophil"]  # folder names normalised
    assert report["counts"] == {"all": expected_counts}
    # The truncated file's header still gives its size and mode; the text file has neither.
    expected_sizes = {"24x20": 4, "32x32": 3, "16x40": 1, "48x40": 1}
    assert report["image_sizes"] == expected_sizes and report["distinct_sizes"] == 4
    assert report["modes"] == {"RGB": 7, "L": 1, "P": 1}
    assert sorted(map(sorted, report["duplicate_groups"])) == [
        ["lymphocyte/dup.png", "neutrophil/n0.png"], ["neutrophil/n1.png", "neutrophil/n1_copy.png"]]
    assert [sorted(group) for group in report["duplicates_across_classes_or_splits"]] == [
        ["lymphocyte/dup.png", "neutrophil/n0.png"]]
    assert sorted(Path(entry["file"]).name for entry in report["unreadable"]) == ["fake.png", "trunc.png"]
    reasons = {Path(entry["file"]).name: entry["reason"] for entry in report["unreadable"]}
    assert "truncated" in reasons["trunc.png"]
    assert [Path(p).name for p in report["ignored_non_image_files"]] == ["notes.txt"]

    # The printed report carries the same numbers.
    assert out.splitlines()[0] == f"{flat_dataset}: 10 images, 3 classes"
    table = _table(out)
    assert table["class"] == ["all", "total"]
    for name, count in expected_counts.items():
        assert table[name] == [str(count), str(count)], name
    assert table["total"] == ["10", "10"]
    assert _line(out, "image sizes (4 distinct, most common): ")
    assert _pairs(_line(out, "image sizes").split(": ", 1)[1]) == expected_sizes
    assert _pairs(_line(out, "modes: ").split(": ", 1)[1]) == {"RGB": 7, "L": 1, "P": 1}
    lines = out.splitlines()
    at = lines.index("exact duplicates: 2 group(s), 1 across classes/splits")
    assert sorted(lines[at + 1].strip().split(" = ")) == ["lymphocyte/dup.png", "neutrophil/n0.png"]
    at = lines.index("unreadable files: 2")
    assert sorted(lines[at + 1 : at + 3]) == sorted(f"  {reasons[name]}" for name in ("fake.png", "trunc.png"))
    assert any("fake.png" in line for line in lines[at + 1 : at + 3])
    assert "non-image files ignored: 1" in lines


def test_split_folders_are_counted_per_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "split"
    for i in range(3):
        _save(root / "train" / "basophil" / f"b{i}.png", 20, 20, seed=10 + i)
    for i in range(2):
        _save(root / "train" / "monocyte" / f"m{i}.png", 20, 20, seed=20 + i)
    _save(root / "test" / "basophil" / "b9.png", 20, 20, seed=30)
    shutil.copy(root / "train" / "basophil" / "b0.png", root / "test" / "basophil" / "leak.png")
    for i in range(2):
        _save(root / "test" / "monocyte" / f"m{i}.png", 20, 20, seed=40 + i)
    _save(root / "validation" / "monocyte" / "v0.png", 20, 20, seed=50)  # "validation" means val
    _save(root / "validation" / "basophil" / "v1.png", 20, 20, seed=51)
    assert main(["data", "inspect", str(root), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())

    expected = {"test": {"basophil": 2, "monocyte": 2}, "train": {"basophil": 3, "monocyte": 2},
                "val": {"basophil": 1, "monocyte": 1}}
    assert report["counts"] == expected and report["splits"] == ["test", "train", "val"]
    assert report["n_images"] == 11 and report["image_sizes"] == {"20x20": 11}
    assert [sorted(g) for g in report["duplicates_across_classes_or_splits"]] == [
        ["test/basophil/leak.png", "train/basophil/b0.png"]]
    assert report["unreadable"] == []

    table = _table(out)
    assert table["class"] == ["test", "train", "val", "total"]
    assert table["basophil"] == ["2", "3", "1", "6"]
    assert table["monocyte"] == ["2", "2", "1", "5"]
    assert table["total"] == ["4", "5", "2", "11"]
    assert "exact duplicates: 1 group(s), 1 across classes/splits" in out
    assert "unreadable files: 0" in out


def test_a_header_declaring_a_decompression_bomb_is_listed_not_a_crash(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    # 20,000 x 20,000 is above Pillow's own bomb limit, which Image.open raises as a non-OSError.
    root = tmp_path / "bomb"
    _save(root / "a" / "ok.png", 20, 20, seed=1)
    _save(root / "b" / "ok.png", 20, 20, seed=2)
    _png_header(root / "a" / "bomb.png", 20_000, 20_000)
    assert main(["data", "inspect", str(root), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [Path(entry["file"]).name for entry in report["unreadable"]] == ["bomb.png"]
    assert report["counts"] == {"all": {"a": 2, "b": 1}}
    assert "unreadable files: 1" in capsys.readouterr().out


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("hematovision: error: ")
    return err


def test_missing_folder_is_exit_2_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    err = _one_line_error(capsys)
    assert "not found" in err and "nowhere" in err


def test_folder_without_class_subfolders_is_exit_2_and_one_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    loose = tmp_path / "loose"
    _save(loose / "a.png", 20, 20, seed=1)
    _save(loose / "b.png", 20, 20, seed=2)
    assert main(["data", "inspect", str(loose)]) == 2
    err = _one_line_error(capsys)
    assert "expected one sub-folder per class" in err and "2 images lie directly in it" in err

    empty_class = tmp_path / "empty_class"
    _save(empty_class / "neutrophil" / "a.png", 20, 20, seed=1)
    (empty_class / "basophil").mkdir()
    (empty_class / "basophil" / "readme.txt").write_text("no images here")
    assert main(["data", "inspect", str(empty_class)]) == 2
    assert "basophil has no image files" in _one_line_error(capsys)
