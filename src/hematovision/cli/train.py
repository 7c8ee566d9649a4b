"""``hematovision train``: a classifier run folder (frozen features + head, or fine-tuning).

Under ``torchrun --nproc_per_node N -m hematovision train ...`` the fine-tune is data-parallel
(:mod:`hematovision.train.distributed`); rank 0 prints and writes, the other ranks stay silent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.cli._common import parse_classes, summary_line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train``."""
    train = subparsers.add_parser("train", help="train a classifier (frozen features + head, or fine-tuning)")
    data = train.add_argument_group("data")
    data.add_argument("--data", type=Path, action="append",
                      help="dataset folder (class folders, or images/ + a labels CSV); split 70/15/15 (seeded, "
                           "stratified) unless it has train/val/test folders. Repeat to merge datasets: each is "
                           "split on its own and split.csv names each image's source")
    data.add_argument("--train-dir", type=Path, help="training images (instead of --data)")
    data.add_argument("--val-dir", type=Path, help="validation images (default: 15%% carved from --train-dir)")
    data.add_argument("--test-dir", type=Path, help="test images")
    data.add_argument("--classes",
                      help="comma-separated classes to keep, e.g. basophil,eosinophil,lymphocyte,monocyte,neutrophil")
    data.add_argument("--group-csv", type=Path, help="CSV mapping file names to groups kept on one side of the split")
    model = train.add_argument_group("model")
    model.add_argument("--out", type=Path, required=True, help="run folder to create")
    model.add_argument("--mode", choices=["frozen", "finetune"], default="frozen")
    model.add_argument("--backbone", default="efficientnet_lite0", help="registry name (see 'hematovision models')")
    model.add_argument("--no-pretrained", action="store_true", help="start from random weights (finetune only; reported as such)")
    model.add_argument("--image-size", type=int, help="input side (default: 224 frozen, 192 finetune)")
    model.add_argument("--head", choices=["logreg", "mlp"], default="logreg", help="frozen-mode head")
    model.add_argument("--tta", type=int, default=1, choices=[1, 2, 4, 8],
                       help="dihedral views (flips/90° rotations) averaged per image: in frozen features, or in "
                            "fine-tuned logits at evaluation; prediction uses the same")
    robust = train.add_argument_group("other labs (stain and optics)")
    robust.add_argument("--stain-norm", choices=["reinhard", "macenko"],
                        help="normalise every image's stain to a reference fitted on the training images (reinhard: "
                             "CIELAB mean/std; macenko: stain vectors, needs pip install 'hematovision[stain]'); "
                             "stored in the model card, so prediction does the same")
    robust.add_argument("--augment-copies", type=int, default=0, metavar="K",
                        help="frozen mode: also fit the head on K stain/optics-augmented copies of each training image "
                             "(features cached; val and test untouched)")
    robust.add_argument("--augment-strength", type=float, default=1.0,
                        help="strength of those copies' changes (1: the spread measured between labs)")
    robust.add_argument("--cell-scale", type=_fraction, metavar="FRACTION",
                        help="scale normalisation: crop or pad every image around its white cell so the cell spans "
                             "this fraction of the input, whatever the magnification (0.38 is PBC's median, so PBC "
                             "images change little); stored in the model card, so prediction does the same")
    robust.add_argument("--lab-standardise", action="store_true",
                        help="frozen mode, logreg head: standardise each --data lab's features with its own "
                             "class-balanced statistics; `evaluate` then standardises another lab's folder on its "
                             "own cells (docs/labs.md)")
    robust.add_argument("--morphology", action="store_true",
                        help="with --lab-standardise: also measure each cell's shape and colour ratios (nucleus share, "
                             "lobes, hue of nucleus and cytoplasm, graininess) and fit a small head on them, fused with "
                             "the network's on another lab's cells (evaluate's re-scoring, adapt --unlabelled): these "
                             "measurements move less between labs than the network's features (docs/labs.md)")
    robust.add_argument("--few-shot-start", type=int, nargs="?", const=1000, default=0, metavar="STEPS",
                        help="frozen mode: also fine-tune the backbone's last stages on the training split (STEPS "
                             "steps, default 1000, ~12 min on 2 cores) and keep that network in the run folder: "
                             "`adapt --data` then fine-tunes a new lab's cells from white-cell features instead of "
                             "ImageNet's (docs/labs.md)")
    fit = train.add_argument_group(
        "fine-tuning", "data-parallel under torchrun: torchrun --nproc_per_node N -m hematovision train --mode finetune "
                       "... (gloo on CPU, nccl on GPU; rank 0 writes the run folder)")
    fit.add_argument("--epochs", type=int, default=10)
    fit.add_argument("--batch-size", type=int, default=32,
                     help="images per optimizer step; under torchrun the global batch, split across the processes "
                          "(32 with 4 processes: 8 each), so results match one process")
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--balance", choices=["loss", "sampler", "none"], default="loss")
    fit.add_argument("--no-augment", action="store_true",
                     help="no random crops, flips or colour jitter on training images")
    fit.add_argument("--strong-augment", action="store_true",
                     help="also zoom out, blur, lower resolution and shift stains: for images from other labs and scanners")
    fit.add_argument("--patience", type=int, default=4)
    fit.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    fit.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    train.add_argument("--seed", type=int, default=0)
    return train


def _fraction(text: str) -> float:
    """A number in (0, 1], for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    """Train, then print the headline metrics and where the report is."""
    from hematovision.errors import HematoVisionError
    from hematovision.train import distributed
    from hematovision.train.finetune import FinetuneConfig
    from hematovision.train.pipeline import TrainConfig, run_training

    # One --data stays a single path, as train_config.json has always recorded it.
    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    config = TrainConfig(
        out=args.out, data=data, train_dir=args.train_dir, val_dir=args.val_dir, test_dir=args.test_dir,
        mode=args.mode, backbone=args.backbone, pretrained=not args.no_pretrained, image_size=args.image_size,
        classes=parse_classes(args.classes), group_csv=args.group_csv, seed=args.seed,
        head=args.head, tta=args.tta, resume=args.resume, stain_norm=args.stain_norm,
        augment_copies=args.augment_copies, augment_strength=args.augment_strength, cell_scale=args.cell_scale,
        lab_standardise=args.lab_standardise, morphology=args.morphology, few_shot_start=args.few_shot_start,
        finetune=FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, balance=args.balance,
                                augment=not args.no_augment, strong_augment=args.strong_augment,
                                patience=args.patience, seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch),
    )
    with distributed.session() as world:
        try:
            metrics = run_training(config)
        # Every rank meets the same data errors and stops at the same step; rank 0 alone says so
        # (main() prints its one line), the others just exit with the same code.
        except KeyboardInterrupt:
            if world.is_main:
                raise
            return 130
        except HematoVisionError:
            if world.is_main:
                raise
            return 2
    if not world.is_main:
        return 0
    print(summary_line(f"{metrics['split']} split", metrics))
    print(f"report: {args.out / 'report.md'}")
    return 0
