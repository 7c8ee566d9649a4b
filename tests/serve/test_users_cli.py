"""``hematovision users`` and ``hematovision audit export``: what they store, print and refuse (one line each)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("argon2")

from hematovision.cli import main
from hematovision.serve import users
from hematovision.serve.audit import record_audit
from hematovision.serve.db import Database


def hv(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
       stdin: str | None = None) -> tuple[int, str, str]:
    """Run the command line; return the exit code, stdout and stderr."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("hematovision: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def test_add_list_disable_and_reset(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "hv.db")
    code, out, _ = hv(["users", "add", "admin", "--role", "admin", "--db", db, "--password-stdin"], capsys,
                      monkeypatch, "s3cret pass\n")
    assert code == 0 and "added admin 'admin'" in out and "hematovision serve --db" in out
    hv(["users", "add", "tina", "--role", "technologist", "--db", db, "--password-stdin"], capsys, monkeypatch,
       "tina's password\n")
    database = Database(db)
    with sqlite3.connect(db) as connection:
        stored = connection.execute("SELECT password_hash FROM users WHERE name = 'tina'").fetchone()[0]
    assert stored.startswith("$argon2id$") and "tina's password" not in stored  # hashed, never in clear
    assert users.check_login(database, "tina", "tina's password")[0] is not None

    code, out, _ = hv(["users", "list", "--db", db], capsys, monkeypatch)
    assert code == 0 and [line.split()[:3] for line in out.splitlines()] == [["admin", "admin", "active"],
                                                                           ["tina", "technologist", "active"]]
    assert hv(["users", "disable", "tina", "--db", db], capsys, monkeypatch)[0] == 0
    assert users.check_login(database, "tina", "tina's password") == (None, "user disabled")
    assert "disabled" in hv(["users", "list", "--db", db], capsys, monkeypatch)[1].splitlines()[1]

    code, out, _ = hv(["users", "reset-password", "tina", "--db", db, "--password-stdin"], capsys, monkeypatch,
                      "a brand new one\r\n")
    assert code == 0 and "old sessions" in out
    assert users.check_login(database, "tina", "a brand new one")[0] is not None  # enabled again, new password
    assert users.check_login(database, "tina", "tina's password")[0] is None
    with sqlite3.connect(db) as connection:  # user changes are audited, as the command line's OS user
        actions = connection.execute("SELECT user, action, detail FROM audit ORDER BY id").fetchall()
    assert [a[1:] for a in actions] == [("user_add", "admin as admin"), ("user_add", "tina as technologist"),
                                        ("user_disable", "tina"), ("user_password", "password reset for tina")]
    assert all(a[0].startswith("cli:") for a in actions)


def test_user_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    db = str(tmp_path / "hv.db")
    hv(["users", "add", "tina", "--role", "technologist", "--db", db, "--password-stdin"], capsys, monkeypatch,
       "long enough\n")
    cases = [
        (["users", "add", "TINA", "--role", "reviewer", "--password-stdin"], "long enough\n", ("'TINA' exists already",)),
        (["users", "add", "rita", "--role", "boss", "--password-stdin"], "long enough\n",
         ("unknown role 'boss'", "technologist")),
        (["users", "add", "rita", "--role", "reviewer", "--password-stdin"], "\n", ("password is empty",)),
        (["users", "add", "rita", "--role", "reviewer", "--password-stdin"], "short\n", ("too short",)),
        (["users", "add", "ri ta", "--role", "reviewer", "--password-stdin"], "long enough\n", ("invalid user name",)),
        (["users", "add", "local", "--role", "admin", "--password-stdin"], "long enough\n", ("reserved",)),
        (["users", "disable", "nobody"], None, ("no user named 'nobody'",)),
        (["users", "reset-password", "nobody", "--password-stdin"], "long enough\n", ("no user named",)),
    ]
    for argv, stdin, words in cases:
        code, _, err = hv([*argv, "--db", db], capsys, monkeypatch, stdin)
        one_line_error(code, err, *words)
    code, _, err = hv(["users", "add", "rita", "--role", "reviewer", "--db", str(tmp_path / "no" / "hv.db"),
                       "--password-stdin"], capsys, monkeypatch, "long enough\n")
    one_line_error(code, err, "does not exist")
    one_line_error(*hv(["users", "list", "--db", str(tmp_path / "other.db")], capsys, monkeypatch)[::2], "no database")
    # Without --password-stdin and no terminal to ask on: say so, do not hang or read a pipe by surprise.
    code, _, err = hv(["users", "add", "rita", "--role", "reviewer", "--db", db], capsys, monkeypatch, "")
    one_line_error(code, err, "--password-stdin")
    assert [u["name"] for u in users.list_users(Database(db))] == ["tina"]  # nothing half-made


def test_no_auth_needs_a_local_host(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = hv(["serve", "--model", str(tmp_path), "--no-auth", "--host", "0.0.0.0", "--db",
                       str(tmp_path / "hv.db")], capsys, monkeypatch)
    one_line_error(code, err, "--no-auth", "127.0.0.1")


def test_audit_export(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    db_path = tmp_path / "hv.db"
    db = Database(db_path)
    record_audit(db, "tina", "upload", 1, "2 image(s)", "10.0.0.7")
    record_audit(db, "=HYPERLINK(1)", "login_failed", detail="login page: unknown user", client="10.0.0.8")
    with sqlite3.connect(db_path) as connection:  # one old row (triggers forbid UPDATE: insert it as it was)
        connection.execute("INSERT INTO audit (at, user, action, analysis_id, detail, client) VALUES "
                           "('2020-05-01T10:00:00.000+00:00', 'old', 'view', 1, '', NULL)")

    out_csv = tmp_path / "trail.csv"
    code, _, err = hv(["audit", "export", "--db", str(db_path), "--since", "2021-01-01", "--out", str(out_csv)],
                      capsys, monkeypatch)
    assert code == 0 and "wrote 2 audit row(s)" in err
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8")))
    assert [(r["user"], r["action"], r["analysis_id"], r["client"]) for r in rows] == [
        ("tina", "upload", "1", "10.0.0.7"), ("'=HYPERLINK(1)", "login_failed", "", "10.0.0.8")]  # no formula

    out_jsonl = tmp_path / "trail.jsonl"
    assert hv(["audit", "export", "--db", str(db_path), "--out", str(out_jsonl)], capsys, monkeypatch)[0] == 0
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [line["user"] for line in lines] == ["tina", "=HYPERLINK(1)", "old", "cli:" + lines[3]["user"][4:]]
    assert lines[3]["action"] == "audit_export"  # reading the trail is itself recorded

    # To stdout; a time with a zone is compared in UTC (the old row is at 10:00 UTC).
    for since, has_old in (("2020-05-01T11:30+02:00", True), ("2020-05-01T11:30+01:00", False)):
        code, out, _ = hv(["audit", "export", "--db", str(db_path), "--since", since], capsys, monkeypatch)
        assert code == 0 and (",old," in out) == has_old, since
    one_line_error(*hv(["audit", "export", "--db", str(db_path), "--out", "t.xlsx"], capsys, monkeypatch)[::2],
                   ".csv or .jsonl")
    one_line_error(*hv(["audit", "export", "--db", str(db_path), "--since", "last week"], capsys, monkeypatch)[::2],
                   "not a date")
