"""Sign-off, amendment, required optimistic locking and the audit trail, from the outside (TestClient).

Tests that take ``database`` (or ``client``) run on SQLite and on PostgreSQL (conftest.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("argon2")
from auth_helpers import PASSWORD, add_user, app_db, bearer_headers, browser_login
from fastapi.testclient import TestClient
from test_serve_auth import make_client, png

from hematovision.serve.audit import AuditEvent, record_audit
from hematovision.serve.db import Database


@pytest.fixture()
def client(tmp_path: Path, database: Path | str) -> TestClient:
    with make_client(tmp_path, database) as test_client:
        yield test_client


@pytest.fixture()
def staff(client: TestClient) -> dict[str, dict[str, str]]:
    """API-token headers of a technologist, a reviewer and an admin."""
    return {role: bearer_headers(client, name, role)
            for name, role in (("tina", "technologist"), ("rita", "reviewer"), ("adam", "admin"))}


def upload(client: TestClient, headers: dict[str, str], n: int = 2) -> dict:
    response = client.post("/api/v1/predict", headers=headers,
                           files=[("files", (f"{i}.png", png(i), "image/png")) for i in range(n)])
    assert response.status_code == 200, response.text
    return response.json()


def labels(body: dict, label: str = "monocyte") -> list[dict]:
    return [{"prediction_id": r["id"], "label": label} for r in body["results"]]


def trail(client: TestClient, analysis_id: int | None = None) -> list[tuple]:
    where = "" if analysis_id is None else f" WHERE analysis_id = {int(analysis_id)}"
    with app_db(client).connect() as connection:
        return [tuple(row) for row in connection.execute(
            f'SELECT "user", action, analysis_id, detail FROM audit{where} ORDER BY id')]


# ---- sign-off ----

def test_sign_off_makes_the_analysis_read_only(client: TestClient, staff: dict) -> None:
    body = upload(client, staff["technologist"])
    url = f"/api/v1/analyses/{body['analysis_id']}"
    reviewed = client.post(f"{url}/review", headers=staff["technologist"],
                           json={"labels": labels(body), "expected_version": 0})
    assert reviewed.status_code == 200 and reviewed.json()["signed_off_by"] is None
    signed = client.post(f"{url}/signoff", headers=staff["reviewer"], json={"expected_version": 1})
    assert signed.status_code == 200, signed.text
    analysis = signed.json()
    assert analysis["signed_off_by"] == "rita" and analysis["signed_off_at"].endswith("+00:00")
    assert analysis["version"] == 2
    assert client.get(url, headers=staff["technologist"]).json()["signed_off_by"] == "rita"
    listed = client.get("/api/v1/analyses", headers=staff["technologist"]).json()["items"][0]
    assert listed["signed_off_by"] == "rita"

    # Read-only now, for everyone, the admin included (the admin amends instead).
    for role in ("technologist", "reviewer", "admin"):
        refused = client.post(f"{url}/review", headers=staff[role],
                              json={"labels": labels(body, "neutrophil"), "expected_version": 2})
        assert refused.status_code == 409, role
        assert "signed off by rita" in refused.json()["detail"] and "admin can amend" in refused.json()["detail"]
    again = client.post(f"{url}/signoff", headers=staff["admin"], json={"expected_version": 2})
    assert again.status_code == 409 and "already signed off" in again.json()["detail"]
    final = client.get(url, headers=staff["admin"]).json()
    assert {p["final_label"] for p in final["predictions"]} == {"monocyte"} and final["version"] == 2


def test_sign_off_waits_for_flagged_images(tmp_path: Path, database: Path | str) -> None:
    with make_client(tmp_path, database, confidence_threshold=1.0) as client:  # every image flagged
        headers = bearer_headers(client, "rita", "reviewer")
        body = upload(client, headers)
        url = f"/api/v1/analyses/{body['analysis_id']}"
        refused = client.post(f"{url}/signoff", headers=headers, json={"expected_version": 0})
        assert refused.status_code == 409 and "2 image(s) flagged for review" in refused.json()["detail"]
        client.post(f"{url}/review", headers=headers, json={"labels": labels(body), "expected_version": 0})
        assert client.post(f"{url}/signoff", headers=headers, json={"expected_version": 1}).status_code == 200


def test_expected_version_is_required_and_checked(client: TestClient, staff: dict) -> None:
    body = upload(client, staff["admin"])
    url = f"/api/v1/analyses/{body['analysis_id']}"
    admin = staff["admin"]
    for route, payload in (("review", {"labels": labels(body)}), ("signoff", {}),
                           ("amend", {"labels": labels(body), "reason": "wrong class"})):
        missing = client.post(f"{url}/{route}", headers=admin, json=payload)
        assert missing.status_code == 422 and "expected_version" in missing.json()["detail"], route
        stale = client.post(f"{url}/{route}", headers=admin, json={**payload, "expected_version": 7})
        assert stale.status_code == 409 and "reload" in stale.json()["detail"], route
    assert client.get(url, headers=admin).json()["version"] == 0  # nothing was applied


def test_admin_amends_a_signed_off_analysis_with_a_reason(client: TestClient, staff: dict) -> None:
    body = upload(client, staff["technologist"])
    url = f"/api/v1/analyses/{body['analysis_id']}"
    first = body["results"][0]["id"]
    # Amending needs a signed-off analysis and a reason.
    early = client.post(f"{url}/amend", headers=staff["admin"],
                        json={"labels": labels(body), "expected_version": 0, "reason": "too early"})
    assert early.status_code == 409 and "not signed off" in early.json()["detail"]
    client.post(f"{url}/review", headers=staff["technologist"], json={"labels": labels(body), "expected_version": 0})
    client.post(f"{url}/signoff", headers=staff["reviewer"], json={"expected_version": 1})
    change = {"labels": [{"prediction_id": first, "label": "eosinophil"}], "expected_version": 2}
    assert client.post(f"{url}/amend", headers=staff["admin"], json=change).status_code == 422  # no reason
    amended = client.post(f"{url}/amend", headers=staff["admin"], json={**change, "reason": "granules missed"})
    assert amended.status_code == 200, amended.text
    analysis = amended.json()
    assert analysis["signed_off_by"] == "rita" and analysis["amended_by"] == "adam" and analysis["amended_at"]
    by_id = {p["id"]: p for p in analysis["predictions"]}
    assert by_id[first]["final_label"] == "eosinophil" and by_id[first]["reviewer"] == "adam"
    user, action, _, detail = trail(client, body["analysis_id"])[-1]
    assert (user, action) == ("adam", "amend")
    assert detail == f"reason: granules missed; 1 label(s): #{first} monocyte→eosinophil"
    # Still read-only for reviews.
    assert client.post(f"{url}/review", headers=staff["reviewer"],
                       json={"labels": labels(body), "expected_version": 3}).status_code == 409


# ---- the audit trail ----

def test_every_action_is_in_the_audit_trail_with_its_user(client: TestClient) -> None:
    add_user(client, "tina", "technologist")
    add_user(client, "rita", "reviewer")
    adam = bearer_headers(client, "adam", "admin")
    browser_login(client, "tina", "wrong password")
    browser_login(client, "tina")  # a browser session: cookies, Origin and CSRF token from here on
    body = upload(client, {})
    aid = body["analysis_id"]
    url = f"/api/v1/analyses/{aid}"
    client.get(url)
    client.post(f"{url}/review", json={"labels": labels(body), "expected_version": 0})
    client.get(f"{url}/export.csv", params={"kind": "differential"})
    client.post("/logout")
    token = client.post("/api/v1/auth/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
    client.headers.clear()
    rita = {"Authorization": f"Bearer {token}"}
    client.post(f"{url}/signoff", headers=rita, json={"expected_version": 1})
    client.post(f"{url}/amend", headers=adam, json={"labels": labels(body, "excluded")[:1], "expected_version": 2,
                                                    "reason": "not a white cell"})
    rows = trail(client)
    assert [(user, action, analysis_id) for user, action, analysis_id, _ in rows] == [
        ("tina", "login_failed", None), ("tina", "login", None),
        ("tina", "upload", aid), ("tina", "view", aid), ("tina", "review", aid), ("tina", "export", aid),
        ("tina", "logout", None), ("rita", "token", None), ("rita", "signoff", aid), ("adam", "amend", aid),
    ]
    assert rows[2][3] == "2 image(s)" and rows[5][3] == "CSV (differential)"
    # The analysis's own trail, as the page shows it: oldest first, with when and from where.
    shown = client.get(f"{url}/audit", headers=rita).json()
    assert [(r["user"], r["action"]) for r in shown] == [
        ("tina", "upload"), ("tina", "view"), ("tina", "review"), ("tina", "export"), ("rita", "signoff"),
        ("adam", "amend")]
    assert all(r["client"] == "testclient" and r["at"].endswith("+00:00") for r in shown)
    assert client.get("/api/v1/analyses/999/audit", headers=rita).status_code == 404


def test_audit_rows_cannot_be_changed_or_deleted(database: Path | str) -> None:
    db = Database(database)
    record_audit(db, "tina", "view", 1, client="10.0.0.1")
    db.close()
    # Even straight through the database's own client library, outside the app.
    if isinstance(database, Path):
        connection, refused = sqlite3.connect(database, isolation_level=None), sqlite3.IntegrityError
        statements = ["UPDATE audit SET user = 'mallory'", "DELETE FROM audit", "UPDATE audit SET detail = ''"]
    else:
        import psycopg

        connection, refused = psycopg.connect(database, autocommit=True), psycopg.IntegrityError
        statements = ["UPDATE audit SET \"user\" = 'mallory'", "DELETE FROM audit", "UPDATE audit SET detail = ''",
                      "TRUNCATE audit"]
    with connection:
        for statement in statements:
            with pytest.raises(refused, match="append-only"):
                connection.execute(statement)
        rows = connection.execute('SELECT "user", action, client FROM audit').fetchall()
    assert [tuple(row) for row in rows] == [("tina", "view", "10.0.0.1")]


def test_a_change_is_never_stored_without_its_audit_row(client: TestClient, staff: dict,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    body = upload(client, staff["technologist"])

    def broken_insert(self: AuditEvent, connection: sqlite3.Connection, analysis_id: int | None = None) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(AuditEvent, "insert", broken_insert)
    with TestClient(client.app, base_url="http://localhost", raise_server_exceptions=False) as failing:
        response = failing.post(f"/api/v1/analyses/{body['analysis_id']}/review", headers=staff["technologist"],
                                json={"labels": labels(body), "expected_version": 0})
        assert response.status_code == 500
        stored = failing.post("/api/v1/predict", headers=staff["technologist"],
                              files=[("files", ("x.png", png(9), "image/png"))])
        assert stored.status_code == 500
    monkeypatch.undo()
    analysis = client.get(f"/api/v1/analyses/{body['analysis_id']}", headers=staff["admin"]).json()
    assert analysis["version"] == 0 and analysis["n_reviewed"] == 0  # the review was rolled back with its row
    assert client.get("/api/v1/analyses", headers=staff["admin"]).json()["total"] == 1  # and the upload


def test_a_schema_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:  # the analyses table as the first release wrote it
        connection.execute("CREATE TABLE analyses (id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, "
                           "sample TEXT NOT NULL DEFAULT '', model TEXT NOT NULL, n_images INTEGER NOT NULL, "
                           "version INTEGER NOT NULL DEFAULT 0)")
        connection.execute("INSERT INTO analyses (created_at, model, n_images) VALUES ('2026-01-01', 'm', 0)")
        connection.execute("PRAGMA user_version=1")
    db = Database(path)
    assert db.get_analysis(1)["signed_off_by"] is None
    assert db.sign_off(1, "rita", expected_version=0) == 1
    assert db.get_analysis(1)["signed_off_by"] == "rita"


# ---- deletion ----

def test_only_an_admin_deletes_an_analysis_and_the_trail_keeps_it(client: TestClient, staff: dict) -> None:
    kept = upload(client, staff["technologist"], n=1)  # image 0, also in the deleted analysis
    body = upload(client, staff["technologist"], n=2)
    url = f"/api/v1/analyses/{body['analysis_id']}"
    storage = client.app.state.hv.settings.storage_dir
    files_before = sorted(p.name for p in storage.iterdir())
    for role in ("technologist", "reviewer"):
        assert client.delete(url, headers=staff[role], params={"reason": "duplicate upload"}).status_code == 403
    assert client.delete(url, headers=staff["admin"]).status_code == 422  # a reason is required
    deleted = client.delete(url, headers=staff["admin"], params={"reason": "duplicate upload"})
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"analysis_id": body["analysis_id"], "predictions": 2, "reviews": 0, "files": 1}
    assert client.get(url, headers=staff["admin"]).status_code == 404
    assert client.delete(url, headers=staff["admin"], params={"reason": "again"}).status_code == 404
    # The shared image stays for the other analysis; only the deleted one's own file is gone.
    assert len(sorted(p.name for p in storage.iterdir())) == len(files_before) - 1
    image = kept["results"][0]["id"]
    assert client.get(f"/api/v1/predictions/{image}/image", headers=staff["admin"]).status_code == 200
    assert ("adam", "delete", body["analysis_id"], "deleted: duplicate upload") in trail(client, body["analysis_id"])
