"""Labelled datasets in both layouts: class folders, and images/ + a labels CSV (Zheng et al.'s Dataset 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import make_dataset, synthetic_cell

from hematovision.cli import main
from hematovision.data.folder import scan_image_folder
from hematovision.data.sources import scan_labelled, scan_sources, source_names
from hematovision.data.splits import content_groups
from hematovision.errors import DatasetError

ZHENG_HEADER = "image ID,class label"
# Zheng's codes: 1 neutrophil, 2 lymphocyte, 4 eosinophil (3 monocyte and 5 basophil are not drawn here).
CODES = {1: "neutrophil", 2: "lymphocyte", 4: "eosinophil"}


def zheng_like(root: Path, codes: list[int], pad: int = 3, header: str = ZHENG_HEADER, seed: int = 0) -> Path:
    """A tiny copy of Dataset 1's layout: images/NNN.png, masks/NNN.png and class_labels.csv (ID -> class code)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number, code in enumerate(codes, start=1):
        Image.fromarray(synthetic_cell(CODES[code], 40, rng)).save(root / "images" / f"{number:0{pad}d}.png")
        Image.new("L", (40, 40)).save(root / "masks" / f"{number:0{pad}d}.png")
    rows = [header] + [f"{number},{code}" for number, code in enumerate(codes, start=1)]
    (root / "class_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def labels_of(folder) -> dict[str, str]:
    return {sample.path.name: sample.label for sample in folder.samples}


def test_zheng_layout_reads_ids_and_codes(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4, 1])
    folder = scan_labelled(root)
    assert labels_of(folder) == {"001.png": "neutrophil", "002.png": "lymphocyte", "003.png": "eosinophil",
                                 "004.png": "neutrophil"}
    assert folder.labels_file == root / "class_labels.csv"
    assert folder.split_names == []  # masks/ is neither a class nor a split
    assert all(sample.path.parent == root / "images" for sample in folder.samples)


@pytest.mark.parametrize(("pad", "ids"), [(3, ["1", "2"]), (1, ["001", "002"]), (3, ["001", "002"]),
                                          (3, ["001.bmp", "002.bmp"]), (3, ["1.0", "2.0"])])
def test_ids_match_files_with_or_without_zero_padding(tmp_path: Path, pad: int, ids: list[str]) -> None:
    root = zheng_like(tmp_path / "d", [1, 2], pad=pad)
    (root / "class_labels.csv").write_text(ZHENG_HEADER + "\n" + "\n".join(f"{i},{c}" for i, c in zip(ids, (2, 1))))
    assert sorted(labels_of(scan_labelled(root)).values()) == ["lymphocyte", "neutrophil"]
    assert labels_of(scan_labelled(root))[f"{1:0{pad}d}.png"] == "lymphocyte"


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4])
    (root / "images" / "002.png").unlink()
    with pytest.raises(DatasetError, match=r"1 labelled image\(s\) not found in .*images, e\.g\. ID\(s\) 2\b"):
        scan_labelled(root)


def test_an_unknown_class_code_is_named(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2])
    with open(root / "class_labels.csv", "a") as handle:
        handle.write("2,7\n")
    with pytest.raises(DatasetError, match="class code 7 of image 2 is unknown"):
        scan_labelled(root)


def test_numeric_codes_need_a_code_table_unless_the_table_is_zhengs(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2], header="file,label")
    with pytest.raises(DatasetError, match="numeric codes .*class_codes.csv"):
        scan_labelled(root)
    (root / "class_codes.csv").write_text("code,class\n1,Monocyte\n2,BASOPHILS\n")
    assert labels_of(scan_labelled(root)) == {"001.png": "monocyte", "002.png": "basophil"}


def test_named_classes_other_columns_and_delimiter(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4])
    (root / "labels.csv").unlink(missing_ok=True)
    (root / "class_labels.csv").write_text("Cell Type;note;File Name\nEOSINOPHIL;x;001.png\nLymphocytes;y;002.png\n"
                                           "neutrophil;z;003.png\n")
    assert labels_of(scan_labelled(root)) == {"001.png": "eosinophil", "002.png": "lymphocyte", "003.png": "neutrophil"}


def test_two_unnamed_columns_without_a_header(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2])
    (root / "class_labels.csv").write_text("monocyte,001\nbasophil,002\n")
    assert labels_of(scan_labelled(root)) == {"001.png": "monocyte", "002.png": "basophil"}


def test_an_image_labelled_twice_differently_is_refused(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2])
    with open(root / "class_labels.csv", "a") as handle:
        handle.write("01,2\n")
    with pytest.raises(DatasetError, match="image 01 is labelled twice"):
        scan_labelled(root)


def test_images_without_a_labels_csv_are_explained(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2])
    (root / "class_labels.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DatasetError, match="has images/ but no labels CSV"):
        scan_labelled(root)
    (root / "class_labels.csv").unlink()
    with pytest.raises(DatasetError, match="has images/ but no labels CSV"):
        scan_labelled(root)


def test_unlabelled_images_are_left_out_and_listed(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4])
    (root / "class_labels.csv").write_text(ZHENG_HEADER + "\n1,1\n3,4\n")
    folder = scan_labelled(root)
    assert sorted(labels_of(folder)) == ["001.png", "003.png"]
    assert [path.name for path in folder.ignored] == ["002.png"]


def test_a_split_column_gives_the_split(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4])
    (root / "class_labels.csv").write_text("file,class,split\n001.png,neutrophil,TRAIN\n002.png,lymphocyte,Test\n"
                                           "003.png,eosinophil,valid\n")
    assert {s.path.name: s.split for s in scan_labelled(root).samples} == {"001.png": "train", "002.png": "test",
                                                                            "003.png": "val"}


def test_classes_are_filtered_and_must_exist(tmp_path: Path) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4])
    assert sorted(labels_of(scan_labelled(root, ["Neutrophils", "eos"])).values()) == ["eosinophil", "neutrophil"]
    with pytest.raises(DatasetError, match=r"classes \['monocyte'\] not found"):
        scan_labelled(root, ["monocyte"])


def test_class_folders_read_as_before(synthetic_dataset: Path, tmp_path: Path) -> None:
    assert scan_labelled(synthetic_dataset).samples == scan_image_folder(synthetic_dataset).samples
    # A CSV beside class folders (e.g. a provenance table) does not change the layout.
    copy = shutil.copytree(synthetic_dataset, tmp_path / "copy")
    (copy / "provenance.csv").write_text("file,class\nneutrophil_000.png,neutrophil\n")
    assert scan_labelled(copy).labels_file is None and len(scan_labelled(copy).samples) == 36


def test_byte_identical_images_share_a_group(tmp_path: Path) -> None:
    # Zheng's images 112 and 139 are one PNG file twice (same bytes): content hashing keeps them together.
    root = zheng_like(tmp_path / "d", [2, 1, 2])
    shutil.copyfile(root / "images" / "001.png", root / "images" / "003.png")
    samples = scan_labelled(root).samples
    groups = content_groups(samples)
    assert groups[0] == groups[2] != groups[1]


def test_source_names_and_overlap(tmp_path: Path) -> None:
    a, b = tmp_path / "data" / "pbc_dev", tmp_path / "data" / "wbc_seg_zheng" / "dataset1"
    assert source_names([a]) == ["pbc_dev"]
    assert source_names([a, b]) == ["pbc_dev", "wbc_seg_zheng/dataset1"]
    with pytest.raises(DatasetError, match="overlap"):
        source_names([a, a])
    with pytest.raises(DatasetError, match="overlap"):
        source_names([a, a / "neutrophil"])


def test_scan_sources_tags_samples_and_filters_classes_across_sources(tmp_path: Path) -> None:
    folders = make_dataset(tmp_path / "folders", per_class=3, classes=("neutrophil", "eosinophil"))
    table = zheng_like(tmp_path / "zheng", [1, 2, 2])
    sources = scan_sources([folders, table], ["neutrophil", "lymphocyte"])
    assert [s.name for s in sources] == ["folders", "zheng"]
    assert {(s.source, s.label) for source in sources for s in source.folder.samples} == {
        ("folders", "neutrophil"), ("zheng", "neutrophil"), ("zheng", "lymphocyte")}
    with pytest.raises(DatasetError, match=r"\['monocyte'\] are in none of the datasets"):
        scan_sources([folders, table], ["monocyte", "neutrophil"])
    with pytest.raises(DatasetError, match="has none of the classes"):
        scan_sources([folders, table], ["lymphocyte"])


def test_data_inspect_reads_the_labels_csv_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = zheng_like(tmp_path / "d", [1, 2, 4, 1])
    assert main(["data", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "4 images, 3 classes" in out and "labels: " in out and "neutrophil" in out
    (root / "images" / "004.png").unlink()
    assert main(["data", "inspect", str(root)]) == 2
    assert "not found" in capsys.readouterr().err


def test_zheng_dataset1_loads_with_the_readmes_counts(shared_data: Path) -> None:
    root = shared_data / "wbc_seg_zheng" / "dataset1"
    if not root.is_dir():
        pytest.skip("wbc_seg_zheng is not in ../shared/data")
    folder = scan_labelled(root)
    counts = {name: sum(s.label == name for s in folder.samples) for name in folder.class_names}
    assert counts == {"neutrophil": 176, "lymphocyte": 53, "monocyte": 48, "eosinophil": 22, "basophil": 1}
    by_name = {s.path.name: s for s in folder.samples}
    assert (root / "images" / "112.png").read_bytes() == (root / "images" / "139.png").read_bytes()
    pair = [by_name["112.png"], by_name["139.png"]]
    assert len(set(content_groups(pair))) == 1
