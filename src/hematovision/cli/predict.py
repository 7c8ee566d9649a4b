"""``hematovision predict``: classify image files and folders into a CSV or JSON file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``predict``."""
    predict = subparsers.add_parser("predict", help="classify image files and folders")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    predict.add_argument("--out", type=Path, required=True,
                         help="output .csv (appended as it goes, resumable) or .json (written at the end)")
    predict.add_argument("--resume", action="store_true",
                         help="skip files already in --out (same path and content sha256); changed files are redone")
    predict.add_argument("--backend", choices=["torch", "onnx", "int8"],
                         help="runtime (default: ONNX Runtime when the run has an up-to-date model.onnx, else torch)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--workers", type=int, help="image-decoding threads (default: half the CPU cores)")
    predict.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    return predict


def run(args: argparse.Namespace) -> int:
    """Predict while streaming the images, append the rows to the file, and print what was done.

    Unreadable files (corrupt, empty, FIFOs, dangling links, ...) are rows with an ``error`` and are
    listed; the exit code is 2 only when no file at all could be classified (the file is written anyway).
    """
    from hematovision.data.images import display_path
    from hematovision.errors import HematoVisionError
    from hematovision.infer.predictor import Predictor
    from hematovision.predict import check_output_path, collect_image_paths, stream_to_file

    out = check_output_path(args.out)  # before the model is loaded: a wrong --out wastes no work
    paths = collect_image_paths(args.paths)
    if not paths:
        raise HematoVisionError(f"no image files found in {', '.join(display_path(p) for p in args.paths)}")
    predictor = Predictor.from_run_dir(args.run_dir, args.tta, backend=args.backend or "auto")

    def said_skipped(skipped: int, total: int) -> None:
        if args.resume:
            print(f"resume: {skipped} of {total} file(s) already in {display_path(out)} (same content), skipped; "
                  f"predicting {total - skipped}")

    try:
        summary = stream_to_file(predictor, paths, out, args.top_k, args.batch_size, resume=args.resume,
                                 workers=args.workers, on_skip=said_skipped)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are in {display_path(out)}; the same command with --resume "
              "predicts the rest", file=sys.stderr)
        raise
    errors = summary.errors
    print(f"{summary.classified} image(s) classified, {len(errors)} unreadable; written to {display_path(out)}"
          + (f" ({predictor.backend})" if predictor.backend != "torch" else ""))
    for error in errors[:10]:
        print(f"  unreadable: {error}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more (see the error column of {display_path(out)})")
    renamed = sum(display_path(path) != str(path) for path in paths)
    if renamed:
        print(f"note: {renamed} file name(s) are not valid UTF-8; they are written with \\xNN escapes")
    shift = summary.lab_shift
    if shift is not None and shift.shifted:
        print(f"warning: {shift.message()}")
    return 2 if errors and summary.classified + summary.skipped == 0 else 0
