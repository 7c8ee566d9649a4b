"""``hematovision predict`` streaming: the same file as the load-all path, ``--resume``, Ctrl-C.

The reference is the load-all path kept in :mod:`hematovision.predict` (``predict_files`` and
``write_predictions``): every file decoded and predicted, then the file written once. The command
streams (decoding threads beside the model, rows appended per chunk) and must write the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hematovision.cli import main
from hematovision.infer.predictor import Predictor
from hematovision.predict import collect_image_paths, predict_files, stream_to_file, write_predictions


@pytest.fixture(scope="module")
def run64(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny64"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune", "--backbone",
                     "tiny_cnn", "--no-pretrained", "--image-size", "64", "--epochs", "1", "--batch-size", "8",
                     "--seed", "1"]) == 0
    finally:
        torch.set_num_threads(previous)
    return out



def load_all_reference(run: Path, images: Path, out: Path) -> str:
    predictor = Predictor.from_run_dir(run)
    rows = predict_files(predictor, collect_image_paths([images]), batch_size=8)
    write_predictions(rows, predictor.class_names, out, lab_shift=predictor.lab_shift())
    return out.read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_streaming_writes_the_same_file_as_the_load_all_path(fmt: str, run64: Path, images: Path, tmp_path: Path,
                                                             one_thread: None, capsys: pytest.CaptureFixture) -> None:
    expected = load_all_reference(run64, images, tmp_path / f"reference.{fmt}")
    out = tmp_path / f"p.{fmt}"
    assert main(["predict", str(run64), str(images), "--out", str(out), "--batch-size", "8"]) == 0
    assert "36 image(s) classified, 1 unreadable" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == expected
    # Chunks of 3 rows, two decoding threads: many appends, the same bytes.
    again = tmp_path / f"q.{fmt}"
    stream_to_file(Predictor.from_run_dir(run64), collect_image_paths([images]), again, batch_size=8, chunk=3, workers=2)
    assert again.read_text(encoding="utf-8") == expected
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(expected)))
        assert len(rows) == 37 and rows[0]["sha256"] and rows[0]["lab_shift_score"]


def test_resume_skips_finished_files_and_redoes_a_changed_one(run64: Path, images: Path, tmp_path: Path,
                                                              one_thread: None, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", str(run64), str(images), "--out", str(out)]) == 0
    capsys.readouterr()
    changed = images / "NEUTROPHIL" / "neutrophil_003.png"
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(changed)  # same name, other content
    shutil.copy(images / "EOSINOPHIL" / "eosinophil_000.png", images / "EOSINOPHIL" / "new.png")
    assert main(["predict", str(run64), str(images), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    # 38 files: 35 unchanged and done; the changed one, the new one and the unreadable one are predicted
    assert f"resume: 35 of 38 file(s) already in {out} (same content), skipped; predicting 3" in printed
    assert "2 image(s) classified, 1 unreadable" in printed
    fresh = tmp_path / "fresh.csv"
    assert main(["predict", str(run64), str(images), "--out", str(fresh)]) == 0
    resumed = {row["file"]: row for row in csv.DictReader(out.open())}
    assert len(resumed) == 38 and resumed == {row["file"]: row for row in csv.DictReader(fresh.open())}
    assert resumed[str(changed)]["sha256"] != ""


def test_ctrl_c_leaves_a_valid_partial_csv_that_resume_completes(run64: Path, images: Path, tmp_path: Path,
                                                                 one_thread: None, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    expected = load_all_reference(run64, images, tmp_path / "reference.csv")
    original = Predictor.predict_reviewed
    calls = []

    def interrupted(self: Predictor, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises while the model runs the third batch
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Predictor, "predict_reviewed", interrupted)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run64), str(images), "--out", str(out), "--batch-size", "8"]) == 130
    assert "--resume" in capsys.readouterr().err
    partial = list(csv.DictReader(out.open()))
    assert len(partial) == 16  # the two batches of 8 finished before the interrupt
    assert all(row["label"] and None not in row.values() for row in partial if not row["error"])
    assert expected.startswith(out.read_text().split("\n", 1)[0])  # the header
    monkeypatch.setattr(Predictor, "predict_reviewed", original)
    assert main(["predict", str(run64), str(images), "--out", str(out), "--batch-size", "8", "--resume"]) == 0
    assert "resume: 16 of 37 file(s)" in capsys.readouterr().out
    assert out.read_text() == expected  # the same rows in the same order, job-wide score filled in


def test_resume_refuses_a_file_with_other_columns(run64: Path, images: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.csv"
    out.write_text("file,label\na.png,x\n")
    assert main(["predict", str(run64), str(images), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "other columns" in err[0]
    assert out.read_text() == "file,label\na.png,x\n"  # left alone


def test_parquet_without_pyarrow_is_refused_in_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(["predict", str(tmp_path / "no_run"), str(tmp_path), "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Parquet" in err[0] and "pip install" in err[0] and not (tmp_path / "p.parquet").exists()


def test_json_resume(run64: Path, images: Path, tmp_path: Path, one_thread: None,
                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.json"
    assert main(["predict", str(run64), str(images / "EOSINOPHIL"), "--out", str(out)]) == 0
    assert main(["predict", str(run64), str(images), "--out", str(out), "--resume"]) == 0
    assert "resume: 12 of 37 file(s)" in capsys.readouterr().out
    records = json.loads(out.read_text())
    expected = json.loads(load_all_reference(run64, images, tmp_path / "reference.json"))
    assert sorted(records, key=lambda r: r["file"]) == sorted(expected, key=lambda r: r["file"])
