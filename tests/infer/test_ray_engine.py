"""``predict --engine ray``: the local engine's rows from Ray Data actors, Parquet shards, resume, no Ray.

One in-process Ray (2 CPUs, no dashboard) serves the module; the command finds it initialised and
uses it, so each test pays only for its actors' start-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.cli import main

# Ray Data's own DataContext warns about its deprecated settings when it is copied; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

pa_parquet = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow (pip install 'hematovision[ray]')")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'hematovision[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'hematovision[ray]')")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()



def read_rows(folder: Path) -> tuple[list[str], dict[str, dict]]:
    """A Parquet results folder as (columns, rows by file)."""
    table = pa_parquet.read_table(folder)
    rows = {row["file"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows, "a file has two rows"
    return table.column_names, rows


def assert_same_rows(expected: dict[str, dict], got: dict[str, dict]) -> None:
    assert got.keys() == expected.keys()
    for file, row in expected.items():
        other = got[file]
        for column, value in row.items():
            if isinstance(value, float):
                assert other[column] == pytest.approx(value, abs=1e-5), (file, column)
            else:
                assert other[column] == value, (file, column)


def test_ray_engine_gives_the_local_engines_rows(tiny_run: Path, images: Path, tmp_path: Path, ray_local: None,
                                                 one_thread: None, capsys: pytest.CaptureFixture) -> None:
    # A name that is not valid UTF-8 travels to the workers as bytes and is written with \xNN escapes.
    shutil.copy(images / "EOSINOPHIL" / "eosinophil_000.png", images / os.fsdecode(b"EOSINOPHIL/bad\xffname.png"))
    local, on_ray, as_csv = tmp_path / "local.parquet", tmp_path / "ray.parquet", tmp_path / "local.csv"
    assert main(["predict", str(tiny_run), str(images), "--out", str(local), "--batch-size", "8"]) == 0
    assert main(["predict", str(tiny_run), str(images), "--out", str(as_csv), "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tiny_run), str(images), "--out", str(on_ray), "--batch-size", "8",
                 "--engine", "ray", "--ray-workers", "2"]) == 0
    assert "37 image(s) classified, 1 unreadable" in capsys.readouterr().out
    assert sorted(p.name for p in on_ray.iterdir()) == ["part-00000.parquet"]
    columns, expected = read_rows(local)
    ray_columns, got = read_rows(on_ray)
    assert ray_columns == columns == as_csv.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert len(expected) == 38
    assert_same_rows(expected, got)
    assert got[str(images / "EOSINOPHIL" / "bad\\xffname.png")]["label"]
    empty = got[str(images / "LYMPHOCYTE" / "lymphocyte_005b.png")]
    assert empty["label"] is None and empty["confidence"] is None and "the file is empty" in empty["error"]
    classes = {c[2:] for c in columns if c.startswith("p_")}
    assert len(classes) == 3
    assert all(row["label"] in classes and len(row["sha256"]) == 64 for file, row in got.items() if file != empty["file"])
    assert {row["lab_shift_score"] for row in got.values()} == {expected[empty["file"]]["lab_shift_score"]} != {None}
    probabilities = np.array([[row[c] for c in columns if c.startswith("p_")] for row in got.values() if row["label"]])
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_ray_engine_resumes_parquet_shards(tiny_run: Path, images: Path, tmp_path: Path, ray_local: None,
                                           one_thread: None, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ray.parquet"
    command = ["predict", str(tiny_run), str(images), "--out", str(out), "--engine", "ray", "--ray-workers", "1"]
    assert main(command) == 0
    _, first = read_rows(out)
    changed = images / "NEUTROPHIL" / "neutrophil_003.png"
    Image.fromarray(np.full((40, 40, 3), 30, np.uint8)).save(changed)  # same name, other content
    shutil.copy(images / "EOSINOPHIL" / "eosinophil_000.png", images / "EOSINOPHIL" / "new.png")
    capsys.readouterr()
    assert main([*command, "--resume"]) == 0
    printed = capsys.readouterr().out
    # 38 files: 35 unchanged skipped; the changed one, the new one and the unreadable one are predicted.
    assert "resume: 35 of 38 file(s)" in printed and "2 image(s) classified, 1 unreadable" in printed
    assert len(list(out.iterdir())) == 2  # the first shard (without the redone rows) and the new one
    _, second = read_rows(out)
    assert len(second) == 38
    assert second[str(changed)]["sha256"] != first[str(changed)]["sha256"]
    unchanged = {file: row for file, row in first.items() if file != str(changed)}
    job_wide = ("lab_shift_score", "lab_shift_threshold")  # the new job's (its threshold depends on its size)
    for row in unchanged.values():  # compare the rest
        for column in job_wide:
            row.pop(column)
    assert_same_rows(unchanged, {file: {k: v for k, v in second[file].items() if k not in job_wide}
                                 for file in unchanged})


def test_missing_ray_is_one_line_with_the_install_hint(tiny_run: Path, images: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "r.parquet"
    assert main(["predict", str(tiny_run), str(images), "--out", str(out), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'hematovision[ray]'" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("setup, message", [("file", "is a file"), ("foreign", "holds other files")])
def test_parquet_output_refuses_a_file_or_a_foreign_folder(setup: str, message: str, tiny_run: Path, images: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.parquet"
    if setup == "file":
        out.write_bytes(b"PAR1")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    assert main(["predict", str(tiny_run), str(images), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert (out / "notes.txt").exists() if setup == "foreign" else out.read_bytes() == b"PAR1"


def test_ray_engine_module_stays_out_of_training_and_export() -> None:
    code = ("import sys, hematovision.infer.ray_engine; "
            "print(sorted(m for m in sys.modules if m.startswith(('hematovision.train', 'hematovision.export', 'ray'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # and Ray itself is imported only when the engine runs


def test_a_worker_that_cannot_load_the_run_is_one_line(tiny_run: Path, images: Path, ray_local: None,
                                                       one_thread: None) -> None:
    from hematovision.errors import HematoVisionError
    from hematovision.infer.predictor import Predictor
    from hematovision.infer.ray_engine import ray_predictions
    from hematovision.predict import collect_image_paths

    # What a cluster node without the shared folder sees: the driver loaded the run, the worker cannot.
    driver_copy = Predictor.from_run_dir(tiny_run)
    with pytest.raises(HematoVisionError, match=r"could not load the run: .*not a HematoVision run folder.*same paths"):
        list(ray_predictions(driver_copy, images, collect_image_paths([images]), ray_workers=1, progress=False))
