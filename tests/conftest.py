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
