from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_dataset  # noqa: E402


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
