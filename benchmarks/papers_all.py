"""The whole papers-vs-ours table: every method on every dataset, one command, resumable.

    nice -n 10 python benchmarks/papers_all.py --out runs/bench            # the full table (recipes, k=5)
    nice -n 10 python benchmarks/papers_all.py --out runs/bench --budget   # the CPU-budget settings of docs/benchmarks.md

Datasets (under ../shared/data): ``bccd_wbc4_aug`` (train on TRAIN, test on TEST and
TEST_SIMPLE: the papers' split), ``pbc_dev`` with all 8 classes and with the 5 white-cell
classes (stratified k-fold, byte-identical files grouped), and the leak check on bccd TRAIN
(5-fold grouped by source frame vs. random). Models with a frozen pretrained encoder run first
(their encoder outputs are cached and shared), then the from-scratch models. Finished
(model, fold) cells are kept, so rerunning the same command continues where it stopped.
Writes ``<out>/<dataset>/results.{csv,md,png}`` and ``<out>/tables.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from hematovision.bench import (
    OURS,
    BenchConfig,
    run_bench,
    summarize,
    summary_markdown,
)
from hematovision.data.classes import WBC5
from hematovision.paths import shared_data_dir

log = logging.getLogger("papers_all")

BCCD_HEADS = [OURS, "lite0_transfer", "lite0_transfer@noaug", "cnn_lstm", "cnn_gru"]
# On PBC the checkerboard ablation is not repeated: the Lite0 recipe runs once, without it.
PBC_HEADS = [OURS, "cnn_gru", "lite0_transfer@modelnorm@noaug", "cnn_lstm"]
SCRATCH = ["rnn_rows", "cnn_bccd", "wnet", "wnet_svm"]
# No offline ImageNet weights: listed as "not run" unless --random-init is given.
UNAVAILABLE = ["vgg19_transfer", "alexnet", "resnet50"]
# From-scratch epochs of --budget, chosen so the whole table fits in about 2 hours on one core.
BUDGET_SCRATCH_EPOCHS = {"bccd": 15, "pbc": 4}


def plan(root: Path, folds: int, budget: bool) -> list[tuple[str, str, dict]]:
    """(stage, output name, BenchConfig fields) in the order they run."""
    bccd = {"data": root / "bccd_wbc4_aug", "limit_per_class": 250 if budget else None}
    pbc8 = {"data": root / "pbc_dev", "folds": folds}
    pbc5 = {**pbc8, "classes": list(WBC5)}
    leak = {"data": root / "bccd_wbc4_aug" / "TRAIN", "folds": folds, "limit_per_class": 250 if budget else None,
            "models": [OURS]}
    head_epochs = 5 if budget else None  # PBC heads see ~6,400 balanced samples per epoch
    # bccd trains on 1,000 images, so its from-scratch models can afford more epochs than PBC's ~4,000.
    bccd_scratch_epochs = BUDGET_SCRATCH_EPOCHS["bccd"] if budget else None
    pbc_scratch_epochs = BUDGET_SCRATCH_EPOCHS["pbc"] if budget else None
    return [
        ("heads", "bccd_wbc4_aug", {**bccd, "models": BCCD_HEADS + UNAVAILABLE}),
        ("heads", "bccd_train_grouped", leak),
        ("heads", "bccd_train_random", {**leak, "ungrouped": True}),
        ("heads", "pbc_dev_8", {**pbc8, "models": PBC_HEADS + UNAVAILABLE, "epochs": head_epochs}),
        ("heads", "pbc_dev_wbc5", {**pbc5, "models": PBC_HEADS + UNAVAILABLE, "epochs": head_epochs}),
        ("scratch", "bccd_wbc4_aug", {**bccd, "models": SCRATCH, "epochs": bccd_scratch_epochs}),
        ("scratch", "pbc_dev_8", {**pbc8, "models": SCRATCH, "epochs": pbc_scratch_epochs}),
        ("scratch", "pbc_dev_wbc5", {**pbc5, "models": SCRATCH, "epochs": pbc_scratch_epochs}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated output names to run (default: all)")
    parser.add_argument("--stage", choices=["all", "heads", "scratch"], default="all",
                        help="only the pretrained-encoder models (heads) or only the from-scratch ones")
    parser.add_argument("--budget", action="store_true",
                        help="128 px, 250 TRAIN images per class on bccd, 5 epochs for PBC heads, "
                             "BUDGET_SCRATCH_EPOCHS for the from-scratch models")
    parser.add_argument("--image-size", type=int, help="input size of every model (default: recipe; 128 with --budget)")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = shared_data_dir()
    if root is None:
        raise SystemExit("../shared/data not found (set HEMATOVISION_SHARED_DATA)")
    image_size = args.image_size or (128 if args.budget else None)
    only = set(args.only.split(",")) if args.only else None
    start = time.perf_counter()
    # Every dataset's models in plan order (pretrained heads, then from scratch), for the tables.
    models_of: dict[str, list[str]] = {}
    for stage, name, fields in plan(root, args.folds, args.budget):
        models_of.setdefault(name, []).extend(fields["models"])
        if (only and name not in only) or args.stage not in ("all", stage):
            continue
        config = BenchConfig(out=args.out / name, image_size=image_size, random_init=args.random_init,
                             threads=args.threads, **fields)
        run_bench(config)
        log.info("%s %s done after %.0f s", name, fields["models"], time.perf_counter() - start)
    # The tables cover every dataset with results, including those of earlier invocations.
    tables = [summary_markdown(summarize(args.out / name, models), title=name)
              for name, models in models_of.items() if (args.out / name / "cells").is_dir()]
    elapsed = time.perf_counter() - start
    text = "\n".join(tables) + f"\nwall time of this invocation: {elapsed / 60:.1f} min\n"
    (args.out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
