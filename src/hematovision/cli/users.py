"""``hematovision users``: add, list, disable users and reset passwords in the server's database."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hematovision.serve.db import Database


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``users`` and its sub-commands."""
    parser = subparsers.add_parser(
        "users", help="manage the web app's users (roles: technologist, reviewer, admin)",
        description="Users of `hematovision serve`, kept in its database (the same --db). Roles: a technologist "
                    "uploads, views and pre-reviews; a reviewer also signs off; an admin also amends signed-off "
                    "analyses and deletes analyses. Users are disabled, never deleted: their name stays on the "
                    "reviews and the audit trail.")
    actions = parser.add_subparsers(dest="users_action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a user")
    add.add_argument("name", help="login name: letters, digits, '.', '_', '@', '-'")
    add.add_argument("--role", required=True, metavar="ROLE", help="technologist, reviewer or admin")
    actions.add_parser("list", help="list the users")
    disable = actions.add_parser("disable", help="stop a user from logging in; ends their sessions and tokens")
    disable.add_argument("name")
    reset = actions.add_parser("reset-password", help="set a new password (and enable the user); ends their sessions")
    reset.add_argument("name")
    for sub in (add, reset):
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input (for scripts)")
    for sub in actions.choices.values():
        sub.add_argument("--db", metavar="PATH|URL",
                         help="the server's SQLite file or postgresql:// URL (default: as `hematovision serve`, "
                              "env HEMATOVISION_DB)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Do one user action and print what was done."""
    db = open_database(args.db, create=args.users_action == "add")
    try:
        return _act(args, db)
    finally:
        db.close()  # this process's connections (a PostgreSQL pool)


def _act(args: argparse.Namespace, db: Database) -> int:
    from hematovision.serve import users

    if args.users_action == "add":
        users.check_name(args.name)
        users.check_role(args.role)  # before asking for a password that would be thrown away
        user = users.add_user(db, args.name, args.role, read_password(args.password_stdin))
        _audit(db, "user_add", f"{user.name} as {user.role}")
        print(f"added {user.role} {user.name!r} to {db.location}")
        if users.count_users(db) == 1:
            print(f"start the server with: hematovision serve --db {db.location} --model RUN_DIR; log in at /login")
    elif args.users_action == "list":
        rows = users.list_users(db)
        if not rows:
            print(f"no users in {db.location}; add the first admin with: hematovision users add admin --role admin")
        for row in rows:
            status = "disabled" if row["disabled"] else "active"
            print(f"{row['name']:24} {row['role']:13} {status:9} created {row['created_at'][:19]}Z  "
                  f"{row['active_tokens']} session(s)/token(s)")
    elif args.users_action == "disable":
        users.disable_user(db, args.name)
        _audit(db, "user_disable", args.name)
        print(f"disabled {args.name!r}: their sessions and API tokens no longer work")
    else:
        users.reset_password(db, args.name, read_password(args.password_stdin))
        _audit(db, "user_password", f"password reset for {args.name}")
        print(f"new password set for {args.name!r}; their old sessions and API tokens no longer work")
    return 0


def open_database(path: str | None, create: bool = False) -> Database:
    """The server's database, as ``serve`` would open it.

    Raises:
        HematoVisionError: an explicit ``--db`` whose folder does not exist, or (unless ``create``)
            a database file that does not exist yet.
    """
    from hematovision.errors import HematoVisionError
    from hematovision.serve.db import Database
    from hematovision.serve.settings import Settings

    file = Settings.from_env(db=path).db
    if not isinstance(file, Path):  # a postgresql:// URL: Database says so if it cannot connect
        return Database(file)
    if path is not None and not Path(file).parent.is_dir():
        raise HematoVisionError(f"the database folder {Path(file).parent} does not exist (--db {path}); "
                                "create it first or fix the path")
    if not create and not Path(file).is_file():
        raise HematoVisionError(f"no database at {file}; give the server's --db, or add a user first")
    return Database(file)


def read_password(from_stdin: bool) -> str:
    """The new password, from the first line of stdin or asked twice on the terminal.

    Raises:
        HematoVisionError: no terminal to ask on, or the two entries differ.
    """
    import getpass

    from hematovision.errors import HematoVisionError

    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise HematoVisionError("no terminal to ask for the password on; pipe it in with --password-stdin")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise HematoVisionError("the two passwords differ; nothing was changed")
    return first


def _audit(db: Database, action: str, detail: str) -> None:
    from hematovision.serve.audit import command_line_user, record_audit

    record_audit(db, command_line_user(), action, detail=detail)
