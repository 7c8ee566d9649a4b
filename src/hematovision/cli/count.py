"""``hematovision count``: find, type and count the cells of one sample's smear fields."""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.errors import HematoVisionError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``count``."""
    count = subparsers.add_parser(
        "count", help="find, classify and count white cells (and count red cells and platelets) in smear fields"
    )
    count.add_argument("images", nargs="+", type=Path, help="field images or folders of them (one sample)")
    count.add_argument("--model", type=Path, help="classifier run folder; without it cells are counted, not typed")
    count.add_argument("--out", type=Path, required=True, help="output folder")
    count.add_argument("--rbc-diameter", type=float, default=None,
                       help="red-cell diameter in pixels (BCCD 640x480: about 100); default: measured in each field")
    count.add_argument("--review-below", type=float, default=0.6, help="list cells whose top probability is below this")
    return count


def run(args: argparse.Namespace) -> int:
    """Count, then print where the differential is and the totals."""
    from hematovision.predict import collect_image_paths
    from hematovision.segment.count import count_fields, load_classifier

    paths = collect_image_paths(args.images)
    if not paths:
        raise HematoVisionError("no image files given")
    if args.rbc_diameter is not None and not args.rbc_diameter > 0:
        raise HematoVisionError(f"--rbc-diameter must be positive, got {args.rbc_diameter}")
    classifier = load_classifier(args.model) if args.model is not None else None
    summary = count_fields(paths, args.out, classifier, rbc_diameter=args.rbc_diameter,
                           review_below=args.review_below, progress=print)
    if classifier is not None:
        print(f"differential of {summary['classified']} white cells: {args.out / 'differential.md'}")
    else:
        print("no --model given: white cells were counted but not typed (no differential)")
    totals = summary["totals"]
    print(f"totals over {summary['readable']} image(s): {totals['wbc']} white cells, {totals['rbc']} red cells, "
          f"{totals['platelet']} platelets")
    if (summary.get("lab_shift") or {}).get("shifted"):
        print(f"warning: {summary['lab_shift']['message']}")
    return 0 if summary["readable"] else 2
