from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_dataset  # noqa: E402


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """One torch thread for the test: the 2 shared cores stall when tiny ops are oversubscribed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def images(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """The 36 synthetic cells plus one empty file (an unreadable row) in the middle of the order."""
    import shutil

    root = tmp_path / "images"
    shutil.copytree(synthetic_dataset, root)
    (root / "LYMPHOCYTE" / "lymphocyte_005b.png").write_bytes(b"")
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of synthetic disc "cells", 12 images each, 40 px."""
    return make_dataset(tmp_path_factory.mktemp("synthetic"), per_class=12, size=40)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` if present; tests that need it skip otherwise."""
    from hematovision.paths import shared_data_dir

    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data is not present on this machine")
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder from `hematovision train` (tiny_cnn fine-tuned one epoch on ``synthetic_dataset``, 32 px).

    Shared by the whole session: tests that change a run work on a copy. (tests/serve has its own
    ``tiny_run``, a two-class run for the real-server tests.)
    """
    from hematovision.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--data", str(synthetic_dataset), "--out", str(out), "--mode", "finetune", "--backbone",
                     "tiny_cnn", "--no-pretrained", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                     "--seed", "1"])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    return out
