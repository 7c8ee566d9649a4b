"""Browser and abuse protections of the web app, as plain ASGI middleware.

- :class:`HostCheck`: only the configured host names are answered (DNS rebinding).
- :class:`SecurityHeaders`: a strict Content-Security-Policy with ``frame-ancestors 'none'``,
  ``nosniff``, a same-origin referrer, ``no-store`` on API answers (patient data) and, behind TLS, HSTS.
- :class:`RateLimit`: requests per minute per user (per credential) or per client IP, uploads counted
  apart, failed logins per IP; 429 with ``Retry-After``.
- :func:`client_disconnected`: a client that hangs up mid-upload is one warning line, not a traceback.

The slow-client timeouts live in the server's protocol (:mod:`hematovision.serve.deadlines`): an
ASGI app is only called once the headers have arrived, too late to time them out.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import time
from typing import TYPE_CHECKING

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hematovision.serve.auth import SESSION_COOKIE, TOKEN_URL

if TYPE_CHECKING:
    from fastapi import FastAPI

    from hematovision.serve.settings import Settings

log = logging.getLogger(__name__)

# Everything from our own origin, nothing inline: a script injected into a file name or a sample
# name cannot run. Images may be data: URIs (Swagger UI's icons). No framing (click-jacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HSTS_VALUE = "max-age=31536000"
# Paths never rate limited: the liveness probe, and static files that cost nothing to serve.
UNLIMITED_PREFIXES = ("/health", "/static/", "/docs-assets/")
UPLOAD_PATHS = ("/api/v1/predict",)
LOGIN_PATHS = ("/login", TOKEN_URL)  # where passwords are tried
# Browser session cookies that identify a user for the per-user limit.
SESSION_COOKIE_NAMES = (SESSION_COOKIE,)

_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)


def install_protections(app: FastAPI, settings: Settings) -> None:
    """Add the middleware and the disconnect handler to ``app``.

    Call after the app's other middleware: the last added runs first, so the security headers
    are on every answer, the host is checked before anything else runs and the rate limit
    before a body is read.
    """
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute,
                       uploads_per_minute=settings.upload_rate_limit_per_minute,
                       failures_per_minute=settings.failed_login_limit_per_minute)
    app.add_middleware(HostCheck, allowed=settings.trusted_hosts)
    app.add_middleware(SecurityHeaders, hsts=settings.hsts)


async def client_disconnected(request: Request, _error: Exception) -> Response:
    """Log a client that hung up mid-request as one line; the answer goes nowhere."""
    client = request.client.host if request.client else "unknown client"
    what = "upload" if request.url.path in UPLOAD_PATHS else "request"
    log.warning("client disconnected during %s: %s %s from %s", what, request.method, request.url.path, client)
    return Response(status_code=400)  # 499 in nginx terms; nobody reads it


# ---- allowed hosts ----

def host_name(header: str) -> str:
    """The host part of a ``Host`` header, lower case, without the port (``[::1]:8000`` → ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") > 1:  # a bare IPv6 address (not valid in Host, but harmless to read)
        return header
    return header.split(":", 1)[0].rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` matches one of ``allowed`` (exact, ``*.suffix`` or ``*``)."""
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class HostCheck:
    """Answer 400 JSON to a request whose ``Host`` is not in the allowed list.

    Starlette's ``TrustedHostMiddleware`` does the same but answers plain text and cuts
    ``[::1]:8000`` at the first colon; this one answers like every other error of the API.
    """

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = tuple(host_name(entry) if not entry.startswith("*") else entry for entry in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        host = host_name(header)
        if not host_allowed(host, self.allowed):
            log.warning("refused a request for host %r (allowed: %s)", header[:100], ", ".join(self.allowed))
            response = JSONResponse({"detail": f"host {header[:100]!r} is not served here; a server "
                                               f"administrator can add it with --allowed-hosts"}, status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---- security headers ----

def inline_script_policy(html: bytes) -> str:
    """:data:`CONTENT_SECURITY_POLICY` that also allows the inline scripts of ``html`` by their hashes.

    For pages we do not write ourselves (FastAPI's Swagger UI page starts Swagger with an inline
    script): exactly those scripts run, nothing injected does.
    """
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    )
    return CONTENT_SECURITY_POLICY.replace("script-src 'self'", f"script-src 'self' {hashes}".rstrip(), 1)


class SecurityHeaders:
    """Add the browser protections to every HTTP answer (a route may set its own CSP).

    Args:
        app: the wrapped app.
        hsts: send ``Strict-Transport-Security``; only sensible when clients reach the server over TLS.
    """

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.headers: list[tuple[bytes, bytes]] = [
            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if hsts:
            self.headers.append((b"strict-transport-security", HSTS_VALUE.encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Answers under /api carry patient data (names, images, labels): never kept in a browser
        # or proxy cache, on a shared lab workstation least of all.
        no_store = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", [])
                           if not (no_store and name.lower() == b"cache-control")]
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
                if no_store:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---- rate limits ----

def client_key(scope: Scope) -> tuple[str | None, str]:
    """Who is asking: ``(credential key or None, client IP key)``.

    The credential (``Authorization`` header or session cookie) is hashed, never kept. Behind a
    reverse proxy the IP is the proxy's unless the server trusts its ``X-Forwarded-For``
    (uvicorn's ``--forwarded-allow-ips``).
    """
    client = scope.get("client")
    ip = f"ip:{client[0]}" if client else "ip:unknown"
    credential = b""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            credential = value
            break
        if name == b"cookie":
            for part in value.split(b";"):
                key, _, cookie = part.strip().partition(b"=")
                if key.decode("latin-1") in SESSION_COOKIE_NAMES and cookie:
                    credential = cookie
    if not credential:
        return None, ip
    return "user:" + hashlib.sha256(credential).hexdigest()[:32], ip


class RateLimit:
    """Refuse requests past a per-minute budget with 429 JSON and ``Retry-After``.

    Counted per credential when the request carries one (two users behind one proxy do not share
    a budget), else per client IP; uploads have their own, smaller budget. Failed logins and
    refused credentials (answers 401) count against the client IP in a third budget: once it is
    used up, that IP may neither try passwords nor present credentials until the window moves on,
    so inventing a new token per request earns no fresh budget. Counters live in this process
    (the ``limits`` library's moving window in memory): with several server processes each counts alone.

    Args:
        app: the wrapped app.
        per_minute: API requests per minute per key (0: no limit).
        uploads_per_minute: uploads per minute per key (0: no limit).
        failures_per_minute: failed logins/refused credentials per minute per IP (0: no limit).
    """

    def __init__(self, app: ASGIApp, per_minute: int, uploads_per_minute: int, failures_per_minute: int) -> None:
        self.app = app
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.general = _per_minute(per_minute)
        self.uploads = _per_minute(uploads_per_minute)
        self.failures = _per_minute(failures_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(UNLIMITED_PREFIXES):
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and path in UPLOAD_PATHS
        is_login = scope["method"] == "POST" and path in LOGIN_PATHS
        user, ip = client_key(scope)
        if self.failures is not None and (user is not None or is_login) \
                and not await self.limiter.test(self.failures, "failures", ip):
            await self._refuse(scope, receive, send, self.failures, "failures", ip, "failed logins")
            return
        item = self.uploads if is_upload else self.general
        namespace = "uploads" if is_upload else "requests"
        if item is not None and not await self.limiter.hit(item, namespace, user or ip):
            await self._refuse(scope, receive, send, item, namespace, user or ip, namespace)
            return
        status = 0

        async def send_watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_watching)
        if status == 401 and self.failures is not None and (user is not None or is_login):
            await self.limiter.hit(self.failures, "failures", ip)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, item: RateLimitItem,
                      namespace: str, key: str, what: str) -> None:
        stats = await self.limiter.get_window_stats(item, namespace, key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        log.warning("rate limit: %s refused %s %s (more than %d %s per minute)",
                    key if key.startswith("ip:") else "a user", scope["method"], scope["path"], item.amount, what)
        response = JSONResponse(
            {"detail": f"too many {what}: at most {item.amount} per minute; try again in {retry_after} s"},
            status_code=429, headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)


def _per_minute(amount: int) -> RateLimitItem | None:
    return RateLimitItemPerMinute(amount) if amount > 0 else None
