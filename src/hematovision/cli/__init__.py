"""The ``hematovision`` command line: one parser, one thin module per command.

Each command module has ``add_parser(subparsers)``, which adds its sub-parser (argument groups,
help texts) and returns it, and ``run(args) -> int``, which turns the arguments into one call
into the library and prints the summary. The modules import only argparse and pathlib at the top,
so building the parser (``hematovision --help``) stays fast; torch, FastAPI and the rest are
imported inside ``run``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hematovision.cli import (
    adapt,
    audit,
    bench,
    count,
    data,
    db,
    evaluate,
    export,
    gan,
    models,
    predict,
    segment,
    serve,
    train,
    users,
)
from hematovision.errors import HematoVisionError
from hematovision.threads import configure as configure_threads

# In the order ``hematovision --help`` lists them.
COMMANDS = (data, models, train, evaluate, adapt, predict, bench, segment, count, gan, export, serve, users, audit, db)
# Commands that never run a model: they skip the thread set-up (a quarter-second look at the cores).
NO_MODEL_COMMANDS = {"users", "audit", "db", "models"}


def get_parser() -> argparse.ArgumentParser:
    """Build the full argument parser."""
    parser = argparse.ArgumentParser(
        prog="hematovision",
        description="White-blood-cell classification, segmentation and counting in blood-smear images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hematovision`` console script."""
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # Before any command imports torch: OpenMP and BLAS read their thread settings once, on load.
    threads = configure_threads() if args.command not in NO_MODEL_COMMANDS else None
    if threads is not None:
        logging.getLogger(__name__).debug("CPU threads: %d (idle cores at start; HEMATOVISION_THREADS=N fixes it)",
                                          threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted; finished work was saved (use --resume to continue training)", file=sys.stderr)
        return 130
    except HematoVisionError as error:
        print(f"hematovision: error: {error}", file=sys.stderr)
        return 2
