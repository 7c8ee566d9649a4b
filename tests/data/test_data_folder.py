from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from hematovision.data.classes import normalize_class_name
from hematovision.data.folder import load_images, scan_image_folder
from hematovision.errors import DatasetError


def _image(path: Path, color=(120, 40, 160)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), color).save(path)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [("NEUTROPHIL", "neutrophil"), ("Neutrophil", "neutrophil"), ("neutrophil", "neutrophil"),
     ("IG", "ig"), ("immature granulocytes", "ig"), ("Basophils", "basophil"), ("platelet", "platelet")],
)
def test_class_names_are_normalised(raw: str, canonical: str) -> None:
    assert normalize_class_name(raw) == canonical


def test_flat_class_layout(tmp_path: Path) -> None:
    _image(tmp_path / "NEUTROPHIL" / "a.png")
    _image(tmp_path / "Lymphocyte" / "b.jpg")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "Lymphocyte" / "labels.csv").write_text("x")
    folder = scan_image_folder(tmp_path)
    assert folder.class_names == ["lymphocyte", "neutrophil"]
    assert folder.split_names == []
    assert [p.name for p in folder.ignored] == ["labels.csv"]


def test_split_layout(tmp_path: Path) -> None:
    for split in ("TRAIN", "TEST"):
        for label in ("EOSINOPHIL", "MONOCYTE"):
            _image(tmp_path / split / label / "x.jpeg")
    folder = scan_image_folder(tmp_path)
    assert folder.split_names == ["test", "train"]
    assert len(folder.subset("train")) == 2


def test_wrong_layout_is_explained(tmp_path: Path) -> None:
    _image(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        scan_image_folder(tmp_path)


def test_empty_class_folder(tmp_path: Path) -> None:
    _image(tmp_path / "neutrophil" / "a.png")
    (tmp_path / "basophil").mkdir()
    with pytest.raises(DatasetError, match="basophil has no image files"):
        scan_image_folder(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        scan_image_folder(tmp_path / "nope")


def test_corrupt_files_are_counted_and_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "neutrophil" / "good.png")
    (tmp_path / "neutrophil" / "bad.jpg").write_text("not an image")
    (tmp_path / "neutrophil" / "empty.png").write_bytes(b"")
    loaded = load_images(scan_image_folder(tmp_path).samples, size=16)
    assert loaded.images.shape == (1, 16, 16, 3)
    assert sorted(p.name for p, _ in loaded.failures) == ["bad.jpg", "empty.png"]
