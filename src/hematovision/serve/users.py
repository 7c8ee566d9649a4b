"""Named users, their roles and passwords, and the tokens that stand for a login.

Kept in the serve database (tables ``users`` and ``auth_tokens``, schema in :mod:`hematovision.serve.db`).
Passwords are hashed with argon2id (``argon2-cffi``, its recommended parameters); tokens are random
(:mod:`secrets`) and only their sha256 is stored, so a copy of the database gives no way to log in.
Browser sessions and API tokens are both rows of ``auth_tokens`` (``kind`` tells them apart): logging
out, disabling a user or resetting a password deletes the rows and the token stops working at once.

This module imports no web framework: the ``hematovision users`` command uses it too.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Literal

from hematovision.errors import HematoVisionError
from hematovision.serve.db import Database
from hematovision.serve.sql import Connection, IntegrityError

ROLES = ("technologist", "reviewer", "admin")
"""Each role may do what the roles before it may: a technologist uploads, views and pre-reviews; a reviewer
also signs off; an admin also amends signed-off analyses, deletes analyses and manages users."""

LOCAL_USER_NAME = "local"  # who acts on a --no-auth workstation; reserved, so no real user can share the name
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 takes any length; a cap keeps a login request from costing more than a login
TokenKind = Literal["session", "api"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class UserError(HematoVisionError, ValueError):
    """A user command cannot be done: duplicate or unknown user, unknown role, unusable password."""


@dataclass(frozen=True)
class User:
    """Who is making a request.

    Attributes:
        id: row id (0 for the ``--no-auth`` local user, who has no row).
        name: the login name, as recorded on reviews, sign-offs and the audit trail.
        role: one of :data:`ROLES`.
    """

    id: int
    name: str
    role: str

    def can(self, role: str) -> bool:
        """Whether this user has ``role`` or a higher one."""
        return ROLES.index(self.role) >= ROLES.index(role)


LOCAL_USER = User(0, LOCAL_USER_NAME, "admin")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    # One format everywhere, so that stored times compare correctly as text.
    return moment.isoformat(timespec="milliseconds")


@lru_cache(maxsize=1)
def password_hasher() -> Any:
    """The argon2id hasher (``argon2.PasswordHasher`` with the library's default, RFC 9106 parameters)."""
    from hematovision._optional import optional_import

    return optional_import("argon2", "serve").PasswordHasher()


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Checked against when the user does not exist, so an unknown name takes as long as a wrong password.
    return str(password_hasher().hash(secrets.token_hex(16)))


def hash_token(token: str) -> str:
    """The form a token is stored in (sha256, hex)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """``name`` if it is a valid user name (1-64 letters, digits, ``. _ @ -``), else :class:`UserError`."""
    if not _NAME.fullmatch(name):
        raise UserError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
                        "starting with a letter or digit")
    if name.lower() == LOCAL_USER_NAME:
        raise UserError(f"the name {LOCAL_USER_NAME!r} is reserved for the --no-auth workstation user")
    return name


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`, else :class:`UserError`."""
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    """``password`` if it is usable (8 to 1024 characters), else :class:`UserError`."""
    if not password:
        raise UserError("the password is empty")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password is too short: use at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password is too long: at most {MAX_PASSWORD} characters")
    return password


def add_user(db: Database, name: str, role: str, password: str) -> User:
    """Create a user.

    Raises:
        UserError: invalid name, unknown role, unusable password, or the name is taken
            (names are compared without regard to case).
    """
    check_name(name)
    check_role(role)
    hashed = password_hasher().hash(check_password(password))
    try:
        with db.transaction() as connection:
            user_id = int(connection.execute(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?) RETURNING id",
                (name, role, hashed, _stamp(_now()))).fetchone()[0])
    except IntegrityError:  # the unique index on lower(name), in either database
        raise UserError(f"user {name!r} exists already") from None
    return User(user_id, name, role)


def list_users(db: Database) -> list[dict[str, Any]]:
    """Every user (name, role, disabled, created_at, active tokens), in creation order."""
    with db.connect() as connection:
        rows = connection.execute(
            "SELECT u.name, u.role, u.disabled, u.created_at,"
            " (SELECT COUNT(*) FROM auth_tokens t WHERE t.user_id = u.id AND t.expires_at > ?) AS active_tokens"
            " FROM users u ORDER BY u.id", (_stamp(_now()),)).fetchall()
    return [{**dict(row), "disabled": bool(row["disabled"])} for row in rows]


def count_users(db: Database) -> int:
    """How many users can log in (not disabled)."""
    with db.connect() as connection:
        return int(connection.execute("SELECT COUNT(*) FROM users WHERE disabled = 0").fetchone()[0])


def disable_user(db: Database, name: str) -> None:
    """Stop a user from logging in and revoke their sessions and tokens at once.

    Users are never deleted: their name stays on the reviews and the audit trail they made.

    Raises:
        UserError: no such user.
    """
    with db.transaction() as connection:
        user_id = _user_id(connection, name)
        connection.execute("UPDATE users SET disabled = 1 WHERE id = ?", (user_id,))
        connection.execute("DELETE FROM auth_tokens WHERE user_id = ?", (user_id,))


def reset_password(db: Database, name: str, password: str) -> None:
    """Set a new password (and enable the user again); revokes their sessions and tokens.

    Raises:
        UserError: no such user, or an unusable password.
    """
    hashed = password_hasher().hash(check_password(password))
    with db.transaction() as connection:
        user_id = _user_id(connection, name)
        connection.execute("UPDATE users SET password_hash = ?, disabled = 0 WHERE id = ?", (hashed, user_id))
        connection.execute("DELETE FROM auth_tokens WHERE user_id = ?", (user_id,))


def check_login(db: Database, name: str, password: str) -> tuple[User | None, str]:
    """Check a name and password.

    Returns:
        The user (``None`` when the login fails) and why it failed (for the audit trail, never
        for the client, who learns only that it failed): ``unknown user``, ``wrong password``,
        ``user disabled`` or ``""``.
    """
    hasher = password_hasher()  # first: it names the extra to install when argon2 is missing
    from argon2.exceptions import InvalidHashError, VerificationError

    with db.connect() as connection:
        row = connection.execute("SELECT id, name, role, password_hash, disabled FROM users"
                                 " WHERE lower(name) = lower(?)", (name,)).fetchone() if 0 < len(name) <= 64 else None
    if len(password) > MAX_PASSWORD:
        return None, "password over the length limit"
    try:
        hasher.verify(row["password_hash"] if row is not None else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None, "unknown user" if row is None else "wrong password"
    if row is None:
        return None, "unknown user"
    if row["disabled"]:
        return None, "user disabled"
    if hasher.check_needs_rehash(row["password_hash"]):  # the library's parameters grew stronger since
        with db.transaction() as connection:
            connection.execute("UPDATE users SET password_hash = ? WHERE id = ?", (hasher.hash(password), row["id"]))
    return User(int(row["id"]), row["name"], row["role"]), ""


def issue_token(db: Database, user: User, kind: TokenKind, lifetime: timedelta) -> tuple[str, str]:
    """A new random token for ``user``; only its hash is stored.

    Returns:
        The token (shown once, to the client) and when it expires (ISO 8601, UTC).
    """
    token = secrets.token_urlsafe(32)
    now = _now()
    expires = _stamp(now + lifetime)
    with db.transaction() as connection:
        connection.execute("DELETE FROM auth_tokens WHERE expires_at <= ?", (_stamp(now),))  # tidy up as we go
        connection.execute("INSERT INTO auth_tokens (token_hash, user_id, kind, created_at, expires_at)"
                           " VALUES (?, ?, ?, ?, ?)", (hash_token(token), user.id, kind, _stamp(now), expires))
    return token, expires


def user_for_token(db: Database, token: str, kind: TokenKind) -> User | None:
    """The user a token belongs to, or ``None`` if it is unknown, expired, revoked or the user is disabled."""
    if not token or len(token) > 256:
        return None
    with db.connect() as connection:
        row = connection.execute(
            "SELECT u.id, u.name, u.role FROM auth_tokens t JOIN users u ON u.id = t.user_id"
            " WHERE t.token_hash = ? AND t.kind = ? AND t.expires_at > ? AND u.disabled = 0",
            (hash_token(token), kind, _stamp(_now()))).fetchone()
    return None if row is None else User(int(row["id"]), row["name"], row["role"])


def revoke_token(db: Database, token: str) -> None:
    """Delete one token (logout); unknown tokens are ignored."""
    with db.transaction() as connection:
        connection.execute("DELETE FROM auth_tokens WHERE token_hash = ?", (hash_token(token),))


def _user_id(connection: Connection, name: str) -> int:
    row = connection.execute("SELECT id FROM users WHERE lower(name) = lower(?)", (name,)).fetchone()
    if row is None:
        raise UserError(f"no user named {name!r}")
    return int(row[0])
