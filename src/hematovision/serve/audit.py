"""The audit trail: who did what, when (UTC), from where, to which analysis.

An append-only table (``audit``, schema in :mod:`hematovision.serve.db`): this module only ever
INSERTs, and triggers in the schema abort any UPDATE or DELETE of its rows, whoever issues it.
Details name analyses by id and never copy sample names, so purging an analysis's patient data
leaves no identifier behind in the trail.

Actions written by the server: ``login``, ``login_failed``, ``logout``, ``token`` (API token
issued), ``view`` (an analysis opened), ``upload``, ``review``, ``signoff``, ``amend``, ``export``;
other modules add theirs (``delete``, ``purge``) through :func:`record_audit`.
"""

from __future__ import annotations

import csv
import getpass
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from hematovision.errors import HematoVisionError
from hematovision.serve.db import Database
from hematovision.serve.sql import Connection

COLUMNS = ("id", "at", "user", "action", "analysis_id", "detail", "client")
_SELECTED = ", ".join(f'"{column}"' for column in COLUMNS)  # quoted: PostgreSQL reserves "user"
MAX_DETAIL = 2000


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _clean(text: str, limit: int) -> str:
    # Control characters would let a crafted name or reason forge extra lines in a CSV or log view.
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


@dataclass(frozen=True)
class AuditEvent:
    """One audit row to be written.

    Attributes:
        user: who acted (the login name; ``local`` on a ``--no-auth`` workstation; for the command
            line, e.g. ``cli:<os user>``).
        action: what was done, e.g. ``review`` (see the module docstring for the list).
        detail: what exactly, in a line (label changes, a reason, a count); never patient identifiers.
        client: where from (the client's IP address; ``None`` for the command line).
        analysis_id: the analysis concerned, if any (``insert`` may supply it instead).
    """

    user: str
    action: str
    detail: str = ""
    client: str | None = None
    analysis_id: int | None = None

    def insert(self, connection: Connection, analysis_id: int | None = None) -> None:
        """Write the row with an open connection: inside the transaction of the change it records.

        Matches :data:`hematovision.serve.db.AuditHook`, so ``Database.review(..., audit=event.insert)``
        stores the change and its audit row together or not at all.
        """
        connection.execute(
            'INSERT INTO audit (at, "user", action, analysis_id, detail, client) VALUES (?, ?, ?, ?, ?, ?)',
            (_now(), _clean(self.user, 100), _clean(self.action, 50),
             analysis_id if analysis_id is not None else self.analysis_id,
             _clean(self.detail, MAX_DETAIL), None if self.client is None else _clean(self.client, 100)),
        )


def record_audit(db: Database, user: str, action: str, analysis_id: int | None = None, detail: str = "",
                 client: str | None = None) -> None:
    """Append one row to the audit trail, in its own transaction.

    For everything that reads or changes patient data outside the analysis routes: the ``db purge``
    command, the admin's delete route, logins. A change to the database should rather pass
    ``AuditEvent(...).insert`` as the ``audit`` hook of the :class:`Database` method, so the change and
    its audit row commit together; when that is not possible, call this right after the change commits.

    Args:
        db: the serve database.
        user: who acted: the logged-in user's name (``user.name``), ``local`` under ``--no-auth``, or for a
            command-line action ``f"cli:{getpass.getuser()}"``.
        action: a short verb, e.g. ``delete`` or ``purge`` (see the module docstring).
        analysis_id: the analysis concerned, if any (kept after the analysis itself is gone).
        detail: one line of what exactly (counts, reasons, label changes); no sample names or other
            patient identifiers: the trail is never purged.
        client: the client's IP address (``request.client.host``); ``None`` for the command line.

    Example:
        >>> record_audit(db, "cli:alice", "purge", detail="12 analyses older than 365 days")  # doctest: +SKIP
    """
    with db.transaction() as connection:
        AuditEvent(user, action, detail, client, analysis_id).insert(connection)


def audit_rows(db: Database, analysis_id: int | None = None, since: str | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
    """Audit rows, oldest first.

    Args:
        db: the serve database.
        analysis_id: only the rows of this analysis.
        since: only rows at or after this ISO 8601 UTC time (a date ``2026-01-31`` works).
        limit: at most this many (the newest ones), ``None`` for all.
    """
    return list(iter_audit(db, analysis_id, since, limit))


def iter_audit(db: Database, analysis_id: int | None = None, since: str | None = None,
               limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Like :func:`audit_rows`, but one row at a time (for exporting a long trail)."""
    conditions: list[str] = []
    parameters: list[int | str] = []
    if analysis_id is not None:
        conditions.append("analysis_id = ?")
        parameters.append(analysis_id)
    if since:
        conditions.append("at >= ?")
        parameters.append(since)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    select = f"SELECT {_SELECTED} FROM audit{where}"
    query = select + " ORDER BY id"
    if limit is not None:  # the newest ``limit`` rows, still oldest first
        query = f"SELECT * FROM ({select} ORDER BY id DESC LIMIT {int(limit)}) AS newest ORDER BY id"
    with db.connect() as connection:
        for row in connection.execute(query, parameters):
            yield dict(row)


def command_line_user() -> str:
    """How the trail names whoever runs a command (``users``, ``audit export``, ``db purge``): ``cli:<OS user>``."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in the environment or the password database (some containers)
        return "cli:unknown"


def parse_since(text: str) -> str:
    """``--since`` as the UTC ISO 8601 text the trail stores (a date stays a date; a time without zone is UTC).

    Raises:
        HematoVisionError: not an ISO 8601 date or time.
    """
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HematoVisionError(f"--since {text!r} is not a date (2026-01-31) or time (2026-01-31T08:00+01:00)") from None
    if len(text.strip()) == 10:  # a bare date: from its start, UTC
        return moment.date().isoformat()
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def export_audit(db: Database, out: TextIO, fmt: str, since: str | None = None, analysis_id: int | None = None) -> int:
    """Write the trail to ``out`` as ``csv`` (with a header) or ``jsonl``; return the number of rows.

    CSV cells that a spreadsheet would run as a formula (a failed login's user name is whatever was typed)
    get a leading ``'``.
    """
    count = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(COLUMNS)
    for row in iter_audit(db, analysis_id, since):
        if writer is not None:
            writer.writerow([_csv_safe(row[column]) for column in COLUMNS])
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def _csv_safe(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
