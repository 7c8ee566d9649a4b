"""``hematovision evaluate``: score a run on a class-folder dataset or on a part of its own split."""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.cli._common import summary_line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate``."""
    evaluate = subparsers.add_parser("evaluate", help="evaluate a run on every image of a folder")
    evaluate.add_argument("run_dir", type=Path)
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="dataset folder (class folders, or images/ + a labels CSV); all of it is test data")
    source.add_argument("--split", help="a part of the run's own split.csv instead, e.g. test")
    evaluate.add_argument("--out", type=Path, help="output folder (default RUN_DIR/eval_<name>)")
    evaluate.add_argument("--tta", type=int, choices=[1, 2, 4, 8], help="dihedral views per image (default: the run's)")
    evaluate.add_argument("--backend", choices=["auto", "torch", "onnx", "int8", "openvino"],
                          help="runtime (default auto: OpenVINO when its export passed the accuracy rule, "
                              "else ONNX Runtime when model.onnx is up to date, else torch)")
    evaluate.add_argument("--workers", type=int, help="image-decoding threads (default: half the CPU cores)")
    evaluate.add_argument("--batch-size", type=int,
                          help="images per forward pass (default 8: as fast as larger batches on a CPU, "
                               "less memory)")
    evaluate.add_argument("--no-lab-standardise", action="store_true",
                          help="a run trained with --lab-standardise: keep its own feature statistics even when "
                               "the folder is another lab's (default: standardise such a folder on its own cells, "
                               "and add the run's morphology expert if it has one)")
    return evaluate


def run(args: argparse.Namespace) -> int:
    """Evaluate, then print the headline metrics and the classes left out."""
    from hematovision.evaluate.external import evaluate_folder, evaluate_split

    streaming = {"backend": args.backend or "auto", "workers": args.workers, "batch_size": args.batch_size}
    if args.data is not None:
        metrics = evaluate_folder(args.run_dir, args.data, args.out, args.tta, **streaming,
                                  lab_standardise=not args.no_lab_standardise)
    else:
        metrics = evaluate_split(args.run_dir, args.split, args.out, args.tta, **streaming)
    print(summary_line(str(args.data or f"{args.split} split"), metrics))
    for name, row in metrics.get("per_source", {}).items():
        print("  " + summary_line(name, row))
    if metrics.get("review"):
        review = metrics["review"]
        kept = review["unflagged_accuracy"]
        print(f"review policy: {review['flagged_fraction']:.1%} flagged"
              + (f"; accuracy of the unflagged {kept:.4f} ({review['n_unflagged']} images)" if kept is not None else ""))
    unreadable = metrics.get("unreadable_files") or []
    if unreadable:
        print(f"{len(unreadable)} unreadable file(s) skipped (listed in metrics.json):")
        for _file, reason in unreadable[:10]:
            print(f"  unreadable: {reason}")
    if metrics["unknown_classes"]:
        print(f"left out (unknown to the model): {', '.join(metrics['unknown_classes'])}")
    if (metrics.get("lab_shift") or {}).get("shifted"):
        print(f"warning: {metrics['lab_shift']['message']}")
    if (metrics.get("lab_standardisation") or {}).get("applied"):
        print(f"lab standardisation {metrics['lab_standardisation']['description']}")
    return 0
