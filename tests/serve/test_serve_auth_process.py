"""Login, tokens and CSRF against a real ``hematovision serve`` process, users made with ``hematovision users``."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("argon2")

# The run folder, port and start-up helpers of the kill -9 test (tests/serve is on sys.path).
from server_process import free_port
from test_serve_process import png, pytestmark, start  # noqa: F401

PASSWORD = "process password"


def hv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hematovision", *args], input=stdin, text=True, capture_output=True,
                          timeout=120)


def test_login_and_tokens_on_a_real_server(tiny_run: Path, tmp_path: Path) -> None:
    db, port, log = tmp_path / "hv.db", free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    server = start([sys.executable, "-m", "hematovision", "serve", "--model", str(tiny_run), "--port", str(port),
                    "--db", str(db), "--threads", "1", "--log-level", "warning"], port, log)
    try:
        # An empty user table: the server says how to make the first admin, and lets nobody in.
        assert "hematovision users add admin --role admin" in log.read_text()
        for path in ("/api/v1/model", "/api/v1/analyses", "/api/v1/analyses/1/audit"):
            response = httpx.get(base + path, timeout=30)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
        assert httpx.get(base + "/", timeout=30).status_code == 303

        # Users are added with the command line while the server runs (same database).
        made = hv("users", "add", "admin", "--role", "admin", "--db", str(db), "--password-stdin", stdin=PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        assert hv("users", "add", "tina", "--role", "technologist", "--db", str(db), "--password-stdin",
                  stdin=PASSWORD + "\n").returncode == 0

        # The login page: a session cookie, and the CSRF token for changes.
        with httpx.Client(base_url=base, timeout=30) as browser:
            form = browser.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
            wrong = browser.post("/login", data={"username": "tina", "password": "nope nope", "csrf_token": csrf},
                                 headers={"Origin": base})
            assert wrong.status_code == 401
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', wrong.text).group(1)  # type: ignore[union-attr]
            login = browser.post("/login", data={"username": "tina", "password": PASSWORD, "csrf_token": csrf},
                                 headers={"Origin": base})
            assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
            assert browser.get("/api/v1/auth/me").json()["name"] == "tina"
            files = [("files", ("a.png", png(1)))]
            assert browser.post("/api/v1/predict", files=files, headers={"Origin": base}).status_code == 403
            assert browser.post("/api/v1/predict", files=files, headers={
                "Origin": "http://evil.example", "X-CSRF-Token": browser.cookies["hv_csrf"]}).status_code == 403
            uploaded = browser.post("/api/v1/predict", files=files,
                                    headers={"Origin": base, "X-CSRF-Token": browser.cookies["hv_csrf"]})
            assert uploaded.status_code == 200, uploaded.text
            analysis_id = uploaded.json()["analysis_id"]

        # An API token for scripts; disabling the user ends it at once.
        token = httpx.post(f"{base}/api/v1/auth/token", data={"username": "admin", "password": PASSWORD}, timeout=30)
        assert token.status_code == 200 and token.json()["token_type"] == "bearer"
        bearer = {"Authorization": f"Bearer {token.json()['access_token']}"}
        trail = httpx.get(f"{base}/api/v1/analyses/{analysis_id}/audit", headers=bearer, timeout=30).json()
        assert [(r["user"], r["action"], r["client"]) for r in trail] == [("tina", "upload", "127.0.0.1")]
        assert hv("users", "disable", "admin", "--db", str(db)).returncode == 0
        assert httpx.get(f"{base}/api/v1/model", headers=bearer, timeout=30).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)

    exported = hv("audit", "export", "--db", str(db), "--since", "2000-01-01")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert [(r["user"], r["action"]) for r in rows if not r["user"].startswith("cli:")] == [
        ("tina", "login_failed"), ("tina", "login"), ("tina", "upload"), ("admin", "token")]


def test_no_auth_is_refused_off_localhost(tiny_run: Path, tmp_path: Path) -> None:
    refused = hv("serve", "--model", str(tiny_run), "--no-auth", "--host", "0.0.0.0", "--db", str(tmp_path / "hv.db"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--no-auth" in refused.stderr and "Traceback" not in refused.stderr
