"""Exported copies of run folders for the tests (``hematovision export`` on a copy, one thread)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from hematovision.cli import main


def exported_copy(run: Path, destination: Path, *export_args: str) -> Path:
    """A copy of ``run`` at ``destination``, through ``hematovision export`` (one torch thread, ``--threads 1``)."""
    shutil.copytree(run, destination)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["export", str(destination), "--threads", "1", *export_args]) == 0
    finally:
        torch.set_num_threads(previous)
    return destination
