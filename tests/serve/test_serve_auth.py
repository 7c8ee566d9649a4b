"""Users, logins, API tokens, roles and CSRF, from the outside (TestClient; the real process is in
test_serve_auth_process.py). Tests that take ``database`` run on SQLite and on PostgreSQL (conftest.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("argon2")
from auth_helpers import (
    ORIGIN,
    PASSWORD,
    add_user,
    app_db,
    bearer_headers,
    browser_login,
    login_page_token,
)
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from hematovision.data.classes import WBC5
from hematovision.data.transforms import Preprocessing
from hematovision.errors import HematoVisionError
from hematovision.models import create_model
from hematovision.serve import users
from hematovision.serve.app import create_app
from hematovision.serve.settings import Settings

# Reachable without a login, and nothing else: a new route is protected unless it is added here on purpose.
PUBLIC = {"/health", "/login", "/logout", "/api/v1/auth/token", "/docs", "/openapi.json"}


def fake_predictor() -> SimpleNamespace:
    import torch

    torch.manual_seed(0)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn"})


def png(seed: int = 0) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def make_client(tmp_path: Path, database: Path | str | None = None, **settings: object) -> TestClient:
    """An app on ``database`` (default: a SQLite file in ``tmp_path``), its images in ``tmp_path/images``."""
    settings = {"confidence_threshold": 0.0, **settings}  # nothing flagged, unless a test asks for it
    db = database if database is not None else tmp_path / "hv.db"
    app = create_app(Settings(db=db, storage=tmp_path / "images", **settings),  # type: ignore[arg-type]
                     predictor=fake_predictor())
    return TestClient(app, base_url="http://localhost")


@pytest.fixture()
def client(tmp_path: Path, database: Path | str) -> TestClient:
    with make_client(tmp_path, database) as test_client:
        yield test_client


def upload(client: TestClient, headers: dict[str, str] | None = None, n: int = 1):
    return client.post("/api/v1/predict", files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(n)],
                       headers=headers)


def audit(client: TestClient) -> list:
    with app_db(client).connect() as connection:
        return connection.execute("SELECT * FROM audit ORDER BY id").fetchall()


def scalar(client: TestClient, query: str) -> object:
    """One value from the app's database (SQLite or PostgreSQL)."""
    with app_db(client).connect() as connection:
        return connection.execute(query).fetchone()[0]


def all_routes(routes: list) -> list[APIRoute]:
    """Every endpoint, also those of included routers (FastAPI keeps those as nested router objects)."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):
            found += all_routes(route.original_router.routes)
        elif isinstance(route, APIRoute):
            found.append(route)
    return found


def route_url(route: APIRoute) -> str:
    return re.sub(r"\{[^}]+\}", "1", route.path)


# ---- every route needs a user ----

def test_every_route_needs_a_user(tmp_path: Path, database: Path | str) -> None:
    # Dozens of refused requests from one client: switch the failed-login limit (429) off for this test.
    with make_client(tmp_path, database, failed_login_limit_per_minute=0) as client:
        check_every_route_needs_a_user(client)


def check_every_route_needs_a_user(client: TestClient) -> None:
    everything = all_routes(client.app.routes)  # type: ignore[attr-defined]
    # The enumeration sees every route the OpenAPI document knows (and the pages it does not).
    assert set(client.get("/openapi.json").json()["paths"]) <= {r.path for r in everything}
    routes = [r for r in everything if r.path not in PUBLIC]
    assert len([r for r in routes if r.path.startswith("/api/")]) >= 10
    assert {"/", "/history"} <= {r.path for r in routes}
    for route in routes:
        for method in route.methods:
            url = route_url(route)
            for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": "hv_session=forged"}):
                response = client.request(method, url, headers=headers, follow_redirects=False)
                if route.path.startswith("/api/"):
                    assert response.status_code == 401, (method, url, headers, response.text)
                    assert response.headers["www-authenticate"] == "Bearer"
                    assert isinstance(response.json()["detail"], str)
                else:  # a page: the browser is sent to log in and come back
                    assert response.status_code == 303, (method, url, headers)
                    assert response.headers["location"].startswith("/login?next=")
    assert scalar(client, "SELECT COUNT(*) FROM analyses") == 0


def test_public_routes_and_static_assets_need_no_login(client: TestClient) -> None:
    for path in ("/health", "/login", "/static/style.css", "/static/app.js", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    page = client.get("/history", params={"q": "x"}, follow_redirects=False)
    assert page.headers["location"] == "/login?next=%2Fhistory%3Fq%3Dx"


def test_openapi_declares_the_oauth2_password_flow(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    (scheme,) = schema["components"]["securitySchemes"].values()
    assert scheme["type"] == "oauth2" and scheme["flows"]["password"]["tokenUrl"] == "/api/v1/auth/token"
    assert schema["paths"]["/api/v1/analyses/{analysis_id}/review"]["post"]["security"]
    token_form = schema["paths"]["/api/v1/auth/token"]["post"]["requestBody"]["content"]
    assert "application/x-www-form-urlencoded" in token_form


def test_first_start_says_how_to_create_the_first_admin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        make_client(tmp_path)
    assert "hematovision users add admin --role admin" in caplog.text


# ---- the login page and sessions ----

def test_login_page_sets_a_session_and_logout_ends_it(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    response = browser_login(client, "tina")
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookies = {c.split("=", 1)[0]: c.lower() for c in response.headers.get_list("set-cookie")}
    assert "httponly" in cookies["hv_session"] and "samesite=lax" in cookies["hv_session"]
    assert "httponly" not in cookies["hv_csrf"]  # the page's script reads it
    assert "secure" not in cookies["hv_session"]  # plain http (localhost): a Secure cookie would never come back
    assert client.get("/api/v1/auth/me").json() == {"name": "tina", "role": "technologist", "auth": True}
    assert client.get("/", follow_redirects=False).status_code == 200
    session = client.cookies.get("hv_session")

    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    # The old session token is dead on the server, not only forgotten by this browser.
    assert client.get("/api/v1/auth/me", headers={"Cookie": f"hv_session={session}"}).status_code == 401
    assert [(r["user"], r["action"]) for r in audit(client)] == [("tina", "login"), ("tina", "logout")]


def test_cookies_are_secure_behind_a_tls_proxy(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    token = login_page_token(client)
    response = client.post("/login", data={"username": "tina", "password": PASSWORD, "csrf_token": token},
                           headers={"Origin": ORIGIN, "X-Forwarded-Proto": "https"}, follow_redirects=False)
    assert response.status_code == 303
    assert all("secure" in c.lower() for c in response.headers.get_list("set-cookie") if c.startswith("hv_"))


def test_wrong_password_is_401_and_audited(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    wrong = browser_login(client, "tina", "not the password")
    unknown = browser_login(client, "nobody", PASSWORD)
    for response in (wrong, unknown):  # the same answer: no way to learn which names exist
        assert response.status_code == 401
        assert "Wrong user name or password." in response.text and "hv_session" not in client.cookies
    token = client.post("/api/v1/auth/token", data={"username": "tina", "password": "nope nope"})
    assert token.status_code == 401 and token.headers["www-authenticate"] == "Bearer"
    assert token.json() == {"detail": "wrong user name or password"}
    rows = [(r["user"], r["action"], r["detail"], r["client"]) for r in audit(client)]
    assert rows == [("tina", "login_failed", "login page: wrong password", "testclient"),
                    ("nobody", "login_failed", "login page: unknown user", "testclient"),
                    ("tina", "login_failed", "token: wrong password", "testclient")]


def test_login_form_is_protected_against_csrf_and_open_redirects(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    form = {"username": "tina", "password": PASSWORD}
    token = login_page_token(client)
    assert client.post("/login", data=form, headers={"Origin": ORIGIN}).status_code == 403  # no token
    assert client.post("/login", data={**form, "csrf_token": "0" * 64}, headers={"Origin": ORIGIN}).status_code == 403
    evil = client.post("/login", data={**form, "csrf_token": token}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    token = login_page_token(client)
    response = client.post("/login", data={**form, "csrf_token": token, "next": "//evil.example/x"},
                           headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"


# ---- API tokens ----

def test_api_token_works_without_csrf(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    response = client.post("/api/v1/auth/token", data={"username": "tina", "password": PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer" and len(body["access_token"]) >= 40
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    # No cookie, no CSRF token, even a foreign Origin: a bearer header is never sent by a browser on its own.
    result = upload(client, {**headers, "Origin": "http://evil.example"})
    assert result.status_code == 200, result.text
    pid = result.json()["results"][0]["id"]
    review = client.post(f"/api/v1/analyses/{result.json()['analysis_id']}/review", headers=headers,
                         json={"labels": [{"prediction_id": pid, "label": "monocyte"}], "expected_version": 0})
    assert review.status_code == 200 and review.json()["predictions"][0]["reviewer"] == "tina"
    # Only the token's hash is stored.
    with app_db(client).connect() as connection:
        stored = [row[0] for row in connection.execute("SELECT token_hash FROM auth_tokens")]
    assert body["access_token"] not in stored and users.hash_token(body["access_token"]) in stored
    assert ("tina", "token") in [(r["user"], r["action"]) for r in audit(client)]


def test_disabled_user_loses_tokens_and_sessions(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    headers = bearer_headers(client, "rita", "reviewer")
    browser_login(client, "tina")
    assert client.get("/api/v1/auth/me").status_code == 200 and client.get("/api/v1/auth/me", headers=headers).json()[
        "name"] == "rita"
    users.disable_user(app_db(client), "rita")
    users.disable_user(app_db(client), "tina")
    assert client.get("/api/v1/auth/me", headers=headers).status_code == 401
    assert client.get("/api/v1/auth/me").status_code == 401
    assert scalar(client, "SELECT COUNT(*) FROM auth_tokens") == 0  # revoked, not merely refused
    assert client.post("/api/v1/auth/token", data={"username": "rita", "password": PASSWORD}).status_code == 401
    assert ("rita", "login_failed", "token: user disabled") in [(r["user"], r["action"], r["detail"])
                                                                  for r in audit(client)]
    # A reset password enables the user again, with the new password only.
    users.reset_password(app_db(client), "rita", "a new password")
    assert client.post("/api/v1/auth/token", data={"username": "rita", "password": PASSWORD}).status_code == 401
    assert client.post("/api/v1/auth/token", data={"username": "rita", "password": "a new password"}).status_code == 200


def test_a_disabled_flag_alone_refuses_tokens(client: TestClient) -> None:
    headers = bearer_headers(client, "rita", "reviewer")
    with app_db(client).transaction() as connection:  # disabled by hand, tokens left in place
        connection.execute("UPDATE users SET disabled = 1 WHERE name = 'rita'")
    assert client.get("/api/v1/auth/me", headers=headers).status_code == 401


def test_an_expired_token_is_refused(client: TestClient) -> None:
    from datetime import timedelta

    user = add_user(client, "tina", "technologist")
    token, _ = users.issue_token(app_db(client), user, "api", timedelta(seconds=-1))
    assert client.get("/api/v1/model", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # A session token is not an API token (nor the other way round).
    session, _ = users.issue_token(app_db(client), user, "session", timedelta(hours=1))
    assert client.get("/api/v1/model", headers={"Authorization": f"Bearer {session}"}).status_code == 401


# ---- CSRF on cookie sessions ----

def test_cookie_requests_need_same_origin_and_csrf_token(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    browser_login(client, "tina")
    good = dict(client.headers)
    files = [("files", ("a.png", png(), "image/png"))]

    def post(drop: tuple[str, ...] = (), **extra: str):
        headers = {k.lower(): v for k, v in good.items() if k.lower() not in drop} | {k.lower(): v for k, v in extra.items()}
        client.headers.clear()
        response = client.post("/api/v1/predict", files=files, headers=headers)
        client.headers.update(good)
        return response

    cases = {
        "no CSRF token": post(drop=("x-csrf-token",)),
        "wrong CSRF token": post(**{"X-CSRF-Token": "f" * 64}),
        "cross-origin": post(Origin="http://evil.example"),
        "cross-origin, other port": post(Origin="http://localhost:9999"),
        "Origin null": post(Origin="null"),
        "no Origin nor Referer": post(drop=("origin",)),
        "cross-site Referer": post(drop=("origin",), Referer="http://evil.example/page"),
    }
    for name, response in cases.items():
        assert response.status_code == 403, (name, response.text)
        assert isinstance(response.json()["detail"], str), name
    assert scalar(client, "SELECT COUNT(*) FROM analyses") == 0  # nothing was stored
    assert post().status_code == 200
    assert post(drop=("origin",), Referer=f"{ORIGIN}/history").status_code == 200  # Referer alone is enough
    # Reads need no token.
    client.headers.clear()
    assert client.get("/api/v1/analyses").status_code == 200


# ---- roles ----

def test_roles(client: TestClient) -> None:
    tech, rev, admin = (bearer_headers(client, name, role) for name, role in
                        (("tina", "technologist"), ("rita", "reviewer"), ("adam", "admin")))
    body = upload(client, tech).json()
    url = f"/api/v1/analyses/{body['analysis_id']}"
    label = [{"prediction_id": body["results"][0]["id"], "label": "monocyte"}]
    assert client.post(f"{url}/review", headers=tech, json={"labels": label, "expected_version": 0}).status_code == 200
    forbidden = client.post(f"{url}/signoff", headers=tech, json={"expected_version": 1})
    assert forbidden.status_code == 403 and "reviewer" in forbidden.json()["detail"]
    assert client.post(f"{url}/signoff", headers=rev, json={"expected_version": 1}).status_code == 200
    amendment = {"labels": label, "expected_version": 2, "reason": "typo"}
    for headers in (tech, rev):
        assert client.post(f"{url}/amend", headers=headers, json=amendment).status_code == 403
    assert client.post(f"{url}/amend", headers=admin, json=amendment).status_code == 200


# ---- settings ----

def test_no_auth_workstation(tmp_path: Path, database: Path | str) -> None:
    with pytest.raises(HematoVisionError, match="--no-auth"):
        Settings(db=tmp_path / "hv.db", auth=False, host="0.0.0.0")
    with make_client(tmp_path, database, auth=False) as client:
        assert client.get("/", follow_redirects=False).status_code == 200
        assert client.get("/api/v1/auth/me").json() == {"name": "local", "role": "admin", "auth": False}
        body = upload(client).json()
        pid = body["results"][0]["id"]
        reviewed = client.post(f"/api/v1/analyses/{body['analysis_id']}/review",
                               json={"labels": [{"prediction_id": pid, "label": "monocyte"}], "expected_version": 0})
        assert reviewed.json()["predictions"][0]["reviewer"] == "local"
        # Still no acting through the workstation's browser from another site.
        assert upload(client, {"Origin": "http://evil.example"}).status_code == 403
        assert [r["user"] for r in audit(client)] == ["local", "local"]  # upload, review


def test_secret_key_file_is_private_and_kept(tmp_path: Path) -> None:
    from hematovision.serve.auth import load_secret_key

    settings = Settings(db=tmp_path / "hv.db")
    key = load_secret_key(settings)
    path = tmp_path / "secret_key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_secret_key(settings) == key and len(key) >= 32
    assert load_secret_key(Settings(db=tmp_path / "hv.db", secret_key="k" * 40)) == b"k" * 40
