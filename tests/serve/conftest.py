"""Shared fixtures of the serve tests (helpers to log in are in ``auth_helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from postgres_cluster import PostgresCluster  # tests/ is on sys.path (tests/conftest.py)

from hematovision.serve import users


@pytest.fixture(autouse=True)
def cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 with its cheapest parameters: the default ones take ~0.2 s a hash on the shared test machine.

    Only this process: servers started as subprocesses hash with the real parameters.
    """
    argon2 = pytest.importorskip("argon2")
    cheap = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    monkeypatch.setattr(users, "password_hasher", lambda: cheap)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder from `hematovision train` (tiny_cnn, one epoch, 32 px, synthetic images), for the
    tests that start a real server; made once per test session (the servers only read it)."""
    import torch
    from PIL import Image

    from hematovision.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    for name in ("lymphocyte", "neutrophil"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only add contention
    try:
        code = main(["train", "--data", str(root / "data"), "--out", str(root / "run"), "--mode", "finetune",
                     "--backbone", "tiny_cnn", "--epochs", "1", "--image-size", "32", "--no-pretrained"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root / "run"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL server for the session (tests/postgres_cluster.py); skips without the binaries."""
    cluster = PostgresCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path | str:
    """The ``--db`` of the test's app, once per database: ``tmp_path/hv.db``, or a new PostgreSQL database.

    The same API tests run on both. On PostgreSQL, HEMATOVISION_HOME (where the server keeps its secret key
    when the database is not a file) is the test's own folder. Restrict a test to one database with
    ``@pytest.mark.parametrize("database", ["sqlite"], indirect=True)``.
    """
    if request.param == "sqlite":
        return tmp_path / "hv.db"
    monkeypatch.setenv("HEMATOVISION_HOME", str(tmp_path / "home"))
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.new_database()
