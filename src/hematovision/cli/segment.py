"""``hematovision segment``: nucleus/cytoplasm masks of cell images, or training a U-Net.

Two forms on one parser, told apart by the first word::

    hematovision segment IMG1 IMG2 ... --method ekmeans|unet [--model UNET_RUN] --out DIR
    hematovision segment train --data DIR --out UNET_RUN [--mode 3class|binary] [--epochs N]

(argparse cannot put optional sub-actions beside free positional arguments, so ``train`` as
the first word selects training; a file literally named ``train`` can be given as ``./train``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.errors import HematoVisionError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``segment`` (both forms)."""
    segment = subparsers.add_parser(
        "segment",
        help="segment white cells into nucleus/cytoplasm (EK-means or U-Net), or train a U-Net",
        description=(
            "Two forms, told apart by the first word:\n\n"
            "  hematovision segment IMAGES... --method ekmeans|unet [--model UNET_RUN] --out DIR\n"
            "      writes <stem>_mask.png (0 background, 1 cytoplasm, 2 nucleus), <stem>_overlay.png, features.csv\n"
            "  hematovision segment train --data DIR --out UNET_RUN [--mode 3class|binary] [--epochs N]\n"
            "      trains a U-Net on a seeded split and reports Dice on the held-out images"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument("images", nargs="+", help="image files or folders, or the word 'train'")
    segment.add_argument("--out", type=Path, required=True, help="output folder (masks) or U-Net run folder (train)")
    masks = segment.add_argument_group("segmenting images")
    masks.add_argument("--method", choices=["ekmeans", "unet"], default="ekmeans", help="segmentation method")
    masks.add_argument("--model", type=Path, help="U-Net run folder (for --method unet)")
    masks.add_argument("--clusters", type=int, default=3, choices=[3, 4], help="EK-means colour clusters")
    masks.add_argument("--seed", type=int, default=0, help="random seed (EK-means FCM start; U-Net training)")
    train = segment.add_argument_group("training a U-Net (segment train ...)")
    train.add_argument("--data", type=Path, help="images/ + masks/ folder (Zheng layout) or a BCCD folder")
    train.add_argument("--mode", choices=["3class", "binary"], default="3class",
                       help="nucleus/cytoplasm/background or cell/background")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--image-size", type=int, default=128, help="square input side (divisible by 16)")
    train.add_argument("--width", type=int, default=8, help="channels of the first U-Net block")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    train.add_argument("--test-fraction", type=float, default=0.2, help="held-out images (seeded split)")
    train.add_argument("--val-fraction", type=float, default=0.1, help="images for choosing the best epoch")
    train.add_argument("--crop-to-cell", action="store_true", help="crop around the labelled cell (always on for BCCD)")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return segment


def run(args: argparse.Namespace) -> int:
    """Dispatch ``segment train ...`` or ``segment IMAGES ...``."""
    if args.images[0] == "train":
        if len(args.images) > 1:
            raise HematoVisionError(f"'segment train' takes no positional arguments, got {args.images[1:]}")
        return _train(args)
    return _segment_images(args)


def _segment_images(args: argparse.Namespace) -> int:
    from hematovision.predict import collect_image_paths
    from hematovision.segment.files import make_segmenter, segment_files

    paths = collect_image_paths(args.images)
    if not paths:
        raise HematoVisionError("no image files given")
    if args.method == "unet" and args.model is None:
        raise HematoVisionError("--method unet needs --model UNET_RUN (train one with: hematovision segment train)")
    segment = make_segmenter(args.method, args.model, clusters=args.clusters, seed=args.seed)
    rows, failures = segment_files(paths, segment, args.out, progress=print)
    print(f"wrote masks, overlays and features.csv for {len(rows) - failures} image(s) to {args.out}")
    return 0 if failures < len(paths) else 2


def _train(args: argparse.Namespace) -> int:
    from hematovision.segment.training import split_mask_dataset, train_and_test_unet
    from hematovision.segment.unet import UNetConfig

    if args.data is None:
        raise HematoVisionError("'segment train' needs --data DIR (images/ + masks/, or a BCCD folder)")
    split, crop = split_mask_dataset(args.data, args.test_fraction, args.val_fraction, args.seed, args.crop_to_cell)
    print(f"{sum(map(len, split.values()))} image/mask pairs: {len(split['train'])} train, {len(split['val'])} val, "
          f"{len(split['test'])} test (seed {args.seed})" + (", cropped around the labelled cell" if crop else ""))
    config = UNetConfig(
        mode=args.mode, image_size=args.image_size, base_width=args.width, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, crop_to_cell=crop, threads=args.threads,
    )
    history, summary = train_and_test_unet(split, args.data, args.out, config)
    if summary is not None:
        keys = ["cell_dice", "cell_iou", "pixel_accuracy"] if args.mode == "binary" else [
            "nucleus_dice", "nucleus_iou", "cell_dice", "cell_iou", "pixel_accuracy"]
        print("held-out test: " + ", ".join(f"{k} {summary[k]['mean']:.4f}" for k in keys))
    print(f"best validation Dice {history['best_val_dice']:.4f} at epoch {history['best_epoch']}; "
          f"run folder {args.out}")
    return 0
