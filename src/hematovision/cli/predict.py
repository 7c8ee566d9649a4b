"""``hematovision predict``: classify image files and folders into a CSV, JSON or Parquet file, here or on Ray."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Generator, Sequence
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``predict``."""
    predict = subparsers.add_parser("predict", help="classify image files and folders")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    predict.add_argument("--out", type=Path, required=True,
                         help="output .csv (appended as it goes, resumable), .json (written at the end) or .parquet "
                              "(a folder of shards, appended as it goes, resumable)")
    predict.add_argument("--resume", action="store_true",
                         help="skip files already in --out (same path and content sha256); changed files are redone")
    predict.add_argument("--backend", choices=["auto", "torch", "onnx", "int8", "openvino"],
                         help="runtime (default auto: OpenVINO when its export passed the accuracy rule, "
                              "else ONNX Runtime when model.onnx is up to date, else torch)")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--batch-size", type=int,
                         help="images per forward pass (default 8: as fast as larger batches on a CPU, less memory)")
    predict.add_argument("--workers", type=int, help="image-decoding threads (default: half the CPU cores)")
    predict.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    ray = predict.add_argument_group("Ray engine (pip install 'hematovision[ray]'; see docs/scale.md)")
    ray.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="local: this process, decoding threads beside the model (default); ray: Ray Data actors, "
                          "each holding the model (--workers is then decoding threads per actor, default 1)")
    ray.add_argument("--address", help="a running Ray cluster: 'auto' (started with `ray start` on this machine) or "
                                       "ray://HEAD:10001 (default: an in-process Ray with this machine's cores)")
    ray.add_argument("--ray-workers", type=int, help="actors, each with a model and one CPU (default: the cluster's CPUs)")
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
    if args.engine == "ray":
        from hematovision.infer.ray_engine import require_ray

        require_ray()
    elif args.address or args.ray_workers:
        raise HematoVisionError("--address and --ray-workers need --engine ray")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise HematoVisionError(f"--ray-workers {args.ray_workers}: give at least 1")
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
                                 workers=args.workers, on_skip=said_skipped, engine=ray_engine(args, predictor))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished rows are in {display_path(out)}; the same command with --resume "
              "predicts the rest", file=sys.stderr)
        raise
    errors = summary.errors
    print(f"{summary.classified} image(s) classified, {len(errors)} unreadable; written to {display_path(out)}"
          + (f" ({predictor.backend})" if predictor.backend not in ("torch", "openvino") else "")
          + (f" (openvino, {predictor.precision})" if predictor.backend == "openvino" else ""))
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


def ray_engine(args: argparse.Namespace, predictor: object) -> Callable[[Sequence[Path]], Generator] | None:
    """``--engine ray``: the files still to do go to :func:`~hematovision.infer.ray_engine.ray_predictions`."""
    if args.engine != "ray":
        return None
    from functools import partial

    from hematovision.infer.ray_engine import ray_predictions

    return partial(ray_predictions, predictor, args.run_dir, batch_size=args.batch_size, ray_workers=args.ray_workers,
                   address=args.address, decode_workers=args.workers or 1)
