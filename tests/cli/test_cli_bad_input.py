"""Bad input files on the command line: listed and skipped with their reason, never a traceback.

Issue 13's cases, each through ``predict`` (CSV and JSON), ``evaluate``, ``data inspect`` and
``count``: a PNG with a 2 MB zTXt chunk (Pillow refuses its metadata; the server answers the same
file with 400), a file name that is not valid UTF-8, a FIFO, a dangling symbolic link, an empty
file, a folder named like an image and a file without read permission. Each time the output file
is still written for the readable files, the bad entry is listed with its reason, and the exit
code is 0 (2 when nothing at all was readable). ``--out p.xlsx`` is refused before any work.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hematovision.cli import main
from hematovision.data.images import load_rgb

BAD_NAME = b"bad\xff\xfename.png"  # not valid UTF-8: shown as bad\xff\xfename.png
SHOWN_BAD_NAME = "bad\\xff\\xfename.png"
ZTXT_REASON = "a PNG text chunk (metadata) decompresses to more than Pillow's 1 MB safety limit"




def fake_predictor() -> SimpleNamespace:
    """A loaded run as ``Predictor.from_run_dir`` gives it, from an untrained tiny_cnn (for the app)."""
    from hematovision.data.classes import WBC5
    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model

    torch.manual_seed(0)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn"})


def png_with_big_ztxt(good: bytes) -> bytes:
    """A valid PNG with a zTXt chunk that inflates to 2 MB, inserted after IHDR."""
    body = b"Comment\x00\x00" + zlib.compress(b"k" * (2 * 1024 * 1024))
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    return good[:33] + chunk + good[33:]


def _write_bytes_name(folder: Path, name: bytes, data: bytes) -> None:
    with open(os.fsencode(folder) + b"/" + name, "wb") as handle:
        handle.write(data)


# name → (adds the bad entry to a folder holding good PNGs; text the entry is listed under; its reason)
# The non-UTF-8 file is a good image: it is classified, under an escaped name.
CASES: dict[str, tuple[Callable[[Path, bytes], None], str, str | None]] = {
    "ztxt": (lambda folder, good: (folder / "ztxt.png").write_bytes(png_with_big_ztxt(good)), "ztxt.png", ZTXT_REASON),
    "non_utf8_name": (lambda folder, good: _write_bytes_name(folder, BAD_NAME, good), SHOWN_BAD_NAME, None),
    "fifo": (lambda folder, good: os.mkfifo(folder / "fifo.png"), "fifo.png", "not a regular file: a FIFO (named pipe)"),
    "dangling_symlink": (lambda folder, good: (folder / "link.png").symlink_to("gone.png"), "link.png",
                         "a symbolic link to a missing file (gone.png)"),
    "empty": (lambda folder, good: (folder / "empty.png").write_bytes(b""), "empty.png", "the file is empty"),
    # A folder named like an image is a folder: searched for images, never an unreadable "file".
    "folder_named_png": (lambda folder, good: (folder / "dir.png").mkdir(), "dir.png", None),
}


def good_png(folder: Path) -> bytes:
    return next(folder.glob("*.png")).read_bytes()


@pytest.fixture()
def dataset_copy(synthetic_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    return root


def assert_clean(code: int, out: str, err: str, expected_code: int = 0) -> None:
    assert "Traceback" not in out + err
    assert code == expected_code, out + err


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_predict_lists_the_bad_entry_and_writes_the_rest(case: str, fmt: str, tiny_run: Path, dataset_copy: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = dataset_copy / "NEUTROPHIL"
    add, listed, reason = CASES[case]
    add(folder, good_png(folder))
    out = tmp_path / f"p.{fmt}"
    code = main(["predict", str(tiny_run), str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert_clean(code, captured.out, captured.err)
    text = out.read_text(encoding="utf-8")  # valid UTF-8, whatever the file names
    rows = json.loads(text) if fmt == "json" else list(csv.DictReader(io.StringIO(text)))
    by_file = {row["file"]: row for row in rows}
    assert all(by_file[str(path)]["label"] for path in folder.glob("neutrophil_*.png"))  # the readable files are there
    if reason is not None:
        assert len(rows) == 13 and by_file[str(folder / listed)]["error"].startswith(f"{folder / listed}: {reason}")
        assert f"unreadable: {folder / listed}: {reason}" in captured.out  # and said on the console
        assert "12 image(s) classified, 1 unreadable" in captured.out
    elif case == "non_utf8_name":
        assert len(rows) == 13 and by_file[f"{folder}/{listed}"]["label"]
        assert "13 image(s) classified, 0 unreadable" in captured.out and "1 file name(s) are not valid UTF-8" in captured.out
    else:
        assert len(rows) == 12 and "12 image(s) classified, 0 unreadable" in captured.out


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not None])
def test_evaluate_lists_the_bad_entry_and_scores_the_rest(case: str, tiny_run: Path, dataset_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    folder = dataset_copy / "NEUTROPHIL"
    add, listed, reason = CASES[case]
    add(folder, good_png(folder))
    code = main(["evaluate", str(tiny_run), "--data", str(dataset_copy), "--out", str(tmp_path / "ev")])
    captured = capsys.readouterr()
    assert_clean(code, captured.out, captured.err)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 36
    assert metrics["unreadable_files"] == [[str(folder / listed), f"{folder / listed}: {reason}"]]
    assert f"unreadable: {folder / listed}: {reason}" in captured.out


def test_evaluate_and_inspect_with_a_non_utf8_name(tiny_run: Path, dataset_copy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    folder = dataset_copy / "NEUTROPHIL"
    _write_bytes_name(folder, BAD_NAME, b"")  # empty, so it is listed (with its escaped name) everywhere
    assert main(["evaluate", str(tiny_run), "--data", str(dataset_copy), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["unreadable_files"] == [[f"{folder}/{SHOWN_BAD_NAME}", f"{folder}/{SHOWN_BAD_NAME}: the file is empty"]]
    assert main(["data", "inspect", str(dataset_copy), "--json", str(tmp_path / "i.json")]) == 0
    report = json.loads((tmp_path / "i.json").read_text(encoding="utf-8"))
    shown = f"{folder}/{SHOWN_BAD_NAME}"
    assert report["unreadable"] == [{"file": shown, "reason": f"{shown}: the file is empty"}]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2] is not None])
def test_data_inspect_lists_the_bad_entry(case: str, dataset_copy: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    folder = dataset_copy / "NEUTROPHIL"
    add, listed, reason = CASES[case]
    add(folder, good_png(folder))
    code = main(["data", "inspect", str(dataset_copy), "--json", str(tmp_path / "i.json")])
    captured = capsys.readouterr()
    assert_clean(code, captured.out, captured.err)
    report = json.loads((tmp_path / "i.json").read_text())
    assert report["n_images"] == 37 and sum(report["image_sizes"].values()) == 36
    assert report["unreadable"] == [{"file": str(folder / listed), "reason": f"{folder / listed}: {reason}"}]
    assert "unreadable files: 1" in captured.out and f"{folder / listed}: {reason}" in captured.out


@pytest.mark.parametrize("case", CASES)
def test_count_lists_the_bad_entry(case: str, synthetic_dataset: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "fields"
    folder.mkdir()
    for path in sorted((synthetic_dataset / "NEUTROPHIL").glob("*.png"))[:2]:
        shutil.copy(path, folder)
    add, listed, reason = CASES[case]
    add(folder, good_png(folder))
    code = main(["count", str(folder), "--out", str(tmp_path / "count")])
    captured = capsys.readouterr()
    assert_clean(code, captured.out, captured.err)
    counts = (tmp_path / "count" / "counts.csv").read_text(encoding="utf-8")
    assert "neutrophil_000.png" in counts and "neutrophil_001.png" in counts
    if reason is not None:
        assert f"unreadable: {folder / listed}: {reason}" in counts
        assert f"skipped: {folder / listed}: {reason}" in captured.out
    if case == "non_utf8_name":
        assert SHOWN_BAD_NAME in counts and SHOWN_BAD_NAME in captured.out


@pytest.mark.parametrize("command", [["predict", "RUN", "IMAGES", "--out", "OUT.csv"], ["data", "inspect", "DATA"]])
def test_non_utf8_names_through_the_real_console(command: list[str], tiny_run: Path, dataset_copy: Path,
                                                  tmp_path: Path) -> None:
    # A real process: its stdout is a strict UTF-8 stream, where a surrogate-escaped name would crash print().
    folder = dataset_copy / "NEUTROPHIL"
    _write_bytes_name(folder, BAD_NAME, b"")
    args = [{"RUN": str(tiny_run), "IMAGES": str(folder), "DATA": str(dataset_copy),
             "OUT.csv": str(tmp_path / "p.csv")}.get(a, a) for a in command]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "hematovision", *args], capture_output=True, env=env, timeout=300)
    out, err = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    assert result.returncode == 0, err
    assert "Traceback" not in err and f"{SHOWN_BAD_NAME}: the file is empty" in out


def test_the_server_answers_the_same_ztxt_png_with_400(synthetic_dataset: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from hematovision.serve.app import create_app
    from hematovision.serve.settings import Settings

    data = png_with_big_ztxt(good_png(synthetic_dataset / "NEUTROPHIL"))
    app = create_app(Settings(db=tmp_path / "hv.db", auth=False), predictor=fake_predictor())
    with TestClient(app, base_url="http://localhost") as client:
        answer = client.post("/api/v1/predict", files=[("files", ("ztxt.png", data, "image/png"))])
    assert answer.status_code == 400 and answer.json()["detail"] == f"ztxt.png: {ZTXT_REASON}"


def test_unsupported_out_extension_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The run folder does not even exist: the --out check comes first, so no model is loaded for nothing.
    code = main(["predict", str(tmp_path / "no_run"), str(tmp_path), "--out", str(tmp_path / "p.xlsx")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"hematovision: error: --out {tmp_path / 'p.xlsx'}: unsupported output format "
                                        "'.xlsx'; use one of .csv, .json, .parquet"]
    assert not (tmp_path / "p.xlsx").exists()


def test_nothing_readable_writes_the_file_and_exits_2(tiny_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "p.csv"
    code = main(["predict", str(tiny_run), str(tmp_path / "missing.png"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.out + captured.err
    assert "0 image(s) classified, 1 unreadable" in captured.out
    assert "missing.png: cannot open (No such file or directory)" in out.read_text()


def test_an_empty_folder_is_one_line(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["predict", str(tiny_run), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"hematovision: error: no image files found in {tmp_path / 'empty'}"]


# ---- a file without read permission: root reads every file, so as root the command runs as 'nobody' ----

@pytest.fixture()
def shared_tmp() -> Iterator[Path]:
    """A folder the unprivileged user can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="hv-perm-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_as_nobody(function: Callable[[], int], folder: Path, timeout: float = 120.0) -> tuple[int, str]:
    """``function()`` in a forked child with the effective user 'nobody' (as root), else in-process.

    Returns the exit code and everything the child printed.
    """
    if os.geteuid() != 0:
        return function(), ""
    log = folder / "child.log"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            with open(log, "w") as handle:
                os.dup2(handle.fileno(), 1)
                os.dup2(handle.fileno(), 2)
                sys.stdout = sys.stderr = handle  # pytest's capture objects write elsewhere
                os.setegid(65534)
                os.seteuid(65534)
                code = function()
                handle.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), log.read_text(errors="replace")
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the unprivileged child did not finish")
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["predict", "inspect"])
def test_a_file_without_read_permission_is_listed(command: str, tiny_run: Path, synthetic_dataset: Path,
                                                  shared_tmp: Path, one_thread: None) -> None:
    run = shared_tmp / "run"
    shutil.copytree(tiny_run, run)
    data = shared_tmp / "data"
    shutil.copytree(synthetic_dataset, data)
    secret = data / "NEUTROPHIL" / "secret.png"
    shutil.copy(data / "NEUTROPHIL" / "neutrophil_000.png", secret)
    for path in [run, data, *run.rglob("*"), *data.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    secret.chmod(0)
    load_rgb(data / "NEUTROPHIL" / "neutrophil_001.png")  # imports done before the child drops privileges
    out = shared_tmp / ("p.csv" if command == "predict" else "i.json")
    if command == "predict":
        main(["predict", str(run), str(data / "NEUTROPHIL"), "--out", str(shared_tmp / "warm.csv")])
        argv = ["predict", str(run), str(data / "NEUTROPHIL"), "--out", str(out)]
    else:
        main(["data", "inspect", str(data)])
        argv = ["data", "inspect", str(data), "--json", str(out)]
    code, printed = run_as_nobody(lambda: main(argv), shared_tmp)
    assert code == 0 and "Traceback" not in printed
    text = out.read_text()
    assert f"{secret}: cannot open (Permission denied)" in text
    assert "neutrophil_011.png" in text or command == "inspect"
