"""``hematovision train --data A --data B``: several datasets, each split on its own, merged."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from synthetic import make_dataset

from hematovision.cli import main
from hematovision.data.folder import Sample
from hematovision.data.splits import read_split_csv, write_split_csv
from hematovision.run import read_split
from hematovision.train.pipeline import TrainConfig, resolve_splits

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_sources import zheng_like  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_golden import golden_dataset  # noqa: E402

# split.csv of the golden dataset written by the code before multi-source training (commit 29f5aed), seeds 0 and 1.
BEFORE = Path(__file__).parents[1] / "fixtures" / "split_single_source_before.csv"
TINY = ["--mode", "finetune", "--backbone", "tiny_cnn", "--no-pretrained", "--image-size", "32", "--epochs", "1",
        "--batch-size", "8", "--seed", "1"]


@pytest.fixture()
def two_sources(tmp_path: Path) -> list[Path]:
    """Class folders (neutrophil, lymphocyte, eosinophil) and a Zheng-like table (neutrophil, lymphocyte only)."""
    folders = make_dataset(tmp_path / "lab_a", per_class=8, size=40)
    table = zheng_like(tmp_path / "lab_b", [1, 2] * 6, seed=5)
    return [folders, table]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_each_source_is_split_on_its_own_and_no_group_crosses_splits(two_sources: list[Path],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # A byte-identical copy across sources: it may not share a group with its twin (each source splits alone).
    shutil.copyfile(two_sources[0] / "LYMPHOCYTE" / "lymphocyte_000.png", two_sources[1] / "images" / "013.png")
    with open(two_sources[1] / "class_labels.csv", "a") as handle:
        handle.write("13,2\n")
    with caplog.at_level(logging.INFO):
        samples, splits, groups, _ = resolve_splits(TrainConfig(out=Path("unused"), data=two_sources, seed=3))
    assert {s.source for s in samples} == {"lab_a", "lab_b"}
    part_of: dict[str, str] = {}
    for group, split in zip(groups, splits):
        assert part_of.setdefault(group, split) == split, f"group {group} crosses splits"
    for sample, group in zip(samples, groups):
        assert group.startswith(f"{sample.source}:sha256:")
    for source in ("lab_a", "lab_b"):
        present = Counter(split for s, split in zip(samples, splits) if s.source == source)
        assert set(present) == {"train", "val", "test"}, (source, present)
        # Stratified within the source: every class of the source is in every part.
        for label in {s.label for s in samples if s.source == source}:
            assert {split for s, split in zip(samples, splits) if s.source == source and s.label == label} == {
                "train", "val", "test"}
    # On its own means: a source's part of the merged split is the split it gets alone (same seed).
    for root in two_sources:
        alone, alone_splits, _, _ = resolve_splits(TrainConfig(out=Path("unused"), data=root, seed=3))
        merged = {s.path: split for s, split in zip(samples, splits) if s.source == root.name}
        assert merged == {s.path: split for s, split in zip(alone, alone_splits)}
    assert "class eosinophil is only in lab_a" in caplog.text
    assert "1 file(s) are byte-identical to a file of another source" in caplog.text


def test_a_source_with_split_folders_keeps_them(two_sources: list[Path], tmp_path: Path) -> None:
    given = tmp_path / "lab_c"
    for split, seed in (("TRAIN", 0), ("TEST", 1)):
        make_dataset(given / split, per_class=7, size=40, seed=seed, classes=("neutrophil", "lymphocyte"))
    samples, splits, _, _ = resolve_splits(TrainConfig(out=Path("unused"), data=[*two_sources, given]))
    for sample, split in zip(samples, splits):
        if sample.source == "lab_c":
            # TEST stays test; TRAIN gives train and the carved validation part.
            assert (split == "test") == (sample.split == "test")
    assert {split for s, split in zip(samples, splits) if s.source == "lab_c"} == {"train", "val", "test"}


def test_train_with_two_data_folders(two_sources: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                     one_thread: None) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(two_sources[0]), "--data", str(two_sources[1]), "--out", str(out), *TINY]
    assert main(args) == 0
    rows = _rows(out / "split.csv")
    assert list(rows[0]) == ["file", "label", "split", "group", "source"]
    assert {(row["source"], row["split"]) for row in rows} == {(s, p) for s in ("lab_a", "lab_b")
                                                               for p in ("train", "val", "test")}
    card = json.loads((out / "model_card.json").read_text())
    sources = card["data"]["sources"]
    assert [(entry["name"], entry["path"]) for entry in sources] == [("lab_a", str(two_sources[0])),
                                                                     ("lab_b", str(two_sources[1]))]
    for entry in sources:
        for part, by_class in entry["counts"].items():
            assert by_class == dict(Counter(r["label"] for r in rows if r["source"] == entry["name"] and r["split"] == part))
    assert sum(entry["n_images"]["train"] for entry in sources) == card["data"]["n_images"]["train"]
    assert card["data"]["classes_in_some_sources"] == {"eosinophil": ["lab_a"]}
    assert card["data"]["source"] == f"{two_sources[0]} + {two_sources[1]}"
    assert set(card["metrics"]["per_source"]) == {"lab_a", "lab_b"}
    assert json.loads((out / "train_config.json").read_text())["data"] == [str(p) for p in two_sources]
    assert "| lab_b |" in (out / "report.md").read_text()
    capsys.readouterr()

    # evaluate: the run's own test split, per source; and the Zheng-like folder as an external test set.
    assert main(["evaluate", str(out), "--split", "test", "--out", str(tmp_path / "eval_test")]) == 0
    printed = capsys.readouterr().out
    assert "  lab_a: " in printed and "  lab_b: " in printed
    metrics = json.loads((tmp_path / "eval_test" / "metrics.json").read_text())
    assert sum(row["n_images"] for row in metrics["per_source"].values()) == metrics["n_images"]
    assert main(["evaluate", str(out), "--data", str(two_sources[1]), "--out", str(tmp_path / "eval_b")]) == 0
    assert json.loads((tmp_path / "eval_b" / "metrics.json").read_text())["n_images"] == 12


def test_one_data_folder_gives_the_same_split_csv_as_before(tmp_path: Path, one_thread: None) -> None:
    data = golden_dataset(tmp_path / "data")
    before = _rows(BEFORE)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 0  # seed 1
    rows = _rows(out / "split.csv")
    expected = [row for row in before if row["seed"] == "1"]
    assert [(Path(r["file"]).relative_to(data).as_posix(), r["label"], r["split"]) for r in rows] == [
        (r["file"], r["label"], r["split"]) for r in expected]
    for row in rows:
        assert row["group"] == "sha256:" + hashlib.sha256(Path(row["file"]).read_bytes()).hexdigest()
        assert row["source"] == "data"
    assert json.loads((out / "train_config.json").read_text())["data"] == str(data)
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["source"] == str(data) and "classes_in_some_sources" not in card["data"]
    assert "per_source" not in card["metrics"]
    samples, splits, _, _ = resolve_splits(TrainConfig(out=out, data=data, seed=0))
    assert [(s.path.relative_to(data).as_posix(), s.label, split) for s, split in zip(samples, splits)] == [
        (r["file"], r["label"], r["split"]) for r in before if r["seed"] == "0"]


def test_split_files_without_a_source_column_still_read(tmp_path: Path) -> None:
    old = tmp_path / "old" / "split.csv"
    old.parent.mkdir()
    old.write_text("file,label,split,group\n/d/a.png,neutrophil,train,sha256:1\n/d/b.png,eosinophil,test,sha256:2\n")
    assert [(s.path.name, s.source, part) for s, part in read_split_csv(old)] == [("a.png", None, "train"),
                                                                                  ("b.png", None, "test")]
    assert read_split(old.parent)["test"] == [Sample(Path("/d/b.png"), "eosinophil", "test")]
    new = tmp_path / "new" / "split.csv"
    new.parent.mkdir()
    write_split_csv(new, [Sample(Path("/d/a.png"), "neutrophil", source="lab_a")], ["train"], ["g"])
    assert read_split(new.parent)["train"][0].source == "lab_a"
