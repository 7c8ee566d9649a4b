"""``hematovision data inspect|fetch``: look at a dataset folder, or download a public dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` and its actions."""
    parser = subparsers.add_parser("data", help="inspect or download datasets")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="counts per class and split, image sizes, duplicates, unreadable files")
    inspect.add_argument("root", type=Path,
                         help="dataset folder (ROOT/<class>/*, ROOT/<split>/<class>/*, or ROOT/images/* + a labels CSV)")
    inspect.add_argument("--json", type=Path, help="also write the report as JSON here")
    fetch = actions.add_parser("fetch", help="download a public dataset (needs the network)")
    fetch.add_argument("name", choices=["bloodmnist"])
    fetch.add_argument("--size", type=int, default=224, choices=[28, 64, 128, 224])
    fetch.add_argument("--root", type=Path, help="download folder (default $HEMATOVISION_HOME/bloodmnist)")
    fetch.add_argument("--export", type=Path, help="also write it as class folders ROOT/<split>/<class>/*.png here")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    return _inspect(args) if args.data_command == "inspect" else _fetch(args)


def _inspect(args: argparse.Namespace) -> int:
    from hematovision.data.inspect import format_inspection, inspect_dataset

    report = inspect_dataset(args.root)
    print(format_inspection(report))
    if args.json:
        from hematovision._io import write_json

        write_json(args.json, report)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from hematovision.data.bloodmnist import export_bloodmnist, fetch_bloodmnist

    path = fetch_bloodmnist(args.size, args.root)
    print(f"BloodMNIST {args.size} px: {path}")
    if args.export:
        print(f"class folders: {export_bloodmnist(path, args.export)}")
    return 0
