"""``hematovision predict``: classify image files and folders into a CSV or JSON file."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``predict``."""
    predict = subparsers.add_parser("predict", help="classify image files and folders")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    predict.add_argument("--out", type=Path, required=True, help="output .csv or .json (others are refused)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    return predict


def run(args: argparse.Namespace) -> int:
    """Predict, write the file, and print how many images were classified or unreadable.

    Unreadable files (corrupt, empty, FIFOs, dangling links, ...) are rows with an ``error`` and are
    listed; the exit code is 2 only when no file at all could be classified (the file is written anyway).
    """
    from hematovision.data.images import display_path
    from hematovision.errors import HematoVisionError
    from hematovision.infer.predictor import Predictor
    from hematovision.predict import check_output_path, collect_image_paths, predict_files, write_predictions

    out = check_output_path(args.out)  # before the model is loaded: a wrong --out wastes no work
    paths = collect_image_paths(args.paths)
    if not paths:
        raise HematoVisionError(f"no image files found in {', '.join(display_path(p) for p in args.paths)}")
    predictor = Predictor.from_run_dir(args.run_dir, args.tta)
    rows = predict_files(predictor, paths, args.batch_size)
    shift = predictor.lab_shift()
    write_predictions(rows, predictor.class_names, out, args.top_k, lab_shift=shift)
    errors = [row for row in rows if row.error]
    print(f"{len(rows) - len(errors)} image(s) classified, {len(errors)} unreadable; written to {display_path(out)}")
    for row in errors[:10]:
        print(f"  unreadable: {row.error}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more (see the error column of {display_path(out)})")
    renamed = sum(display_path(path) != str(path) for path in paths)
    if renamed:
        print(f"note: {renamed} file name(s) are not valid UTF-8; they are written with \\xNN escapes")
    if shift is not None and shift.shifted:
        print(f"warning: {shift.message()}")
    return 0 if len(errors) < len(rows) else 2
