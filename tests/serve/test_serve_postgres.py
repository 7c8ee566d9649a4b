"""Several app processes on one PostgreSQL database (and concurrent writers on either database).

The API tests themselves run on both databases through the ``database`` fixture (conftest.py); this file
checks what only several writers show: two real ``hematovision serve`` processes sharing one PostgreSQL
database and one image folder, and two connections racing to review the same analysis.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from postgres_cluster import PostgresCluster
from server_process import free_port, wait_until_healthy

from hematovision.cli import main
from hematovision.serve import users
from hematovision.serve.audit import AuditEvent
from hematovision.serve.db import ConflictError, Database, PredictionRecord
from hematovision.serve.sql import Connection, describe, is_postgres

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("argon2")

PASSWORD = "shared database password"


def record(name: str) -> PredictionRecord:
    return PredictionRecord(f"{name}.png", f"aa/{name}.png", "0" * 64, 40, 40, "a", 0.9, {"a": 0.9, "b": 0.1}, None,
                            False, [])


def test_concurrent_reviews_of_one_analysis_never_lose_an_update(database: Path | str) -> None:
    # Two Database objects: two processes' worth of connections to the same database.
    first, second = Database(database), Database(database)
    try:
        analysis = first.add_analysis("S", "m", [record("x"), record("y")])
        x, y = (p["id"] for p in first.get_analysis(analysis)["predictions"])
        inside = threading.Event()

        def slow_audit(connection: Connection, analysis_id: int) -> None:
            # The first review is inside its transaction, past its version check, when the second one starts.
            AuditEvent("tina", "review").insert(connection, analysis_id)
            inside.set()
            time.sleep(0.5)

        thread = threading.Thread(target=first.review, args=(analysis, {x: "b"}, "tina", ["a", "b"], 0),
                                  kwargs={"audit": slow_audit})
        thread.start()
        assert inside.wait(30)
        with pytest.raises(ConflictError, match="at version 1, not 0"):  # it waited, then saw the first commit
            second.review(analysis, {y: "b"}, "rita", ["a", "b"], 0)
        thread.join()
        stored = second.get_analysis(analysis)
        assert stored["version"] == 1 and [p["reviewed_label"] for p in stored["predictions"]] == ["b", None]
        assert [(r["reviewer"], r["prediction_id"]) for r in second.review_log(analysis)] == [("tina", x)]
    finally:
        first.close()
        second.close()


def test_user_names_are_unique_whatever_their_case(database: Path | str) -> None:
    db = Database(database)
    try:
        users.add_user(db, "Tina", "technologist", PASSWORD)
        with pytest.raises(users.UserError, match="exists already"):  # the database's unique index, either database
            users.add_user(db, "tina", "admin", PASSWORD)
        assert users.check_login(db, "TINA", PASSWORD)[0] == users.User(1, "Tina", "technologist")
        users.disable_user(db, "tINA")
        assert users.check_login(db, "Tina", PASSWORD) == (None, "user disabled")
    finally:
        db.close()


def test_postgresql_urls_are_told_apart_and_passwords_stay_out_of_messages() -> None:
    assert is_postgres("postgresql://hv@db.lab/hv") and is_postgres("postgres://hv@db.lab/hv")
    assert not is_postgres("hv.db") and not is_postgres(Path("postgresql:/x"))
    assert describe("postgresql://hv:s3cret@db.lab:5432/hv") == "postgresql://hv:***@db.lab:5432/hv"
    assert describe("/srv/hv.db") == "/srv/hv.db"


def test_an_unreachable_postgresql_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("psycopg")
    url = f"postgresql://nobody:s3cret@/hv?host={tmp_path}&port=1"  # no server has a socket there
    code = main(["users", "list", "--db", url])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "cannot connect to PostgreSQL at postgresql://nobody:***@/hv" in err and "s3cret" not in err


def serve(tiny_run: Path, url: str, storage: Path, port: int, log: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEMATOVISION_HOME": str(home),
           # Every process signs CSRF tokens with the same key (docs/deployment.md).
           "HEMATOVISION_SECRET_KEY": "a shared secret for the processes of one site, 32+ chars"}
    return subprocess.Popen([sys.executable, "-m", "hematovision", "serve", "--model", str(tiny_run), "--port",
                             str(port), "--db", url, "--storage", str(storage), "--threads", "1", "--log-level",
                             "warning"], stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def test_two_server_processes_share_one_postgresql_database(tiny_run: Path, postgres_cluster: PostgresCluster,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from test_serve_process import png

    url, storage = postgres_cluster.new_database(), tmp_path / "shared-images"
    # The users come from the command line, into the same database.
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "rita", "--role", "reviewer", "--db", url, "--password-stdin"]) == 0
    assert "added reviewer 'rita' to postgresql://" in capsys.readouterr().out

    # Both start at once on an empty schema: the second waits for the first's tables (an advisory lock).
    ports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    servers = [serve(tiny_run, url, storage, port, log, tmp_path / f"home{i}")
               for i, (port, log) in enumerate(zip(ports, logs))]
    try:
        for server, port, log in zip(servers, ports, logs):
            wait_until_healthy(server, f"http://127.0.0.1:{port}", log)
        a, b = (httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) for port in ports)
        token = a.post("/api/v1/auth/token", data={"username": "rita", "password": PASSWORD}).json()["access_token"]
        for client in (a, b):  # a token issued by one process is valid in the other: it is a row of the database
            client.headers["Authorization"] = f"Bearer {token}"

        uploaded = a.post("/api/v1/predict", files=[("files", ("a.png", png(1))), ("files", ("b.png", png(2)))],
                          data={"sample": "two processes"})
        assert uploaded.status_code == 200, uploaded.text
        body = uploaded.json()
        url_b = f"/api/v1/analyses/{body['analysis_id']}"
        seen = b.get(url_b).json()
        assert seen["sample"] == "two processes" and [p["filename"] for p in seen["predictions"]] == ["a.png", "b.png"]
        image = b.get(seen["predictions"][1]["image_url"])  # written by A, served by B: the shared folder
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"

        labels = [{"prediction_id": r["id"], "label": "neutrophil"} for r in body["results"]]
        reviewed = b.post(f"{url_b}/review", json={"labels": labels, "expected_version": 0})
        assert reviewed.status_code == 200 and reviewed.json()["version"] == 1
        stale = a.post(f"{url_b}/review", json={"labels": labels, "expected_version": 0})  # A's page was older
        assert stale.status_code == 409 and "reload" in stale.json()["detail"]
        assert a.post(f"{url_b}/signoff", json={"expected_version": 1}).status_code == 200
        late = b.post(f"{url_b}/review", json={"labels": labels, "expected_version": 2})
        assert late.status_code == 409 and "signed off by rita" in late.json()["detail"]

        trail = [(row["user"], row["action"]) for row in a.get(f"{url_b}/audit").json()]
        assert trail == [("rita", "upload"), ("rita", "view"), ("rita", "review"), ("rita", "signoff")]
        second = b.post("/api/v1/predict", files=[("files", ("c.png", png(3)))]).json()
        assert second["analysis_id"] == body["analysis_id"] + 1  # one sequence of ids for every process
        for client in (a, b):  # ids past 64 bits name nothing: a client error, never a 500
            assert client.get(f"/api/v1/analyses/{2**63}").status_code in (404, 422)
            assert client.get("/api/v1/analyses", params={"q": str(2**64)}).json()["total"] == 0
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)
