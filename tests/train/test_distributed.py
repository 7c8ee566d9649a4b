"""Distributed fine-tuning (``torchrun --nproc_per_node 2``, gloo) against one process, at tiny size.

Two ranks with a global batch of 8 must train what one process with batch 8 trains: the same
weights after every step (within float rounding: the gradient sums run in another order), the
same per-epoch history and the same test metrics. The data make every part of that matter:
class-weighted loss on imbalanced classes (the weighted mean must be the global batch's, not
an average of two slices' means) and an epoch whose last batch has one image (one rank's slice
is empty). Augmentation is off (``--no-augment``): each rank augments from its own stream, so
augmented runs are not comparable image by image. The model has no batch norm (see
``ddp_worker.py``): under gloo each rank normalises over its own slice.

A frozen run's feature extraction is shared the same way: each rank passes its slice of the
images through the backbone, and the head rank 0 fits on the gathered features is the one-process head.

Also checked: only rank 0 writes (the run folder has the one-process files and nothing else
appears), and a Ctrl-C reaching one rank stops both with one line, after which ``--resume``
finishes the run with the uninterrupted result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import ddp_tiny_cnn  # noqa: F401  (registers the model in this process)
from safetensors.torch import load_file
from synthetic import make_dataset

from hematovision.cli import main
from hematovision.train.checkpoint import load_state

WORKER = Path(__file__).with_name("ddp_worker.py")
# lr 0.05 moves the weights far enough in 3 epochs that a wrong gradient scale shows.
ARGS = ["--mode", "finetune", "--backbone", "ddp_tiny_cnn", "--no-pretrained", "--image-size", "32",
        "--epochs", "3", "--patience", "10", "--batch-size", "8", "--lr", "0.05", "--seed", "0", "--no-augment"]
# Observed differences are ~1e-7 (float32 sums in another order); a wrong gradient scale moves weights by ~1e-2.
ATOL = 1e-5


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *ARGS, *extra]


def _torchrun(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for seed, (label, count) in enumerate((("neutrophil", 16), ("lymphocyte", 8), ("eosinophil", 12))):
        make_dataset(root, per_class=count, size=40, seed=seed, classes=(label,))
    return root


@pytest.fixture(scope="module")
def one_process(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_train_args(data, out)) == 0
    finally:
        torch.set_num_threads(previous)
    return out


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _assert_same_run(run: Path, reference: Path) -> None:
    for name in ("model.safetensors", "last.safetensors"):
        got, expected = load_file(str(run / name)), load_file(str(reference / name))
        assert sorted(got) == sorted(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=ATOL, msg=f"{name}: {key}")
    history, expected_history = load_state(run / "train_state.pt")["history"], load_state(reference / "train_state.pt")["history"]
    assert len(history) == len(expected_history) == 3
    for row, expected_row in zip(history, expected_history):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"):
            assert row[key] == pytest.approx(expected_row[key], abs=ATOL), (row["epoch"], key)
    metrics = json.loads((run / "metrics.json").read_text())
    expected_metrics = json.loads((reference / "metrics.json").read_text())
    for key in ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"):
        assert metrics[key] == expected_metrics[key], key
    assert metrics["log_loss"] == pytest.approx(expected_metrics["log_loss"], abs=1e-4)


def test_two_gloo_processes_train_what_one_process_trains(data: Path, one_process: Path, tmp_path: Path) -> None:
    split = json.loads((one_process / "model_card.json").read_text())["data"]["n_images"]
    assert split["train"] % 8 == 1, f"the last batch should hold one image (an empty slice on rank 1): {split}"

    result = _torchrun(tmp_path, _train_args(data, Path("run")))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(tmp_path / "run", one_process)
    # Rank 0 wrote the run folder (nothing more), rank 1 nothing at all.
    assert _files(tmp_path) == {"run"} | {f"run/{name}" for name in _files(one_process)}
    assert "rank 1 wrote" not in result.stderr, [line for line in result.stderr.splitlines() if "wrote" in line]
    assert result.stdout.count("test split:") == 1, result.stdout
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["finetune"]["processes"] == 2 and card["finetune"]["batch_size"] == 8


@pytest.mark.slow  # three torchrun launches: ~33 s on the shared 2 cores
def test_ctrl_c_on_one_rank_stops_both_and_resume_finishes_the_run(data: Path, one_process: Path,
                                                                   tmp_path: Path) -> None:
    steps_per_epoch = -(-json.loads((one_process / "model_card.json").read_text())["data"]["n_images"]["train"] // 8)
    # Rank 1 alone gets SIGINT after the 2nd step of epoch 2: the checkpoint of epoch 1 is what survives.
    interrupted = _torchrun(tmp_path, _train_args(data, Path("run")),
                            HEMATOVISION_TEST_SIGINT=f"1:{steps_per_epoch + 2}")
    assert interrupted.returncode != 0
    stderr = interrupted.stderr
    assert stderr.count("interrupted; finished work was saved (use --resume to continue training)") == 1, stderr[-3000:]
    assert "Traceback" not in stderr.split("interrupted; finished work was saved")[0], stderr[-3000:]
    assert load_state(tmp_path / "run" / "train_state.pt")["epoch"] == 0
    assert not (tmp_path / "run" / "model_card.json").exists()

    resumed = _torchrun(tmp_path, _train_args(data, Path("run"), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "run", one_process)


FROZEN = ["--mode", "frozen", "--image-size", "64", "--seed", "0"]


def test_two_gloo_processes_share_a_frozen_runs_feature_extraction(data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home_single"))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "single"), *FROZEN]) == 0
    finally:
        torch.set_num_threads(previous)

    work = tmp_path / "work"
    work.mkdir()
    result = _torchrun(work, ["train", "--data", str(data), "--out", "run", *FROZEN],
                       HEMATOVISION_HOME=str(tmp_path / "home_two"), HEMATOVISION_TEST_COUNT_FEATURES="1")
    assert result.returncode == 0, result.stderr[-3000:]
    # Both ranks computed features, about half each (the store started empty).
    counts = {rank: 0 for rank in (0, 1)}
    for rank, count in re.findall(r"rank (\d) extracted (\d+)", result.stderr):  # progress bars share the lines
        counts[int(rank)] += int(count)
    stored = [json.loads(index.read_text()) for index in (tmp_path / "home_single").rglob("index.json")]
    distinct = len(stored[0])  # the store keys images by content, so a repeated image is computed once
    assert sum(counts.values()) == distinct and abs(counts[0] - counts[1]) <= 3, (counts, distinct)

    run, reference = work / "run", tmp_path / "single"
    got, expected = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:  # the backbone is the same file; the head was fitted on the same features
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=key)
    metrics, expected_metrics = (json.loads((folder / "metrics.json").read_text()) for folder in (run, reference))
    for key in ("n_images", "accuracy", "balanced_accuracy", "confusion_matrix"):
        assert metrics[key] == expected_metrics[key], key
    assert json.loads((run / "model_card.json").read_text())["data"]["feature_processes"] == 2
    assert "rank 1 wrote" not in result.stderr
