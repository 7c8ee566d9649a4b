"""``hematovision audit export``: the audit trail as CSV or JSON lines, for inspectors."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``audit``."""
    parser = subparsers.add_parser(
        "audit", help="export the web app's audit trail",
        description="Who did what, when (UTC) and from where: logins, views, uploads, reviews, sign-offs, "
                    "amendments, exports, deletions and user changes, from the server's database.")
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the audit trail as CSV or JSON lines")
    export.add_argument("--since", metavar="DATE", help="only from this date or time on (ISO 8601, e.g. 2026-01-31 "
                        "or 2026-01-31T08:00+01:00; a time without zone is UTC)")
    export.add_argument("--analysis", type=int, metavar="ID", help="only the rows of this analysis")
    export.add_argument("--out", metavar="FILE", help="FILE.csv or FILE.jsonl (default: CSV on standard output)")
    export.add_argument("--db", metavar="PATH|URL", help="the server's SQLite file or postgresql:// URL (default: as "
                        "`hematovision serve`, env HEMATOVISION_DB)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the rows and say how many."""
    import sys
    from pathlib import Path

    from hematovision.cli.users import open_database
    from hematovision.errors import HematoVisionError
    from hematovision.serve.audit import command_line_user, export_audit, parse_since, record_audit

    since = parse_since(args.since) if args.since else None
    fmt = "csv"
    if args.out:
        suffix = Path(args.out).suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise HematoVisionError(f"--out must end in .csv or .jsonl, not {suffix or 'nothing'!r}")
        fmt = suffix[1:]
    db = open_database(args.db)
    try:
        if args.out:
            try:
                with open(args.out, "w", encoding="utf-8", newline="") as out:
                    count = export_audit(db, out, fmt, since, args.analysis)
            except OSError as error:
                raise HematoVisionError(f"cannot write {args.out}: {error.strerror}") from None
            print(f"wrote {count} audit row(s) to {args.out}", file=sys.stderr)
        else:
            count = export_audit(db, sys.stdout, fmt, since, args.analysis)
        # Reading the trail is itself an access worth recording.
        record_audit(db, command_line_user(), "audit_export",
                     detail=f"{count} row(s)" + (f" since {since}" if since else ""))
    finally:
        db.close()  # this process's connections (a PostgreSQL pool)
    return 0
