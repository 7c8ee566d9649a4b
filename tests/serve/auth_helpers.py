"""Logging in from the serve tests: users, API tokens and the login form (``import auth_helpers``).

tests/serve is on ``sys.path`` (pytest puts a test file's folder there: no ``__init__.py``).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from hematovision.serve import users
from hematovision.serve.db import Database

PASSWORD = "correct horse battery"
ORIGIN = "http://localhost"  # the base URL the serve tests give TestClient: what a browser on our page sends


def app_db(client: Any) -> Database:
    """The database behind a TestClient's app."""
    db: Database = client.app.state.hv.db
    return db


def add_user(client: Any, name: str, role: str, password: str = PASSWORD) -> users.User:
    """Create a user in the app's database (as ``hematovision users add`` would)."""
    return users.add_user(app_db(client), name, role, password)


def bearer_headers(client: Any, name: str = "tester", role: str = "admin") -> dict[str, str]:
    """A new user of ``role`` and the ``Authorization`` header of an API token of theirs."""
    user = add_user(client, name, role)
    token, _ = users.issue_token(app_db(client), user, "api", timedelta(hours=1))
    return {"Authorization": f"Bearer {token}"}


def authorize(client: Any, name: str = "tester", role: str = "admin") -> Any:
    """Make every later request of ``client`` carry a new ``role`` user's API token; returns the client."""
    client.headers.update(bearer_headers(client, name, role))
    return client


def login_page_token(client: Any, next_url: str = "/") -> str:
    """GET the login page (which sets the login-form cookie) and read its hidden CSRF field."""
    page = client.get("/login", params={"next": next_url})
    assert page.status_code == 200, page.text
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def browser_login(client: Any, name: str, password: str = PASSWORD) -> Any:
    """Log in through the login form as a browser would; later requests send Origin and X-CSRF-Token.

    Returns the login response (303 on success).
    """
    token = login_page_token(client)
    response = client.post("/login", data={"username": name, "password": password, "csrf_token": token, "next": "/"},
                           headers={"Origin": ORIGIN}, follow_redirects=False)
    if response.status_code == 303:
        client.headers.update({"Origin": ORIGIN, "X-CSRF-Token": client.cookies.get("hv_csrf")})
    return response
