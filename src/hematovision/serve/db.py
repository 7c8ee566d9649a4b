"""Storage of analyses, predictions and reviews, in SQLite (the default) or PostgreSQL.

Every write is one transaction, so a request either stores all it has or nothing. Each operation
takes its own connection (short-lived on SQLite, from a pool on PostgreSQL), which keeps the
database safe to use from the server's worker threads and from several server processes.
How each database is reached, locked and spelled (WAL and ``synchronous`` on SQLite, row locks on
PostgreSQL) is :mod:`hematovision.serve.sql`'s business; the queries here are written once for both.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hematovision.errors import HematoVisionError
from hematovision.serve.sql import Connection, describe, open_backend

SCHEMA_VERSION = 2  # 2: sign-off columns, users, auth_tokens, audit (serve/users.py, serve/audit.py)
MAX_ROW_ID = 2**63 - 1  # ids are 64-bit in both databases; SQLite cannot even bind a larger number
EXCLUDED = "excluded"  # a review label meaning "not a white blood cell": left out of the differential

# Written once for both databases: {id}, {bigint}, {float}, {time} and {nocase} are spelled by the backend
# (Backend.words in serve/sql.py); the SQLite spelling is the schema as earlier versions wrote it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS analyses (
    id {id},
    created_at {time} NOT NULL,
    sample TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    signed_off_by TEXT,
    signed_off_at {time},
    amended_by TEXT,
    amended_at {time}
);
CREATE TABLE IF NOT EXISTS predictions (
    id {id},
    analysis_id {bigint} NOT NULL REFERENCES analyses(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    filename TEXT NOT NULL,
    stored_name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    label TEXT NOT NULL,
    confidence {float} NOT NULL,
    probabilities TEXT NOT NULL,
    ood_score {float},
    needs_review INTEGER NOT NULL,
    review_reasons TEXT NOT NULL,
    reviewed_label TEXT,
    reviewer TEXT,
    reviewed_at {time},
    UNIQUE (analysis_id, position)
);
CREATE INDEX IF NOT EXISTS predictions_analysis ON predictions (analysis_id);
CREATE INDEX IF NOT EXISTS predictions_sha256 ON predictions (sha256);
CREATE TABLE IF NOT EXISTS reviews (
    id {id},
    analysis_id {bigint} NOT NULL REFERENCES analyses(id) ON DELETE CASCADE,
    prediction_id {bigint} NOT NULL REFERENCES predictions(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    previous_label TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    created_at {time} NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_analysis ON reviews (analysis_id);
-- Users, their login sessions and API tokens: read and written by serve/users.py.
CREATE TABLE IF NOT EXISTS users (
    id {id},
    name TEXT NOT NULL {nocase},
    role TEXT NOT NULL CHECK (role IN ('technologist', 'reviewer', 'admin')),
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at {time} NOT NULL
);
-- Names are unique whatever their case, and looked up as lower(name) = lower(?) in both databases.
CREATE UNIQUE INDEX IF NOT EXISTS users_name_lower ON users (lower(name));
CREATE TABLE IF NOT EXISTS auth_tokens (
    token_hash TEXT PRIMARY KEY,  -- sha256 of the token: a copy of the database holds no usable token
    user_id {bigint} NOT NULL REFERENCES users(id),
    kind TEXT NOT NULL CHECK (kind IN ('session', 'api')),
    created_at {time} NOT NULL,
    expires_at {time} NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_tokens_user ON auth_tokens (user_id);
-- The audit trail (serve/audit.py): append-only, enforced by triggers (AUDIT_APPEND_ONLY below). No foreign
-- key on analysis_id: the trail outlives purged or deleted analyses. "user" is quoted: PostgreSQL reserves it.
CREATE TABLE IF NOT EXISTS audit (
    id {id},
    at {time} NOT NULL,
    "user" TEXT NOT NULL,
    action TEXT NOT NULL,
    analysis_id {bigint},
    detail TEXT NOT NULL DEFAULT '',
    client TEXT
);
CREATE INDEX IF NOT EXISTS audit_analysis ON audit (analysis_id);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
"""
AUDIT_APPEND_ONLY = "the audit trail is append-only"  # what an UPDATE or DELETE of an audit row is refused with
# Columns added after schema 1; a database written by an older version gets them on opening.
_ADDED_COLUMNS = {"analyses": ("signed_off_by TEXT", "signed_off_at TEXT", "amended_by TEXT", "amended_at TEXT")}

AuditHook = Callable[[Connection, int], None]
"""Writes the audit row of a change inside the change's own transaction (given the connection and the
analysis id), so a change is never stored without its audit row; see :class:`hematovision.serve.audit.AuditEvent`."""


class NotFoundError(HematoVisionError, LookupError):
    """The analysis or prediction does not exist."""


class ConflictError(HematoVisionError):
    """The analysis changed since the client read it (its ``version`` moved on)."""


class SignedOffError(ConflictError):
    """The analysis is signed off: it is read-only except for an admin's amendment."""


class ReviewError(HematoVisionError, ValueError):
    """A review names an unknown label."""


@dataclass(frozen=True)
class PredictionRecord:
    """One image's prediction, as stored.

    Attributes:
        filename: the client's file name (display only).
        stored_name: the server-chosen file name under the storage folder.
        sha256: hex digest of the uploaded bytes.
        width: image width in pixels.
        height: image height in pixels.
        label: predicted class.
        confidence: probability of ``label``.
        probabilities: class name → probability.
        ood_score: out-of-distribution score (larger is stranger), if the model has one.
        needs_review: whether a person should check this image.
        review_reasons: why it was flagged (empty when it was not).
    """

    filename: str
    stored_name: str
    sha256: str
    width: int
    height: int
    label: str
    confidence: float
    probabilities: dict[str, float]
    ood_score: float | None
    needs_review: bool
    review_reasons: list[str]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Database:
    """The app's database: a SQLite file (the default) or a PostgreSQL database several app processes share.

    Args:
        path: a SQLite file (its folder is created when missing) or a ``postgresql://user@host/dbname``
            URL (see :func:`hematovision.serve.sql.database_location`); the schema is applied when missing.
        synchronous: SQLite's ``synchronous`` setting for every connection: ``FULL`` (committed
            means on disk, even through a power loss), ``NORMAL`` or ``EXTRA``; PostgreSQL ignores it.

    Attributes:
        backend: how the database is reached (:class:`hematovision.serve.sql.Backend`).
        path: the SQLite file; ``None`` on PostgreSQL.
        location: the file or URL, for messages (a URL's password hidden).
    """

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.backend = open_backend(path, synchronous)
        self.path = self.backend.path
        self.location = describe(self.backend.location)
        ddl = _SCHEMA.format(**self.backend.words) + self.backend.append_only("audit", AUDIT_APPEND_ONLY)
        self.backend.apply_schema(ddl, _ADDED_COLUMNS, SCHEMA_VERSION)

    def close(self) -> None:
        """Release this process's connections (SQLite checkpoints its WAL if no one else has the file open)."""
        self.backend.close()

    def connect(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection for reads (rows by index and by column name); for the modules that own other tables."""
        return self.backend.connect()

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """One write transaction, committed on exit and rolled back on an exception.

        Writers queue: ``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL a read that decides a write ends in
        ``self.backend.for_update``.

        Raises:
            hematovision.serve.sql.IntegrityError: a constraint refused the change (nothing was stored).
        """
        return self.backend.transaction()

    def add_analysis(self, sample: str, model: str, records: Sequence[PredictionRecord],
                     audit: AuditHook | None = None) -> int:
        """Store an analysis and all its predictions in one transaction; return its id.

        ``audit`` writes the upload's audit row in the same transaction.
        """
        with self.transaction() as connection:
            analysis_id = int(connection.execute(
                "INSERT INTO analyses (created_at, sample, model, n_images) VALUES (?, ?, ?, ?) RETURNING id",
                (_now(), sample, model, len(records)),
            ).fetchone()[0])
            connection.executemany(
                "INSERT INTO predictions (analysis_id, position, filename, stored_name, sha256, width, height,"
                " label, confidence, probabilities, ood_score, needs_review, review_reasons)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (analysis_id, position, r.filename, r.stored_name, r.sha256, r.width, r.height, r.label,
                     float(r.confidence), json.dumps(r.probabilities), r.ood_score, int(r.needs_review),
                     json.dumps(r.review_reasons))
                    for position, r in enumerate(records)
                ],
            )
            if audit is not None:
                audit(connection, analysis_id)
        return analysis_id

    def get_analysis(self, analysis_id: int) -> dict[str, Any]:
        """An analysis with its predictions, review status and differential count.

        Raises:
            NotFoundError: no analysis has this id.
        """
        with self.connect() as connection:
            row = connection.execute(_ANALYSIS_SELECT + " WHERE a.id = ?", (analysis_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"analysis {analysis_id} does not exist")
            predictions = connection.execute(
                "SELECT * FROM predictions WHERE analysis_id = ? ORDER BY position", (analysis_id,)
            ).fetchall()
        analysis = _analysis_summary(row)
        analysis["predictions"] = [_prediction_dict(p) for p in predictions]
        analysis["differential"] = differential_count(analysis["predictions"])
        return analysis

    def list_analyses(
        self, query: str = "", page: int = 1, page_size: int = 20, status: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of analyses, newest first, and the total number that match.

        Args:
            query: text searched in the sample name and the images' file names; a number also
                matches the analysis id.
            page: 1-based page number.
            page_size: analyses per page.
            status: keep only ``unreviewed``, ``partial``, ``reviewed`` or ``needs_review`` ones.
        """
        conditions: list[str] = []
        parameters: list[str | int] = []
        query = query.strip()
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            # lower() on both sides: SQLite's LIKE ignores case, PostgreSQL's does not.
            condition = ("(lower(a.sample) LIKE lower(?) ESCAPE '\\' OR EXISTS (SELECT 1 FROM predictions q"
                         " WHERE q.analysis_id = a.id AND lower(q.filename) LIKE lower(?) ESCAPE '\\')")
            parameters += [pattern, pattern]
            if query.isascii() and query.isdigit() and int(query) <= MAX_ROW_ID:  # "²" is a digit; 2**63 no id
                condition += " OR a.id = ?"
                parameters.append(int(query))
            conditions.append(condition + ")")
        status_condition = {
            None: "1 = 1", "unreviewed": "n_reviewed = 0", "partial": "n_reviewed > 0 AND n_reviewed < n_images",
            "reviewed": "n_reviewed = n_images", "needs_review": "n_flagged_open > 0",
        }[status]
        where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        base = f"SELECT * FROM ({_ANALYSIS_SELECT}{where}) AS matching WHERE {status_condition}"
        with self.connect() as connection:
            total = connection.execute(f"SELECT COUNT(*) FROM ({base}) AS counted", parameters).fetchone()[0]
            rows = connection.execute(
                base + " ORDER BY id DESC LIMIT ? OFFSET ?", [*parameters, page_size, (page - 1) * page_size]
            ).fetchall()
        return [_analysis_summary(row) for row in rows], int(total)

    def get_prediction(self, prediction_id: int) -> dict[str, Any]:
        """One stored prediction (with ``stored_name``).

        Raises:
            NotFoundError: no prediction has this id.
        """
        with self.connect() as connection:
            row = connection.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"prediction {prediction_id} does not exist")
        return _prediction_dict(row)

    def review(
        self,
        analysis_id: int,
        labels: dict[int, str],
        reviewer: str,
        allowed_labels: Sequence[str],
        expected_version: int | None = None,
        *,
        amend: bool = False,
        audit: AuditHook | None = None,
    ) -> int:
        """Set the reviewed label of some predictions of one analysis, atomically.

        Concurrent reviews of the same analysis are serialised by the write lock; each is
        applied whole, logged in ``reviews``, and bumps the analysis ``version``.

        Args:
            analysis_id: the analysis.
            labels: prediction id → reviewed label (the predicted one to confirm it).
            reviewer: who reviewed (the logged-in user's name).
            allowed_labels: the class names plus :data:`EXCLUDED`.
            expected_version: when given, the review is refused if the analysis changed since.
            amend: an admin's amendment of a signed-off analysis (refused on one not signed off);
                a plain review is refused once the analysis is signed off.
            audit: writes the audit row in the same transaction.

        Returns:
            The analysis's new version.

        Raises:
            NotFoundError: no such analysis.
            ReviewError: an unknown label.
            NotFoundError: no such analysis, or a prediction that is not part of it (a schema-valid id that
                names nothing here, like an unknown path id: 404, not 422).
            ConflictError: ``expected_version`` is not the current version.
            SignedOffError: a review of a signed-off analysis, or an amendment of one not signed off.
        """
        unknown = sorted({label for label in labels.values() if label not in allowed_labels})
        if unknown:
            raise ReviewError(f"unknown label(s) {unknown}; use one of {list(allowed_labels)}")
        now = _now()
        with self.transaction() as connection:
            row = self._locked_row(connection, analysis_id, expected_version)
            if row["signed_off_at"] is not None and not amend:
                raise SignedOffError(f"analysis {analysis_id} was signed off by {row['signed_off_by']} at "
                                     f"{row['signed_off_at']} and is read-only; an admin can amend it")
            if row["signed_off_at"] is None and amend:
                raise SignedOffError(f"analysis {analysis_id} is not signed off; change it with a review")
            current = {
                r["id"]: (r["reviewed_label"] or r["label"])
                for r in connection.execute("SELECT id, label, reviewed_label FROM predictions WHERE analysis_id = ?",
                                            (analysis_id,))
            }
            foreign = sorted(set(labels) - set(current))
            if foreign:
                raise NotFoundError(f"prediction(s) {foreign} are not part of analysis {analysis_id}")
            for prediction_id, label in labels.items():
                connection.execute(
                    "UPDATE predictions SET reviewed_label = ?, reviewer = ?, reviewed_at = ? WHERE id = ?",
                    (label, reviewer, now, prediction_id),
                )
                connection.execute(
                    "INSERT INTO reviews (analysis_id, prediction_id, label, previous_label, reviewer, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (analysis_id, prediction_id, label, current[prediction_id], reviewer, now),
                )
            version = int(row["version"]) + 1
            if amend:
                connection.execute("UPDATE analyses SET version = ?, amended_by = ?, amended_at = ? WHERE id = ?",
                                   (version, reviewer, now, analysis_id))
            else:
                connection.execute("UPDATE analyses SET version = ? WHERE id = ?", (version, analysis_id))
            if audit is not None:
                audit(connection, analysis_id)
        return version

    def sign_off(self, analysis_id: int, user: str, expected_version: int, audit: AuditHook | None = None) -> int:
        """Sign an analysis off: from now on it is read-only (only an admin's amendment changes it).

        Refused while an image flagged for review has not been reviewed: the flags are what the
        reviewer vouches for.

        Returns:
            The analysis's new version.

        Raises:
            NotFoundError: no such analysis.
            ConflictError: ``expected_version`` is not the current version, or images flagged for
                review are still open.
            SignedOffError: it is signed off already.
        """
        with self.transaction() as connection:
            row = self._locked_row(connection, analysis_id, expected_version)
            if row["signed_off_at"] is not None:
                raise SignedOffError(f"analysis {analysis_id} was already signed off by {row['signed_off_by']} "
                                     f"at {row['signed_off_at']}")
            open_flags = connection.execute(
                "SELECT COUNT(*) FROM predictions WHERE analysis_id = ? AND needs_review = 1 AND reviewed_label IS NULL",
                (analysis_id,)).fetchone()[0]
            if open_flags:
                raise ConflictError(f"analysis {analysis_id} has {open_flags} image(s) flagged for review that are "
                                    "not reviewed yet; review them before signing off")
            version = int(row["version"]) + 1
            connection.execute("UPDATE analyses SET version = ?, signed_off_by = ?, signed_off_at = ? WHERE id = ?",
                               (version, user, _now(), analysis_id))
            if audit is not None:
                audit(connection, analysis_id)
        return version

    def _locked_row(self, connection: Connection, analysis_id: int, expected_version: int | None) -> Any:
        # Read inside the write transaction, and locked (FOR UPDATE on PostgreSQL): the version check and the
        # change cannot be split by another writer, in this process or another.
        row = connection.execute("SELECT version, signed_off_by, signed_off_at FROM analyses WHERE id = ?"
                                 + self.backend.for_update, (analysis_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"analysis {analysis_id} does not exist")
        if expected_version is not None and expected_version != row["version"]:
            raise ConflictError(
                f"analysis {analysis_id} is at version {row['version']}, not {expected_version}; reload it"
            )
        return row

    def review_log(self, analysis_id: int) -> list[dict[str, Any]]:
        """Every review action on an analysis, oldest first."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT * FROM reviews WHERE analysis_id = ? ORDER BY id", (analysis_id,)
            ).fetchall()
        return [dict(row) for row in rows]


_ANALYSIS_SELECT = """
SELECT a.*,
       (SELECT COUNT(*) FROM predictions p WHERE p.analysis_id = a.id AND p.reviewed_label IS NOT NULL) AS n_reviewed,
       (SELECT COUNT(*) FROM predictions p WHERE p.analysis_id = a.id AND p.needs_review = 1) AS n_flagged,
       (SELECT COUNT(*) FROM predictions p WHERE p.analysis_id = a.id AND p.needs_review = 1
            AND p.reviewed_label IS NULL) AS n_flagged_open
FROM analyses a
"""


def _analysis_summary(row: Any) -> dict[str, Any]:
    n_images, n_reviewed = int(row["n_images"]), int(row["n_reviewed"])
    status = "unreviewed" if n_reviewed == 0 else "reviewed" if n_reviewed >= n_images else "partial"
    return {
        "id": int(row["id"]),
        "created_at": row["created_at"],
        "sample": row["sample"],
        "model": row["model"],
        "n_images": n_images,
        "n_reviewed": n_reviewed,
        "n_needs_review": int(row["n_flagged"]),
        "review_status": status,
        "version": int(row["version"]),
        "signed_off_by": row["signed_off_by"],
        "signed_off_at": row["signed_off_at"],
        "amended_by": row["amended_by"],
        "amended_at": row["amended_at"],
    }


def _prediction_dict(row: Any) -> dict[str, Any]:
    return {
        "id": int(row["id"]),
        "position": int(row["position"]),
        "filename": row["filename"],
        "stored_name": row["stored_name"],
        "sha256": row["sha256"],
        "width": int(row["width"]),
        "height": int(row["height"]),
        "label": row["label"],
        "confidence": float(row["confidence"]),
        "probabilities": json.loads(row["probabilities"]),
        "ood_score": row["ood_score"],
        "needs_review": bool(row["needs_review"]),
        "review_reasons": json.loads(row["review_reasons"]),
        "reviewed_label": row["reviewed_label"],
        "reviewer": row["reviewer"],
        "reviewed_at": row["reviewed_at"],
        "final_label": row["reviewed_label"] or row["label"],
    }


def differential_count(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Number and percentage per class of the final labels (reviewed label when there is one).

    Images reviewed as :data:`EXCLUDED` are counted apart and left out of the percentages.
    """
    counts: dict[str, int] = {}
    for labels in predictions[0]["probabilities"] if predictions else []:
        counts[labels] = 0
    excluded = 0
    for prediction in predictions:
        label = prediction["final_label"]
        if label == EXCLUDED:
            excluded += 1
        else:
            counts[label] = counts.get(label, 0) + 1
    total = sum(counts.values())
    return {
        "total": total,
        "excluded": excluded,
        "counts": counts,
        "percent": {label: (100.0 * n / total if total else 0.0) for label, n in counts.items()},
    }
