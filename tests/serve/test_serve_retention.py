"""Patient data over time: ``db backup`` while the server writes, ``db purge``, deleting one analysis, FULL sync.

Checked from the outside: the rows and files left in the database and the storage folder, the
backup folder (it passes SQLite's integrity check and a server restored from it shows the
images), the audit trail, and the commands' exit codes and lines. Purging and deleting run on SQLite
and on PostgreSQL (the ``database`` fixture, conftest.py); ``db backup`` is SQLite's, and refuses
PostgreSQL with the pg_dump command to use.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hematovision.cli import main
from hematovision.serve.audit import AuditEvent, command_line_user, record_audit
from hematovision.serve.db import Database, NotFoundError, PredictionRecord
from hematovision.serve.retention import BACKUP_DB, BACKUP_IMAGES, backup, delete_analysis

OLD = "2020-01-01T00:00:00.000+00:00"


def fake_predictor() -> SimpleNamespace:
    """A loaded run as ``Predictor.from_run_dir`` gives it, from an untrained tiny_cnn (for the app)."""
    from hematovision.data.classes import WBC5
    from hematovision.data.transforms import Preprocessing
    from hematovision.models import create_model

    torch.manual_seed(0)
    return SimpleNamespace(class_names=list(WBC5), prep=Preprocessing(32), model=create_model("tiny_cnn", 5),
                           temperature=1.0, card={"backbone": "tiny_cnn"})


def store(db: Database, storage: Path, names: list[str], sample: str = "S") -> int:
    """An analysis with one prediction per stored file name, its files written first (as the server does)."""
    records = []
    for name in names:
        path = storage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(b"pixels of " + name.encode())
        records.append(PredictionRecord(f"{name}.png", name, "0" * 64, 40, 40, "a", 0.9, {"a": 0.9, "b": 0.1}, None,
                                        False, []))
    return db.add_analysis(sample, "model", records)


def make_old(db: Database, *analysis_ids: int) -> None:
    with db.transaction() as connection:
        connection.executemany("UPDATE analyses SET created_at = ? WHERE id = ?", [(OLD, i) for i in analysis_ids])


def count(db: Database, table: str) -> int:
    with db.connect() as connection:
        return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def files(storage: Path) -> set[str]:
    return {p.relative_to(storage).as_posix() for p in storage.rglob("*") if p.is_file()}


SQLITE_ONLY = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


@pytest.fixture()
def server_data(tmp_path: Path, database: Path | str) -> Iterator[SimpleNamespace]:
    """Two old analyses (one sharing an image with a new one), one new analysis, reviews and audit rows."""
    db, storage = Database(database), tmp_path / "images"
    old1 = store(db, storage, ["aa/old1.png", "ss/shared.png"], sample="ACC-0001")
    old2 = store(db, storage, ["bb/old2.png"], sample="ACC-0002")
    new = store(db, storage, ["ss/shared.png", "cc/new.png"], sample="ACC-0003")
    first = db.get_analysis(old1)["predictions"][0]["id"]
    db.review(old1, {first: "b"}, "tech", ["a", "b", "excluded"])
    make_old(db, old1, old2)
    record_audit(db, "tech", "upload", old1)
    yield SimpleNamespace(db=db, storage=storage, old1=old1, old2=old2, new=new, path=database)
    db.close()


# ---- synchronous=FULL ----

def test_the_database_is_synchronous_full_by_default(tmp_path: Path) -> None:
    from hematovision.serve.settings import Settings

    with Database(tmp_path / "a.db").connect() as connection:
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Database(tmp_path / "b.db", synchronous="normal").connect() as connection:
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, when a lab chooses it
    assert Settings().db_synchronous == "FULL"
    assert Settings.from_env({"HEMATOVISION_DB_SYNCHRONOUS": "NORMAL"}).db_synchronous == "NORMAL"


# ---- backup ----

def test_backup_is_consistent_while_the_server_writes(tmp_path: Path) -> None:
    db, storage = Database(tmp_path / "hv.db"), tmp_path / "images"
    store(db, storage, ["00/first.png"])
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:  # an upload every few milliseconds, each 3 images in one transaction
        i = 0
        while not stop.is_set():
            written.append(store(db, storage, [f"{i % 256:02x}/w{i}-{k}.png" for k in range(3)]))
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 5:
            time.sleep(0.01)
        summaries = [backup(tmp_path / "hv.db", tmp_path / f"backup{n}", storage) for n in range(3)]
        after = len(written)
        while len(written) < after + 3:  # the writer goes on past the last backup
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    for n, summary in enumerate(summaries):
        folder = tmp_path / f"backup{n}"
        copy = sqlite3.connect(folder / BACKUP_DB)
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # One snapshot: every analysis has all its predictions, and every prediction's image was copied.
        partial = copy.execute("SELECT COUNT(*) FROM analyses a WHERE n_images != "
                               "(SELECT COUNT(*) FROM predictions p WHERE p.analysis_id = a.id)").fetchone()[0]
        names = [row[0] for row in copy.execute("SELECT stored_name FROM predictions")]
        analyses = copy.execute("SELECT COUNT(*) FROM analyses").fetchone()[0]
        copy.close()
        assert partial == 0 and summary.analyses == analyses and 1 < analyses < len(written) + 1
        assert all((folder / BACKUP_IMAGES / name).is_file() for name in names)
        assert summary.missing_images == 0 and summary.integrity == "ok"
        assert not (folder / (BACKUP_DB + "-wal")).exists()  # a self-contained file
        Database(folder / BACKUP_DB).close()  # opens as a server database
    assert summaries[0].analyses <= summaries[1].analyses <= summaries[2].analyses
    assert count(db, "analyses") == len(written) + 1  # the writes went on meanwhile


@SQLITE_ONLY
def test_a_server_restored_from_a_backup_shows_the_images(server_data: SimpleNamespace, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from hematovision.serve.app import create_app
    from hematovision.serve.settings import Settings

    code = main(["db", "backup", str(tmp_path / "bk"), "--db", str(server_data.path), "--storage",
                 str(server_data.storage)])
    out = capsys.readouterr().out
    assert code == 0 and f"3 analyses, 5 predictions) and 4 image(s) from {server_data.storage} to {tmp_path / 'bk'}" in out
    assert (tmp_path / "bk" / "backup.json").is_file()
    # The backup is itself audited (it copies every patient record).
    with server_data.db.connect() as connection:
        assert connection.execute("SELECT user FROM audit WHERE action = 'backup'").fetchone()[0] == command_line_user()
    settings = Settings(db=tmp_path / "bk" / BACKUP_DB, storage=tmp_path / "bk" / BACKUP_IMAGES, auth=False)
    with TestClient(create_app(settings, predictor=fake_predictor()), base_url="http://localhost") as client:
        analysis = client.get(f"/api/v1/analyses/{server_data.new}").json()
        image = client.get(analysis["predictions"][1]["image_url"])
        assert image.status_code == 200 and image.content == b"pixels of cc/new.png"


@SQLITE_ONLY
@pytest.mark.parametrize("problem", ["destination exists", "no database"])
def test_backup_refusals_are_one_line(problem: str, server_data: SimpleNamespace, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    destination = tmp_path / "bk"
    db = server_data.path if problem == "destination exists" else tmp_path / "none.db"
    if problem == "destination exists":
        destination.mkdir()
        (destination / "keep.txt").write_text("mine")
    code = main(["db", "backup", str(destination), "--db", str(db), "--storage", str(server_data.storage)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("exists already" if problem == "destination exists" else "no database at") in err
    assert not (tmp_path / "bk.partial").exists()
    if problem == "destination exists":
        assert (destination / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_backup_of_postgresql_says_to_use_pg_dump(server_data: SimpleNamespace, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    code = main(["db", "backup", str(tmp_path / "bk"), "--db", server_data.path, "--storage", str(server_data.storage)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "pg_dump --format=custom" in err and str(server_data.storage) in err
    assert not (tmp_path / "bk").exists() and not (tmp_path / "bk.partial").exists()


# ---- purge ----

def test_purge_is_a_dry_run_without_yes(server_data: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    before = (count(server_data.db, "analyses"), count(server_data.db, "predictions"), files(server_data.storage))
    code = main(["db", "purge", "--older-than", "30", "--db", str(server_data.path), "--storage",
                 str(server_data.storage)])
    out = capsys.readouterr().out
    assert code == 0 and "dry run: 2 analyses, 3 predictions, 1 reviews, 2 image files created before" in out
    assert (count(server_data.db, "analyses"), count(server_data.db, "predictions"), files(server_data.storage)) == before


def test_purge_deletes_old_records_and_images_and_keeps_the_audit_trail(server_data: SimpleNamespace,
                                                                        capsys: pytest.CaptureFixture) -> None:
    db, storage = server_data.db, server_data.storage
    orphan_old, orphan_new = storage / "dd" / "orphan-old.png", storage / "dd" / "orphan-new.png"
    orphan_old.parent.mkdir()
    orphan_old.write_bytes(b"left by a failed upload")
    orphan_new.write_bytes(b"an upload in flight")
    os.utime(orphan_old, (time.time() - 90 * 86400,) * 2)
    audit_before = count(db, "audit")
    code = main(["db", "purge", "--older-than", "30", "--yes", "--db", str(server_data.path), "--storage", str(storage)])
    out = capsys.readouterr().out
    assert code == 0 and "deleted 2 analyses, 3 predictions, 1 reviews, 2 image files, 1 orphaned image files" in out
    with db.connect() as connection:
        assert [r[0] for r in connection.execute("SELECT id FROM analyses")] == [server_data.new]
        assert connection.execute("SELECT COUNT(*) FROM predictions WHERE analysis_id != ?",
                                  (server_data.new,)).fetchone()[0] == 0
        assert connection.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 0
        purges = connection.execute(
            "SELECT \"user\", analysis_id FROM audit WHERE action = 'purge' ORDER BY id").fetchall()
        samples = [r[0] for r in connection.execute("SELECT detail FROM audit")]
    # The shared image stays for the new analysis; the recent orphan may belong to an upload in flight.
    assert files(storage) == {"ss/shared.png", "cc/new.png", "dd/orphan-new.png"}
    assert [tuple(r) for r in purges] == [(command_line_user(), server_data.old1), (command_line_user(), server_data.old2),
                                          (command_line_user(), None)]
    assert count(db, "audit") == audit_before + 3  # the trail kept its rows and gained the purge's
    assert not any("ACC-000" in detail for detail in samples)  # no sample name in the trail
    assert db.get_analysis(server_data.new)["n_images"] == 2


@pytest.mark.parametrize("days", ["-1", "inf", "nan"])
def test_purge_with_a_bad_age_is_one_line(days: str, server_data: SimpleNamespace,
                                          capsys: pytest.CaptureFixture) -> None:
    code = main(["db", "purge", "--older-than", days, "--yes", "--db", str(server_data.path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    expected = f"hematovision: error: --older-than must be a number of days, 0 or more, not {float(days)!r}"
    assert err.strip().splitlines() == [expected]
    assert count(server_data.db, "analyses") == 3


# ---- delete one analysis (the admin's DELETE route calls this) ----

def test_delete_analysis_removes_its_rows_and_only_its_own_files(server_data: SimpleNamespace) -> None:
    db, storage = server_data.db, server_data.storage
    deleted = delete_analysis(db, storage, server_data.old1, audit=AuditEvent("admin", "delete", "by request").insert)
    assert (deleted.analysis_ids, deleted.predictions, deleted.reviews, deleted.files) == ([server_data.old1], 2, 1, 1)
    assert files(storage) == {"ss/shared.png", "bb/old2.png", "cc/new.png"}  # shared.png is the new analysis's too
    with pytest.raises(NotFoundError):
        db.get_analysis(server_data.old1)
    with db.connect() as connection:
        assert connection.execute("SELECT COUNT(*) FROM predictions WHERE analysis_id = ?",
                                  (server_data.old1,)).fetchone()[0] == 0
        row = connection.execute("SELECT \"user\", action, analysis_id FROM audit WHERE action = 'delete'").fetchone()
        assert tuple(row) == ("admin", "delete", server_data.old1)
        assert connection.execute("SELECT COUNT(*) FROM audit WHERE action = 'upload'").fetchone()[0] == 1
    with pytest.raises(NotFoundError):
        delete_analysis(db, storage, server_data.old1)
    # Deleting the last analysis naming shared.png removes it.
    delete_analysis(db, storage, server_data.new)
    assert files(storage) == {"bb/old2.png"}


def test_a_failing_audit_hook_deletes_nothing(server_data: SimpleNamespace) -> None:
    def broken(_connection: sqlite3.Connection, _analysis_id: int) -> None:
        raise RuntimeError("audit table unavailable")

    with pytest.raises(RuntimeError):
        delete_analysis(server_data.db, server_data.storage, server_data.old2, audit=broken)
    assert server_data.db.get_analysis(server_data.old2)["n_images"] == 1
    assert "bb/old2.png" in files(server_data.storage)
