"""``hematovision models``: the registered models, their input size and weight availability."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``models``."""
    return subparsers.add_parser("models", help="list the registered models")


def run(args: argparse.Namespace) -> int:
    """Print one line per registered model."""
    from hematovision.models import get_model_info, list_models

    print(f"{'name':24} {'family':9} {'size':>4}  {'offline weights':15} description")
    for name in list_models():
        info = get_model_info(name)
        offline = "yes" if info.offline_weights else ("no (hub)" if info.weights else "none")
        print(f"{name:24} {info.family:9} {info.input_size:>4}  {offline:15} {info.description}")
    return 0
