"""Where HematoVision keeps caches and downloads (override with HEMATOVISION_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def hematovision_home() -> Path:
    """The cache/download root: ``$HEMATOVISION_HOME`` or ``~/.cache/hematovision``."""
    root = os.environ.get("HEMATOVISION_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hematovision"


def shared_data_dir() -> Path | None:
    """The project's shared datasets folder (``../shared/data`` beside a checkout), if present.

    ``$HEMATOVISION_SHARED_DATA`` overrides the search.
    """
    env = os.environ.get("HEMATOVISION_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [parent / "shared" / "data" for parent in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None
