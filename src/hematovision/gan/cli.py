"""``hematovision gan train|sample|report``: per-class DCGANs and their quality report."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``gan`` and its sub-commands."""
    gan = subparsers.add_parser("gan", help="synthetic white cells: per-class DCGANs (train, sample, report)")
    commands = gan.add_subparsers(dest="gan_command", metavar="GAN_COMMAND")
    gan.set_defaults(func=lambda args: (gan.print_help(), 2)[1])

    train = commands.add_parser("train", help="train one DCGAN per class (resumable)")
    source = train.add_argument_group("data")
    source.add_argument("--data", type=Path, help="class-folder dataset ROOT/<class>/*")
    source.add_argument("--split", type=Path,
                        help="split CSV (file,label,split); only rows of --split-part are used, so held-out images stay unseen")
    source.add_argument("--split-part", default="train", help="which rows of --split to train on (default: train)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--class", dest="class_name", help="train the GAN of this one class")
    which.add_argument("--all", action="store_true", help="train every class (or those of --classes)")
    source.add_argument("--classes", help="with --all: comma-separated classes to keep, e.g. the five WBC types")
    settings = train.add_argument_group("training")
    settings.add_argument("--size", type=int, default=64, choices=(32, 64, 128), help="image side in pixels")
    settings.add_argument("--iterations", type=int, default=None, help="update steps per class (default 1500)")
    settings.add_argument("--width", type=int, default=None, help="DCGAN ngf/ndf (default 32)")
    settings.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")
    settings.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4)")
    settings.add_argument("--sample-every", type=int, default=None, help="save a sample grid every N steps")
    settings.add_argument("--augment", default=None,
                          help="DiffAugment operations for the discriminator's inputs, from color, translation, "
                               "cutout (default 'translation,cutout'; '' for none)")
    settings.add_argument("--dropout", type=float, default=None,
                          help="discriminator dropout after each block (default 0: DiffAugment regularises)")
    settings.add_argument("--no-minibatch-std", action="store_true",
                          help="leave out the discriminator's minibatch standard-deviation channel")
    settings.add_argument("--spectral-norm", action="store_true",
                          help="spectrally normalised discriminator convolutions instead of batch norm")
    settings.add_argument("--seed", type=int, default=0)
    settings.add_argument("--threads", type=int, default=2,
                          help="torch CPU threads (use 1 on a busy machine: small convolutions gain little from more)")
    settings.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    settings.add_argument("--max-minutes", type=float, default=None,
                          help="stop each class after this many minutes of training in this call (resume later)")
    settings.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--out", type=Path, required=True, help="run folder; one sub-folder per class")
    train.set_defaults(func=run_train)

    sample = commands.add_parser("sample", help="write synthetic PNGs into class folders")
    sample.add_argument("run_dir", type=Path, help="a folder made by 'gan train' (or one class's folder in it)")
    sample.add_argument("--n", type=int, default=100, help="images per class")
    sample.add_argument("--out", type=Path, required=True, help="output dataset folder OUT/<class>/*.png")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=run_sample)

    report = commands.add_parser("report", help="the five quality checks of synthetic cells against real ones")
    report.add_argument("run_dir", type=Path, help="a folder made by 'gan train --split ...'")
    report.add_argument("--split", type=Path, required=True, help="the split CSV the GANs were trained with")
    report.add_argument("--out", type=Path, required=True, help="folder for report.md, metrics.json and plots")
    report.add_argument("--n-synthetic", type=int, default=500, help="synthetic images drawn per class")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    report.add_argument("--allow-unfinished", action="store_true",
                        help="preview: use the latest checkpoints of GANs still training")
    report.set_defaults(func=run_report)


def _parse_classes(text: str | None) -> list[str] | None:
    from hematovision.data.classes import WBC5, normalize_class_name

    if not text:
        return None
    if text.strip().lower() == "wbc5":
        return list(WBC5)
    return [normalize_class_name(name) for name in text.split(",") if name.strip()]


def _training_samples(args: argparse.Namespace) -> dict[str, list]:
    """Class → training samples, from a split CSV part or a class-folder dataset."""
    from hematovision.data.classes import normalize_class_name
    from hematovision.data.folder import scan_image_folder
    from hematovision.data.splits import read_split_csv
    from hematovision.errors import HematoVisionError

    if args.split:
        if not args.split.exists():
            raise HematoVisionError(f"split file not found: {args.split}")
        samples = [sample for sample, part in read_split_csv(args.split) if part == args.split_part]
        if not samples:
            raise HematoVisionError(f"{args.split} has no rows with split {args.split_part!r}")
    elif args.data:
        samples = scan_image_folder(args.data).samples
    else:
        raise HematoVisionError("give --data DIR or --split CSV")
    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    if args.class_name:
        wanted = [normalize_class_name(args.class_name)]
    else:
        wanted = _parse_classes(args.classes) or sorted(by_class)
    missing = [name for name in wanted if name not in by_class]
    if missing:
        raise HematoVisionError(f"no training images for class(es) {missing}; found {sorted(by_class)}")
    return {name: by_class[name] for name in wanted}


def run_train(args: argparse.Namespace) -> int:
    import json
    import signal

    import torch

    from hematovision._io import write_json
    from hematovision.data.folder import load_images
    from hematovision.errors import HematoVisionError
    from hematovision.gan.augment import parse_policy
    from hematovision.gan.train import GanConfig, train_class_gan

    torch.set_num_threads(max(1, args.threads))
    # A plain `kill` (SIGTERM) stops like Ctrl-C: the current iteration's checkpoint is saved first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    overrides = {
        "size": args.size, "iterations": args.iterations, "width": args.width, "batch_size": args.batch_size,
        "lr": args.lr, "sample_every": args.sample_every, "seed": args.seed, "augment": args.augment,
        "dropout": args.dropout,
    }
    overrides.update(spectral_norm=args.spectral_norm, minibatch_std=not args.no_minibatch_std)
    config = GanConfig(**{key: value for key, value in overrides.items() if value is not None})
    try:
        parse_policy(config.augment)
    except ValueError as error:
        raise HematoVisionError(str(error)) from None
    per_class = _training_samples(args)
    cards = {}
    started = time.perf_counter()
    for class_name, samples in per_class.items():
        loaded = load_images(samples, config.size, desc=f"loading {class_name}")
        cards[class_name] = train_class_gan(
            loaded.images, args.out / class_name, config, class_name,
            resume=args.resume, progress=not args.no_progress, max_minutes=args.max_minutes,
        )
        print(f"{class_name}: {cards[class_name]['iterations']} iterations, "
              f"{cards[class_name]['train_seconds'] / 60:.1f} min on {len(loaded.images)} images")
    # Classes may be trained by separate calls into one run folder: merge with what is there.
    run_file = args.out / "run.json"
    summary = json.loads(run_file.read_text()) if run_file.exists() else {"classes": {}}
    summary["config"] = cards[next(iter(cards))]["config"]
    summary["source"] = str(args.split or args.data)
    summary["split_part"] = args.split_part if args.split else None
    for name, card in cards.items():
        summary["classes"][name] = {key: card[key] for key in ("iterations", "train_seconds", "num_train_images")}
    summary["total_train_seconds"] = round(sum(c["train_seconds"] for c in summary["classes"].values()), 1)
    write_json(run_file, summary)
    total = sum(card["train_seconds"] for card in cards.values())
    print(f"trained {len(cards)} GAN(s) in {total / 60:.1f} min of training time "
          f"({(time.perf_counter() - started) / 60:.1f} min wall); run folder {args.out}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from hematovision.errors import HematoVisionError
    from hematovision.gan.train import write_samples

    if args.n < 1:
        raise HematoVisionError("--n must be at least 1")
    written = write_samples(args.run_dir, args.n, args.out, seed=args.seed)
    for class_name, paths in written.items():
        print(f"{class_name}: {len(paths)} images in {args.out / class_name}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    from hematovision.gan.report import build_report

    torch.set_num_threads(max(1, args.threads))
    # numpy/scikit-learn BLAS threads too: on a busy CPU idle-spinning extra threads cost far more than they give.
    with threadpool_limits(max(1, args.threads)):
        path = build_report(args.run_dir, args.split, args.out, n_synthetic=args.n_synthetic, seed=args.seed,
                            allow_unfinished=args.allow_unfinished)
    print(f"report written to {path}")
    return 0
