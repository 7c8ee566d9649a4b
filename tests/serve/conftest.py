"""Shared fixtures of the serve tests (helpers to log in are in ``auth_helpers.py``)."""

from __future__ import annotations

import pytest

from hematovision.serve import users


@pytest.fixture(autouse=True)
def cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 with its cheapest parameters: the default ones take ~0.2 s a hash on the shared test machine.

    Only this process: servers started as subprocesses hash with the real parameters.
    """
    argon2 = pytest.importorskip("argon2")
    cheap = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    monkeypatch.setattr(users, "password_hasher", lambda: cheap)
