"""Patient data over time: backups, deleting one analysis, and purging everything older than N days.

The server keeps two things per analysis: rows in the database (``analyses``,
``predictions``, ``reviews``) and image files in the storage folder, named by content
(``ab/abcdef....png``), so an image uploaded twice is stored once and may belong to several
analyses. Deleting is therefore: rows first, in one transaction (with its audit row), then only
the files no remaining prediction names. The audit trail itself is never deleted: its rows name
analyses by id and hold no sample names (see :mod:`hematovision.serve.audit`).

A backup is a folder::

    BACKUP/
      hematovision.db   a consistent copy made with SQLite's online backup API while the server runs
      images/           the image files the copied rows name (same layout as the storage folder)
      backup.json       when, from where, counts, and the copy's integrity check

Restore by serving from it (``hematovision serve --db BACKUP/hematovision.db --storage BACKUP/images``)
or by copying both back. A PostgreSQL database is backed up with ``pg_dump`` instead (its own consistent
snapshot; :func:`backup` refuses it and says so). Used by ``hematovision db backup|purge`` and the admin's
delete route; deleting and purging work on both databases.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hematovision.errors import HematoVisionError
from hematovision.serve.db import AuditHook, Database, NotFoundError
from hematovision.serve.sql import Connection, describe, is_postgres

BACKUP_DB = "hematovision.db"
BACKUP_IMAGES = "images"
BACKUP_MANIFEST = "backup.json"
PURGE_BATCH = 100  # analyses per transaction: the server's writers wait for one batch, not for the whole purge
ORPHAN_GRACE_SECONDS = 3600  # an upload writes its images before its rows commit; younger files may be in flight


class RetentionError(HematoVisionError):
    """A backup or purge cannot be done as asked (the message says why)."""


@dataclass
class Deleted:
    """What a delete or purge removed (or, in a dry run, would remove).

    Attributes:
        analysis_ids: the analyses, by id.
        predictions: prediction rows.
        reviews: review rows.
        files: image files removed (files still named by other analyses are kept).
        orphan_files: image files no analysis named (left by uploads that failed), removed by a purge.
        missing_files: files the rows named that were already gone.
    """

    analysis_ids: list[int] = field(default_factory=list)
    predictions: int = 0
    reviews: int = 0
    files: int = 0
    orphan_files: int = 0
    missing_files: int = 0

    def add(self, other: Deleted) -> None:
        """Add another batch's counts to these."""
        self.analysis_ids += other.analysis_ids
        for name in ("predictions", "reviews", "files", "orphan_files", "missing_files"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def describe(self) -> str:
        """One line of counts, for the command line and the audit trail (no sample names)."""
        return (f"{len(self.analysis_ids)} analyses, {self.predictions} predictions, {self.reviews} reviews, "
                f"{self.files} image files" + (f", {self.orphan_files} orphaned image files" if self.orphan_files else ""))


def delete_analysis(db: Database, storage_dir: str | Path, analysis_id: int, audit: AuditHook | None = None) -> Deleted:
    """Remove one analysis for good: its predictions, reviews and analysis row, then its image files.

    For the admin's ``DELETE /api/v1/analyses/{id}`` route and ``hematovision db purge``. The rows
    go in one transaction, together with the audit row when ``audit`` is given (pass
    ``AuditEvent(user, "delete", ...).insert``), so the deletion is never stored without its
    audit row. Image files are removed after the commit, and only those that no other
    prediction still names (the storage is content-addressed: the same image uploaded in two
    analyses is one file). The audit trail is not touched.

    Args:
        db: the server's database.
        storage_dir: the server's image folder (``Settings.storage_dir``).
        analysis_id: the analysis to delete.
        audit: writes the audit row inside the deleting transaction (see :data:`~hematovision.serve.db.AuditHook`).

    Returns:
        What was removed.

    Raises:
        NotFoundError: no analysis has this id (nothing is changed).
    """
    with db.transaction() as connection:
        # Locked (on PostgreSQL) before its rows go: a review of it in another process waits, then finds it gone.
        exists = connection.execute("SELECT 1 FROM analyses WHERE id = ?" + db.backend.for_update,
                                    (analysis_id,)).fetchone()
        if exists is None:
            raise NotFoundError(f"analysis {analysis_id} does not exist")
        deleted, unused = _delete_rows(connection, [analysis_id])
        if audit is not None:
            audit(connection, analysis_id)
    _remove_files(Path(storage_dir), unused, deleted)
    return deleted


def purge_cutoff(older_than_days: float, now: datetime | None = None) -> str:
    """The ``created_at`` text before which analyses are purged (UTC, as the database stores it).

    Raises:
        RetentionError: ``older_than_days`` is negative or not a number.
    """
    if not isinstance(older_than_days, (int, float)) or not 0 <= older_than_days < math.inf:
        raise RetentionError(f"--older-than must be a number of days, 0 or more, not {older_than_days!r}")
    try:
        moment = (now or datetime.now(timezone.utc)) - timedelta(days=older_than_days)
    except OverflowError:  # before the year 1: nothing is that old
        moment = datetime.min.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def purge_candidates(db: Database, cutoff: str) -> Deleted:
    """What :func:`purge` with this cutoff would remove, without changing anything (the dry run).

    ``files`` counts the image files only those analyses name; orphaned files are not counted.
    """
    older = "SELECT id FROM analyses WHERE created_at < ?"
    with db.connect() as connection:
        ids = [int(row[0]) for row in connection.execute(older + " ORDER BY id", (cutoff,))]
        predictions = connection.execute(
            f"SELECT COUNT(*) FROM predictions WHERE analysis_id IN ({older})", (cutoff,)).fetchone()[0]
        reviews = connection.execute(
            f"SELECT COUNT(*) FROM reviews WHERE analysis_id IN ({older})", (cutoff,)).fetchone()[0]
        files = connection.execute(
            f"SELECT COUNT(DISTINCT stored_name) FROM predictions p WHERE analysis_id IN ({older}) AND NOT EXISTS "
            f"(SELECT 1 FROM predictions q WHERE q.stored_name = p.stored_name AND q.analysis_id NOT IN ({older}))",
            (cutoff, cutoff)).fetchone()[0]
    return Deleted(analysis_ids=ids, predictions=int(predictions), reviews=int(reviews), files=int(files))


def purge(db: Database, storage_dir: str | Path, cutoff: str, user: str, batch_size: int = PURGE_BATCH) -> Deleted:
    """Delete every analysis created before ``cutoff``, its rows and image files, and orphaned image files.

    Analyses go in batches of ``batch_size``, each one transaction with one ``purge`` audit row per
    analysis; a summary ``purge`` row follows. Image files that no prediction names and that were
    last modified before the cutoff (and over an hour ago, so an upload in flight keeps its
    files) are removed too: they are left by uploads that failed before their rows were stored.

    Args:
        db: the server's database.
        storage_dir: the server's image folder.
        cutoff: from :func:`purge_cutoff`.
        user: who purges, for the audit trail (``cli:<OS user>`` from the command line).
        batch_size: analyses per transaction.
    """
    from hematovision.serve.audit import AuditEvent, record_audit

    storage_dir = Path(storage_dir)
    total = Deleted()
    while True:
        with db.transaction() as connection:
            ids = [int(row[0]) for row in connection.execute(
                "SELECT id FROM analyses WHERE created_at < ? ORDER BY id LIMIT ?" + db.backend.for_update,
                (cutoff, batch_size))]
            if not ids:
                break
            batch, unused = _delete_rows(connection, ids)
            for analysis_id in ids:
                AuditEvent(user, "purge", f"older than {cutoff}").insert(connection, analysis_id)
        _remove_files(storage_dir, unused, batch)
        total.add(batch)
    total.orphan_files = _remove_orphans(db, storage_dir, cutoff)
    record_audit(db, user, "purge", detail=f"created before {cutoff}: {total.describe()}")
    return total


def _delete_rows(connection: Connection, ids: Sequence[int]) -> tuple[Deleted, set[str]]:
    """Delete the analyses' rows inside the caller's transaction; returns the counts and the file
    names no remaining prediction uses."""
    marks = ",".join("?" * len(ids))
    names = {row[0] for row in connection.execute(
        f"SELECT DISTINCT stored_name FROM predictions WHERE analysis_id IN ({marks})", list(ids))}
    reviews = connection.execute(f"DELETE FROM reviews WHERE analysis_id IN ({marks})", list(ids)).rowcount
    predictions = connection.execute(f"DELETE FROM predictions WHERE analysis_id IN ({marks})", list(ids)).rowcount
    connection.execute(f"DELETE FROM analyses WHERE id IN ({marks})", list(ids))
    still_used = set()
    for chunk in _chunks(sorted(names), 500):
        still_used |= {row[0] for row in connection.execute(
            f"SELECT DISTINCT stored_name FROM predictions WHERE stored_name IN ({','.join('?' * len(chunk))})", chunk)}
    return Deleted(analysis_ids=list(ids), predictions=predictions, reviews=reviews), names - still_used


def _remove_files(storage_dir: Path, names: Iterable[str], deleted: Deleted) -> None:
    for name in names:
        path = _inside(storage_dir, name)
        if path is None:
            continue
        try:
            path.unlink()
            deleted.files += 1
        except FileNotFoundError:
            deleted.missing_files += 1
            continue
        if path.parent != storage_dir:
            try:
                path.parent.rmdir()  # the two-letter sub-folder, once empty
            except OSError:
                pass


def _inside(storage_dir: Path, name: str) -> Path | None:
    # Stored names are server-made (``ab/<sha256>.png``); anything else is never followed out of the folder.
    path = storage_dir / name
    if os.path.isabs(name) or ".." in Path(name).parts:
        return None
    return path


def _remove_orphans(db: Database, storage_dir: Path, cutoff: str) -> int:
    if not storage_dir.is_dir():
        return 0
    cutoff_time = datetime.fromisoformat(cutoff).timestamp()
    latest = min(cutoff_time, time.time() - ORPHAN_GRACE_SECONDS)
    with db.connect() as connection:
        used = {row[0] for row in connection.execute("SELECT DISTINCT stored_name FROM predictions")}
    removed = 0
    for path in storage_dir.glob("*/*"):
        name = path.relative_to(storage_dir).as_posix()
        if name in used or not path.is_file() or path.name.startswith("."):
            continue
        if path.stat().st_mtime < latest:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _chunks(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass
class BackupSummary:
    """What ``backup`` wrote (also saved as ``backup.json`` in the backup folder).

    Attributes:
        path: the backup folder.
        source_db: the database copied.
        source_storage: the image folder copied from.
        created: when the copy's snapshot was taken (UTC, ISO 8601).
        analyses, predictions, audit_rows: rows in the copy.
        images: image files copied.
        missing_images: files the copied rows name that were not in the storage folder.
        bytes: size of the copied database plus images.
        integrity: the copy's ``PRAGMA integrity_check`` answer (``ok``).
        seconds: how long it took.
    """

    path: str
    source_db: str
    source_storage: str
    created: str
    analyses: int
    predictions: int
    audit_rows: int | None
    images: int
    missing_images: int
    bytes: int
    integrity: str
    seconds: float


def backup(db_path: str | Path, destination: str | Path, storage_dir: str | Path) -> BackupSummary:
    """Copy the database and the images it names into a new folder, while the server keeps running.

    The database is copied with SQLite's online backup API in one step: the copy is one
    consistent snapshot (every committed transaction before it, none after), and in WAL mode the
    server's writers are not blocked meanwhile. The images named by the copied rows are then
    copied (images of later uploads are not needed by the copy). Everything is written to
    ``DESTINATION.partial`` and renamed at the end, so a folder named ``DESTINATION`` is always a
    complete backup; the copy must pass ``PRAGMA integrity_check`` first.

    Args:
        db_path: the server's database file (a ``postgresql://`` URL is refused).
        destination: the backup folder to create; it must not exist yet.
        storage_dir: the server's image folder.

    Raises:
        RetentionError: a PostgreSQL database (back it up with ``pg_dump``), no database there, the
            destination exists, or the copy fails its check.
    """
    if is_postgres(db_path):
        raise RetentionError(
            f"db backup copies a SQLite database; back up PostgreSQL with pg_dump (pg_dump --format=custom "
            f"--file=hematovision.dump '{describe(db_path)}') and copy the image folder {storage_dir} "
            "(docs/deployment.md)")
    started = time.monotonic()
    db_path, destination, storage_dir = Path(db_path), Path(destination), Path(storage_dir)
    if not db_path.is_file():
        raise RetentionError(f"no database at {db_path}; give the server's --db")
    if destination.exists():
        raise RetentionError(f"{destination} exists already; give a new folder name (a backup never overwrites)")
    if not destination.parent.is_dir():
        raise RetentionError(f"the folder {destination.parent} does not exist; create it first")
    partial = destination.with_name(destination.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted backup: never a complete one
    partial.mkdir()
    try:
        copy = partial / BACKUP_DB
        created = _copy_database(db_path, copy)
        source = sqlite3.connect(copy.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            integrity = source.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                raise RetentionError(f"the copy of {db_path} fails SQLite's integrity check ({integrity}); "
                                     "the source database may be damaged: run PRAGMA integrity_check on it")
            analyses = source.execute("SELECT COUNT(*) FROM analyses").fetchone()[0]
            predictions = source.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            has_audit = source.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit'").fetchone()
            audit_rows = source.execute("SELECT COUNT(*) FROM audit").fetchone()[0] if has_audit else None
            names = [row[0] for row in source.execute("SELECT DISTINCT stored_name FROM predictions ORDER BY 1")]
        finally:
            source.close()
        images, missing, size = 0, 0, copy.stat().st_size
        for name in names:
            origin = _inside(storage_dir, name)
            target = _inside(partial / BACKUP_IMAGES, name)
            if origin is None or target is None or not origin.is_file():
                missing += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
            images += 1
            size += target.stat().st_size
        summary = BackupSummary(
            path=str(destination), source_db=str(db_path.resolve()), source_storage=str(storage_dir.resolve()),
            created=created, analyses=analyses, predictions=predictions, audit_rows=audit_rows, images=images,
            missing_images=missing, bytes=size, integrity=integrity, seconds=round(time.monotonic() - started, 3))
        (partial / BACKUP_MANIFEST).write_text(json.dumps(asdict(summary), indent=2) + "\n")
        _fsync_tree(partial)
        partial.rename(destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def _copy_database(db_path: Path, copy: Path) -> str:
    """The online backup of ``db_path`` into the new file ``copy``; returns the snapshot's time."""
    source = sqlite3.connect(db_path, timeout=30.0)
    target = sqlite3.connect(copy)
    try:
        source.execute("PRAGMA busy_timeout=30000")
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        source.backup(target)  # pages=-1: all in one step, one read transaction, so one snapshot
        target.execute("PRAGMA journal_mode=DELETE")  # a self-contained file: no -wal beside the copy
    except sqlite3.Error as error:
        raise RetentionError(f"cannot copy {db_path}: {error}") from None
    finally:
        target.close()
        source.close()
    return created


def _fsync_tree(folder: Path) -> None:
    # The backup is worth something only once it is on disk, not in the page cache.
    for path in [*folder.rglob("*"), folder]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
