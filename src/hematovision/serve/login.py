"""Logging in and out: the login page, ``POST /login``, ``POST /logout`` and the API token endpoint."""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
from importlib import resources
from string import Template
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from hematovision.serve.audit import record_audit
from hematovision.serve.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    SESSION_COOKIE,
    TOKEN_URL,
    AuthConfig,
    CurrentUser,
    auth_config,
    check_csrf_token,
    check_same_origin,
    client_address,
    csrf_token,
    unauthorized,
)
from hematovision.serve.users import check_login, issue_token, revoke_token, user_for_token

LOGIN_COOKIE = "hv_login"  # the login form's CSRF nonce (there is no session yet to bind the token to)
_FAILED = "Wrong user name or password."

router = APIRouter()


class TokenOut(BaseModel):
    access_token: str
    token_type: str = Field(description="always 'bearer'")
    expires_at: str = Field(description="ISO 8601, UTC")


class Me(BaseModel):
    name: str
    role: str = Field(description="technologist, reviewer or admin")
    auth: bool = Field(description="false on a --no-auth workstation (everyone is 'local')")


@router.get("/login", include_in_schema=False, response_model=None)
def login_page(request: Request, next: str = "/") -> Response:
    """The login form."""
    if not auth_config(request).enabled:
        return RedirectResponse("/", 303)
    return _render(request, next, "", 200)


@router.post("/login", include_in_schema=False, response_model=None)
async def login(request: Request) -> Response:
    """Check the form; on success start a session (cookies) and go to the page asked for."""
    config = auth_config(request)
    if not config.enabled:
        return RedirectResponse("/", 303)
    check_same_origin(request, required=True)
    form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
    values = {key: value for key, value in form.items() if not isinstance(value, UploadFile)}
    next_url = _local_path(values.get("next", "/"))
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(values.get("csrf_token", "").encode(), _login_token(config, nonce).encode()):
        return _render(request, next_url, "The login form had expired; please try again.", 403)
    name = values.get("username", "").strip()
    user, reason = check_login(config.db, name, values.get("password", ""))
    client = client_address(request)
    if user is None:
        record_audit(config.db, name[:64] or "(empty)", "login_failed", detail=f"login page: {reason}", client=client)
        return _render(request, next_url, _FAILED, 401)
    token, _ = issue_token(config.db, user, "session", config.session_lifetime)
    record_audit(config.db, user.name, "login", detail="login page", client=client)
    response = RedirectResponse(next_url, 303)
    secure = _is_https(request)
    max_age = int(config.session_lifetime.total_seconds())
    response.set_cookie(SESSION_COOKIE, token, max_age=max_age, httponly=True, samesite="lax", secure=secure)
    # Readable by the page's script (not HttpOnly): it sends it back as the X-CSRF-Token header.
    response.set_cookie(CSRF_COOKIE, csrf_token(config.secret, token), max_age=max_age, httponly=False,
                        samesite="lax", secure=secure)
    response.delete_cookie(LOGIN_COOKIE, path="/login", secure=secure, httponly=True, samesite="lax")
    return response


@router.post("/logout", include_in_schema=False, response_model=None)
async def logout(request: Request) -> Response:
    """End the session (the token row is deleted) and go to the login page.

    Takes the CSRF token from the ``X-CSRF-Token`` header or a ``csrf_token`` form field.
    """
    config = auth_config(request)
    session = request.cookies.get(SESSION_COOKIE)
    user = user_for_token(config.db, session, "session") if session and config.enabled else None
    if session and user is not None:
        check_same_origin(request, required=True)
        supplied = request.headers.get(CSRF_HEADER)
        if supplied is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form(max_files=0, max_fields=4, max_part_size=1024)
            field = form.get("csrf_token")
            supplied = field if isinstance(field, str) else None
        check_csrf_token(request, config, session, supplied)
        revoke_token(config.db, session)
        record_audit(config.db, user.name, "logout", client=client_address(request))
    response = RedirectResponse("/login" if config.enabled else "/", 303)
    secure = _is_https(request)
    response.delete_cookie(SESSION_COOKIE, secure=secure, httponly=True, samesite="lax")
    response.delete_cookie(CSRF_COOKIE, secure=secure, samesite="lax")
    return response


@router.post(TOKEN_URL, response_model=TokenOut, tags=["auth"],
             responses={401: {"description": "wrong user name or password"}})
def issue_api_token(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> dict[str, Any]:
    """An API token for scripts (OAuth2 password flow): send it as ``Authorization: Bearer TOKEN``.

    It lasts ``token_days`` (default 30) and stops working when the user is disabled or their password reset.
    """
    config = auth_config(request)
    if not config.enabled:
        raise HTTPException(400, "this server runs without authentication (--no-auth): no token is needed")
    user, reason = check_login(config.db, form.username.strip(), form.password)
    client = client_address(request)
    if user is None:
        record_audit(config.db, form.username.strip()[:64] or "(empty)", "login_failed", detail=f"token: {reason}",
                     client=client)
        raise unauthorized("wrong user name or password")
    token, expires = issue_token(config.db, user, "api", config.token_lifetime)
    record_audit(config.db, user.name, "token", detail=f"API token issued, expires {expires}", client=client)
    return {"access_token": token, "token_type": "bearer", "expires_at": expires}


@router.get("/api/v1/auth/me", response_model=Me, tags=["auth"])
def who_am_i(request: Request, user: CurrentUser) -> dict[str, Any]:
    """The logged-in user and their role."""
    return {"name": user.name, "role": user.role, "auth": auth_config(request).enabled}


def _render(request: Request, next_url: str, message: str, status: int) -> HTMLResponse:
    config = auth_config(request)
    nonce = secrets.token_urlsafe(16)
    page = Template((resources.files("hematovision.serve") / "static" / "login.html").read_text(encoding="utf-8"))
    body = page.safe_substitute(csrf_token=html.escape(_login_token(config, nonce)),
                                next=html.escape(_local_path(next_url)), message=html.escape(message))
    response = HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path="/login", httponly=True, samesite="lax",
                        secure=_is_https(request))
    return response


def _login_token(config: AuthConfig, nonce: str) -> str:
    return hmac.new(config.secret, b"login:" + nonce.encode(), hashlib.sha256).hexdigest()


def _local_path(url: str) -> str:
    # Only a path on this server: "//evil.example" or "https://..." would make the login an open redirect.
    if not url.startswith("/") or url.startswith(("//", "/\\")) or any(c in url for c in "\r\n\t"):
        return "/"
    return url


def _is_https(request: Request) -> bool:
    # Behind a TLS-terminating proxy the app sees http; the proxy says https in X-Forwarded-Proto. Trusting it
    # here can only make the cookies stricter (Secure), never weaker.
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"
