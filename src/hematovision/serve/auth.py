"""Who is asking: the FastAPI dependencies that authenticate a request, check its role and guard against CSRF.

Two ways to be logged in:

* **Browser session**: ``POST /login`` (:mod:`hematovision.serve.login`) sets the ``hv_session`` cookie
  (HttpOnly, SameSite=Lax, Secure behind TLS). It holds a random token whose sha256 is a row of
  ``auth_tokens``: server-side sessions rather than a signed cookie, so that logout, disabling a user
  or a password reset end the session at once, not when a signed cookie would expire.
* **API token**: ``POST /api/v1/auth/token`` (OAuth2 password form) returns a bearer token for scripts,
  sent as ``Authorization: Bearer TOKEN``.

A cookie is sent by the browser on its own, so every state-changing request made with the session
cookie must also prove it comes from our page (OWASP CSRF cheat sheet): its ``Origin`` (or ``Referer``)
names this server's host, and it carries the ``X-CSRF-Token`` header, which the page's script copies
from the ``hv_csrf`` cookie. That token is an HMAC of the session token under the server's secret key
("signed double-submit cookie"), so a cookie planted by another site cannot be made to match.
Bearer-token requests need neither: no browser attaches the header by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from starlette.exceptions import HTTPException

from hematovision.errors import HematoVisionError
from hematovision.serve.db import Database
from hematovision.serve.settings import Settings
from hematovision.serve.users import LOCAL_USER, ROLES, User, count_users, user_for_token

log = logging.getLogger(__name__)

SESSION_COOKIE = "hv_session"
CSRF_COOKIE = "hv_csrf"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TOKEN_URL = "/api/v1/auth/token"

# auto_error=False: a missing header falls through to the session cookie. Declaring the scheme makes the
# OpenAPI document describe the OAuth2 password flow, so /docs can log in and generated clients know how.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False,
                                     description="a token from POST /api/v1/auth/token (user name and password)")


@dataclass(frozen=True)
class AuthConfig:
    """What the auth dependencies need, kept on ``app.state.auth`` by :func:`install_auth`.

    Attributes:
        enabled: ``False`` under ``--no-auth``: every request is the local user.
        db: the serve database (users and tokens).
        secret: key of the CSRF token HMAC.
        session_lifetime: how long a browser login lasts.
        token_lifetime: how long an API token lasts.
    """

    enabled: bool
    db: Database
    secret: bytes
    session_lifetime: timedelta
    token_lifetime: timedelta


class LoginRequired(Exception):
    """A page was asked for without a login: answered with a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def install_auth(app: object, settings: Settings, db: Database) -> AuthConfig:
    """Put the :class:`AuthConfig` on ``app.state.auth`` and say how to get started.

    With no user in the database it logs how to create the first admin; under ``--no-auth`` it warns.
    """
    config = AuthConfig(settings.auth, db, load_secret_key(settings),
                        timedelta(hours=settings.session_hours), timedelta(days=settings.token_days))
    app.state.auth = config  # type: ignore[attr-defined]
    if not settings.auth:
        log.warning("AUTHENTICATION IS OFF (--no-auth): anyone who can reach %s:%s acts as user 'local' with "
                    "every right. Only for a single-user workstation.", settings.host, settings.port)
    elif count_users(db) == 0:
        log.warning("no users yet: nobody can log in. Create the first admin with:  "
                    "hematovision users add admin --role admin --db %s", db.location)
    return config


def load_secret_key(settings: Settings) -> bytes:
    """The server's secret: ``HEMATOVISION_SECRET_KEY``, else ``<data_dir>/secret_key`` (made once, mode 0600).

    Raises:
        HematoVisionError: the key file cannot be read or created.
    """
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.data_dir / "secret_key"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a PostgreSQL server has no db folder made for it
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise HematoVisionError(f"cannot create the secret key file {path}: {error.strerror}") from None
    else:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise HematoVisionError(f"cannot read the secret key file {path}: {error.strerror}") from None
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine; run: chmod 600 %s", path, path)
    if len(key) < 32:
        raise HematoVisionError(f"the secret key in {path} is too short; delete the file to make a new one")
    return key.encode()


def auth_config(request: Request) -> AuthConfig:
    """The app's :class:`AuthConfig`."""
    config: AuthConfig = request.app.state.auth
    return config


def client_address(request: Request) -> str | None:
    """The client's IP address, for the audit trail (behind a proxy: as the server was told to trust it)."""
    return request.client.host if request.client else None


def csrf_token(secret: bytes, session_token: str) -> str:
    """The CSRF token that goes with a session: an HMAC of the session token."""
    return hmac.new(secret, b"csrf:" + session_token.encode(), hashlib.sha256).hexdigest()


def unauthorized(detail: str) -> HTTPException:
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750)."""
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def check_same_origin(request: Request, required: bool) -> None:
    """Refuse (403) a request whose ``Origin`` (or, without one, ``Referer``) is another site.

    Args:
        request: the request.
        required: also refuse when neither header is there (browsers send ``Origin`` with every
            POST, so only a cookie-carrying non-browser client lacks both).
    """
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        if required:
            raise HTTPException(403, "cross-site request refused: the request has no Origin or Referer header")
        return
    parts = urlsplit(source) if source != "null" else None
    if parts is None or not _same_host(parts.scheme, parts.netloc.lower(), request):
        raise HTTPException(403, f"cross-site request refused: it comes from {source[:100]!r}, not this server")


def _same_host(scheme: str, netloc: str, request: Request) -> bool:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    host = request.headers.get("host", "").lower()
    if default:  # "https://lab.example" and Host "lab.example:443" are the same place
        netloc, host = netloc.removesuffix(default), host.removesuffix(default)
    if netloc and netloc == host:
        return True
    # A proxy may rewrite Host; the names the server is told it answers to are then also ours.
    # Only the names configured explicitly (--allowed-hosts), not the localhost defaults: another port on
    # localhost is another site.
    allowed = getattr(request.app.state.hv.settings, "allowed_hosts", None) or ()
    hostname = urlsplit(f"//{netloc}").hostname or ""
    return any(hostname == name or (name.startswith("*.") and hostname.endswith(name[1:]))
               for name in allowed if name != "*")


def check_csrf_token(request: Request, config: AuthConfig, session_token: str, supplied: str | None) -> None:
    """Refuse (403) unless ``supplied`` is the CSRF token of this session."""
    if not supplied:
        raise HTTPException(403, f"CSRF token missing: send the {CSRF_HEADER} header (the page's script does)")
    if not hmac.compare_digest(supplied.encode(), csrf_token(config.secret, session_token).encode()):
        raise HTTPException(403, "CSRF token does not match this session; reload the page")


def authenticate(request: Request, bearer: Annotated[str | None, Depends(oauth2_scheme)]) -> User:
    """FastAPI dependency: the user making the request, or 401.

    A bearer token wins over the session cookie. With the session cookie, a state-changing
    request must also pass the same-origin and CSRF-token checks (403 otherwise).
    """
    config = auth_config(request)
    unsafe = request.method in UNSAFE_METHODS
    if not config.enabled:
        if unsafe:  # no credentials to steal, but a page elsewhere must still not act through a local browser
            check_same_origin(request, required=False)
        return LOCAL_USER
    if bearer is not None:
        user = user_for_token(config.db, bearer, "api")
        if user is None:
            raise unauthorized("the bearer token is invalid, expired or revoked; get a new one at " + TOKEN_URL)
        return user
    session = request.cookies.get(SESSION_COOKIE)
    if not session:
        raise unauthorized(f"log in first: at /login, or send 'Authorization: Bearer TOKEN' (from {TOKEN_URL})")
    user = user_for_token(config.db, session, "session")
    if user is None:
        raise unauthorized("the session has ended; log in again at /login")
    if unsafe:
        check_same_origin(request, required=True)
        check_csrf_token(request, config, session, request.headers.get(CSRF_HEADER))
    return user


CurrentUser = Annotated[User, Depends(authenticate)]


def page_user(request: Request, bearer: Annotated[str | None, Depends(oauth2_scheme)]) -> User:
    """FastAPI dependency for pages: like :func:`authenticate`, but sends a browser without a login to ``/login``."""
    try:
        return authenticate(request, bearer)
    except HTTPException as error:
        if error.status_code != 401:
            raise
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target) from None


def login_redirect_url(next_url: str) -> str:
    """``/login?next=...`` for a page the user wanted."""
    return "/login?next=" + quote(next_url, safe="")


def require_role(role: str) -> Callable[[User], User]:
    """FastAPI dependency factory: the current user if they have ``role`` (or a higher one), else 403.

    Example:
        ``def delete(analysis_id: int, user: Annotated[User, Depends(require_role("admin"))])``
        (or the ready-made :data:`Reviewer` and :data:`Admin` annotations).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def has_role(user: CurrentUser) -> User:
        if not user.can(role):
            raise HTTPException(403, f"forbidden: this needs the {role} role; {user.name} is a {user.role}")
        return user

    return has_role


Reviewer = Annotated[User, Depends(require_role("reviewer"))]
Admin = Annotated[User, Depends(require_role("admin"))]
