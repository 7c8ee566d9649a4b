"""The ``hematovision`` command line: one parser, thin calls into the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hematovision.errors import HematoVisionError

# Each module here defines ``add_commands(subparsers)``; its subcommands set ``func(args) -> int``.
COMMAND_MODULES = (
    "hematovision.commands",          # data, models, train, evaluate, predict
    "hematovision.methods.cli",       # bench (the papers' methods)
    "hematovision.segment.cli",       # segment, count
    "hematovision.gan.cli",           # gan
    "hematovision.export.cli",        # export
    "hematovision.serve.cli",         # serve
)


def get_parser() -> argparse.ArgumentParser:
    """Build the full argument parser."""
    parser = argparse.ArgumentParser(
        prog="hematovision",
        description="White-blood-cell classification, segmentation and counting in blood-smear images.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # A part of the package that is not present in this build (work in progress) is skipped.
            if error.name and module_name.startswith(error.name):
                continue
            raise
        module.add_commands(subparsers)
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
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted; finished work was saved (use --resume to continue training)", file=sys.stderr)
        return 130
    except HematoVisionError as error:
        print(f"hematovision: error: {error}", file=sys.stderr)
        return 2
