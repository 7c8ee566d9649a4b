"""``hematovision bench``: the papers' methods and ours on the same data and splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.cli._common import parse_classes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench``."""
    parser = subparsers.add_parser(
        "bench", help="benchmark the papers' methods and ours (k-fold or fixed split)",
        description="Train and test models with their papers' recipes on one dataset; writes results.csv, "
                    "results.md and results.png. Finished (model, fold) cells are kept: rerun to continue.",
    )
    parser.add_argument("--models", required=True,
                        help="comma-separated names: wnet, wnet_svm, cnn_bccd, cnn_lstm, cnn_gru, rnn_rows, "
                             "vgg19_transfer, lite0_transfer, alexnet, any registered model, hematovision_frozen (ours); "
                             "NAME@noaug / @paper_cb / @modelnorm / @intensity change one recipe setting")
    parser.add_argument("--data", required=True, type=Path, help="class folders, or split folders with a train split")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--folds", type=int, help="stratified (grouped) k-fold on --data (default 10 when there is no test set)")
    split.add_argument("--test-dir", type=Path, action="append", default=[], help="fixed test folder (repeatable)")
    parser.add_argument("--classes", help="keep only these classes (comma-separated; 'wbc5' = the 5 white-cell types)")
    parser.add_argument("--quick", action="store_true", help="smoke run in seconds: 32 px, 1 epoch, 2 folds, few images")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs")
    parser.add_argument("--image-size", type=int, help="override every recipe's input size")
    parser.add_argument("--limit-per-class", type=int, help="use at most N training images per class")
    parser.add_argument("--ungrouped", action="store_true",
                        help="ignore origin groups (provenance_sift.csv) in k-fold, to measure the leak of random re-splits")
    parser.add_argument("--random-init", action="store_true",
                        help="train models whose ImageNet weights are unavailable offline from random init (labelled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--force", action="store_true", help="recompute finished cells")
    parser.add_argument("--out", required=True, type=Path, help="output folder (cells/, results.csv/.md/.png)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run (or continue) the benchmark and print its summary table."""
    from hematovision.bench import BenchConfig, run_bench, summary_markdown
    from hematovision.errors import HematoVisionError

    if args.folds is not None and args.folds < 2:
        raise HematoVisionError(f"--folds must be at least 2, got {args.folds}")
    config = BenchConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()], data=args.data, out=args.out,
        folds=args.folds, test_dirs=list(args.test_dir), classes=parse_classes(args.classes), quick=args.quick,
        epochs=args.epochs, image_size=args.image_size, random_init=args.random_init, seed=args.seed,
        threads=args.threads, limit_per_class=args.limit_per_class, ungrouped=args.ungrouped,
    )
    rows = run_bench(config, force=args.force)
    print(summary_markdown(rows))
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.csv'}")
    return 0
