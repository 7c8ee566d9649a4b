"""``hematovision adapt``: fit a trained run to another lab's cells (unlabelled, or k labelled per class)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``adapt``."""
    adapt = subparsers.add_parser(
        "adapt", help="fit a trained run to another lab's microscope and stain (unlabelled or a few labelled cells)",
        description="Write a new run folder adapted to a lab's cells. --unlabelled re-estimates the normalisation "
                    "statistics (frozen: the feature standardisation; fine-tuned: batch-norm, AdaBN); --data with "
                    "class folders also refits the final layer and recalibrates the temperature and the review "
                    "threshold, each chosen by cross-validation on the lab's cells. The source run is not changed.")
    adapt.add_argument("run_dir", type=Path, help="the run folder to adapt")
    adapt.add_argument("--out", type=Path, required=True, help="the new run folder (must not exist)")
    cells = adapt.add_mutually_exclusive_group(required=True)
    cells.add_argument("--unlabelled", type=Path, metavar="DIR", help="a folder of the lab's cells, no labels needed "
                                                                      "(at least 30)")
    cells.add_argument("--data", type=Path, metavar="DIR", help="the lab's labelled cells, one folder per class")
    adapt.add_argument("--k-per-class", type=int, metavar="N", help="use at most N labelled cells per class "
                                                                    "(a seeded subset; default all)")
    adapt.add_argument("--entropy-epochs", type=int, default=0, metavar="N",
                       help="--unlabelled only: then tune the normalisation by entropy minimisation for N epochs "
                            "(default 0: off)")
    adapt.add_argument("--no-finetune", dest="finetune", action="store_false",
                       help="--data only: do not try fine-tuning the backbone's last stages (faster: seconds "
                            "instead of minutes; by default it is tried and kept only when it wins out-of-fold)")
    adapt.add_argument("--target-accuracy", type=float, metavar="A",
                       help="--data only: accuracy wanted of the cells the recalibrated review policy does not flag "
                            "(default: the source run's policy, usually 0.99; 0.97 flags far fewer cells)")
    adapt.add_argument("--seed", type=int, default=0)
    return adapt


def run(args: argparse.Namespace) -> int:
    """Adapt, then print what changed and the numbers before and after."""
    from hematovision.adapt.command import adapt_run

    if args.entropy_epochs and args.data is not None:
        print("hematovision adapt: --entropy-epochs applies to --unlabelled only; ignored")
    result = adapt_run(args.run_dir, args.out, unlabelled=args.unlabelled, data=args.data,
                       k_per_class=args.k_per_class, seed=args.seed, entropy_epochs=args.entropy_epochs,
                       finetune=args.finetune, target_accuracy=args.target_accuracy)
    cells = result["cells"]
    excluded = cells["excluded"]
    reasons = ", ".join(f"{n} {why}" for why, n in excluded["reasons"].items())
    left_out = f"; left out {excluded['count']}: {reasons}" if excluded["count"] else ""
    print(f"adapted {args.run_dir} -> {args.out} ({result['method']}, {cells['n_cells']} cells of {cells['folder']}"
          f"{left_out})")
    if cells.get("unknown_classes"):
        print(f"left out (unknown to the model): {', '.join(cells['unknown_classes'])}")
    if cells.get("classes_without_cells"):
        print(f"no labelled cells of: {', '.join(cells['classes_without_cells'])} "
              f"({result['classes_without_cells']['what happens']})")
    if result["method"] == "few-shot":
        print(f"chosen by {result['choice']['folds']}: {result['choice']['chosen']}")
    for line in result["adapted"]:
        print(f"  {line}")
    before, after = result["before"], result["after"]
    if "balanced_accuracy" in before:
        print(f"balanced accuracy on the lab's cells: {before['balanced_accuracy']:.4f} (source run) -> "
              f"{after['balanced_accuracy']:.4f} (adapted, out-of-fold); accuracy {before['accuracy']:.4f} -> "
              f"{after['accuracy']:.4f}")
    if before.get("lab_shift") is not None and after.get("lab_shift") is not None:
        print(f"lab-shift score: {before['lab_shift']:.2f} -> {after['lab_shift']:.2f}"
              + (f" (threshold {before['lab_shift_threshold']:.2f})" if before.get("lab_shift_threshold") else ""))
    print(f"mean prediction entropy: {before['mean_entropy']:.3f} -> {after['mean_entropy']:.3f}"
          + (f"; predictions changed: {result['predictions_changed']:.0%}" if "predictions_changed" in result else ""))
    return 0
