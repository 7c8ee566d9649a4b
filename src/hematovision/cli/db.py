"""``hematovision db backup|purge``: back up the web app's records and images, or delete old ones."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``db`` and its actions."""
    parser = subparsers.add_parser(
        "db", help="back up or purge the web app's analyses and images",
        description="The server's database (analyses, predictions, reviews, users, audit trail) and its image "
                    "folder. Both actions work while `hematovision serve` runs. See docs/deployment.md.")
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    backup = actions.add_parser(
        "backup", help="copy the database and its images into a new folder, consistently, while serving",
        description="Writes PATH/hematovision.db (SQLite's online backup: one consistent snapshot), PATH/images/ "
                    "(the images its rows name) and PATH/backup.json. Restore: hematovision serve "
                    "--db PATH/hematovision.db --storage PATH/images (or copy both back). A PostgreSQL database "
                    "is backed up with pg_dump instead (docs/deployment.md).")
    backup.add_argument("path", type=Path, help="the backup folder to create (must not exist)")
    purge = actions.add_parser(
        "purge", help="delete analyses, predictions, reviews and images older than DAYS (dry run without --yes)",
        description="Lists what would be deleted; with --yes deletes it. Images still used by a newer analysis are "
                    "kept. The audit trail is kept and records the purge (user cli:<login name>).")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                       help="analyses created more than DAYS days ago")
    purge.add_argument("--yes", action="store_true", help="delete (without it, only count)")
    for sub in (backup, purge):
        sub.add_argument("--db", metavar="PATH|URL",
                         help="the server's SQLite file or postgresql:// URL (default: as `hematovision serve`, "
                              "env HEMATOVISION_DB)")
        sub.add_argument("--storage", metavar="DIR",
                         help="the server's image folder (default: as `hematovision serve`, env HEMATOVISION_STORAGE)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen action and print what it did."""
    from hematovision.serve.settings import Settings

    settings = Settings.from_env(db=args.db, storage=args.storage)
    return _backup(args, settings.db, settings.storage_dir) if args.db_action == "backup" else (
        _purge(args, settings.db, settings.storage_dir))


def _backup(args: argparse.Namespace, db: Path | str, storage: Path) -> int:
    from hematovision.serve.audit import command_line_user, record_audit
    from hematovision.serve.db import Database
    from hematovision.serve.retention import backup

    summary = backup(db, args.path, storage)
    print(f"backed up {db} ({summary.analyses} analyses, {summary.predictions} predictions) and {summary.images} "
          f"image(s) from {storage} to {summary.path} ({summary.bytes / 1e6:.1f} MB, integrity {summary.integrity}, "
          f"{summary.seconds:.1f} s)")
    if summary.missing_images:
        print(f"warning: {summary.missing_images} image(s) named by the database were not in {storage}")
    # A backup is a copy of every patient record: who made it belongs in the trail.
    database = Database(db)
    try:
        record_audit(database, command_line_user(), "backup",
                     detail=f"to {summary.path}: {summary.analyses} analyses, {summary.images} images")
    finally:
        database.close()
    return 0


def _purge(args: argparse.Namespace, db_path: Path | str, storage: Path) -> int:
    from hematovision.errors import HematoVisionError
    from hematovision.serve.audit import command_line_user
    from hematovision.serve.db import Database
    from hematovision.serve.retention import purge, purge_candidates, purge_cutoff

    cutoff = purge_cutoff(args.older_than)
    if isinstance(db_path, Path) and not db_path.is_file():  # a postgresql:// URL: Database checks it
        raise HematoVisionError(f"no database at {db_path}; give the server's --db")
    db = Database(db_path)
    try:
        if not args.yes:
            would = purge_candidates(db, cutoff)
            print(f"dry run: {would.describe()} created before {cutoff} would be deleted from {db.location} and {storage}")
            if would.analysis_ids:
                print(f"  analysis ids {would.analysis_ids[0]}..{would.analysis_ids[-1]}; run again with --yes to delete")
            return 0
        done = purge(db, storage, cutoff, command_line_user())
    finally:
        db.close()
    print(f"deleted {done.describe()} created before {cutoff}; the audit trail records it")
    if done.missing_files:
        print(f"note: {done.missing_files} image file(s) were already missing")
    return 0
