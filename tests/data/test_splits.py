from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from hematovision.data.folder import Sample, scan_image_folder
from hematovision.data.splits import (
    content_groups,
    kfold_assignment,
    read_group_csv,
    read_split_csv,
    train_val_test_split,
    write_split_csv,
)
from hematovision.errors import DatasetError


def test_split_is_stratified_and_seeded() -> None:
    labels = ["a"] * 100 + ["b"] * 40
    groups = [str(i) for i in range(140)]
    first = train_val_test_split(labels, groups, seed=3)
    assert first == train_val_test_split(labels, groups, seed=3)
    assert first != train_val_test_split(labels, groups, seed=4)
    counts = Counter(zip(labels, first))
    assert counts[("a", "train")] == 70 and counts[("a", "val")] == 15 and counts[("a", "test")] == 15
    assert counts[("b", "train")] == 28 and counts[("b", "val")] == 6 and counts[("b", "test")] == 6


def test_groups_never_straddle_parts() -> None:
    labels = ["a"] * 60 + ["b"] * 60
    groups = [f"g{i // 4}" for i in range(120)]  # groups of four images
    parts = train_val_test_split(labels, groups, seed=0)
    for group in set(groups):
        assert len({part for part, g in zip(parts, groups) if g == group}) == 1
    folds = kfold_assignment(labels, groups, k=5, seed=0)
    for group in set(groups):
        assert len({fold for fold, g in zip(folds, groups) if g == group}) == 1
    assert sorted(Counter(folds)) == [0, 1, 2, 3, 4]


def test_small_class_still_reaches_every_part() -> None:
    labels = ["a"] * 50 + ["rare"] * 3
    parts = train_val_test_split(labels, [str(i) for i in range(53)], seed=0)
    assert sorted(p for p, label in zip(parts, labels) if label == "rare") == ["test", "train", "val"]


def test_identical_files_share_a_group(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / "x").mkdir(exist_ok=True)
        Image.new("RGB", (10, 10), (5, 5, 5)).save(tmp_path / "x" / name)
    Image.new("RGB", (10, 10), (9, 9, 9)).save(tmp_path / "x" / "c.png")
    samples = scan_image_folder(tmp_path).samples
    groups = content_groups(samples)
    assert groups[0] == groups[1] != groups[2]
    mapped = content_groups(samples, {"x/c.png": "frame7", "a.png": "frame7"})
    assert mapped[0] == mapped[2] == "group:frame7"


def test_group_csv_and_split_csv_round_trip(tmp_path: Path) -> None:
    csv_path = tmp_path / "prov.csv"
    csv_path.write_text("split,class,file,source_original,confident\nTRAIN,EOS,_0_1.jpeg,BloodImage_00001.jpg,1\n"
                        "TEST,MON,_0_1.jpeg,BloodImage_00002.jpg,1\n")
    mapping = read_group_csv(csv_path)
    assert mapping == {"train/eos/_0_1.jpeg": "BloodImage_00001.jpg", "test/mon/_0_1.jpeg": "BloodImage_00002.jpg"}
    same_name = [Sample(Path("/d/TRAIN/EOS/_0_1.jpeg"), "eos"), Sample(Path("/d/TEST/MON/_0_1.jpeg"), "mon")]
    assert content_groups(same_name, mapping, digests=["x", "y"]) == ["group:BloodImage_00001.jpg", "group:BloodImage_00002.jpg"]
    samples = [Sample(Path("/d/a.png"), "a"), Sample(Path("/d/b.png"), "b")]
    write_split_csv(tmp_path / "split.csv", samples, ["train", "test"], ["g1", "g2"])
    rows = read_split_csv(tmp_path / "split.csv")
    assert [(s.path.name, s.label, part) for s, part in rows] == [("a.png", "a", "train"), ("b.png", "b", "test")]


def test_kfold_needs_enough_images_per_class() -> None:
    with pytest.raises(DatasetError, match="at least 5 images per class"):
        kfold_assignment(["a"] * 10 + ["b"] * 3, [str(i) for i in range(13)], k=5)
