"""``hematovision gan train|sample|report``: per-class DCGANs or one projected GAN, and their quality report."""

from __future__ import annotations

import argparse
from pathlib import Path

from hematovision.cli._common import parse_classes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``gan`` and its sub-commands."""
    parser = subparsers.add_parser("gan", help="synthetic white cells: GANs (train, sample, report)")
    commands = parser.add_subparsers(dest="gan_command", metavar="GAN_COMMAND")
    # `hematovision gan` alone prints this help (exit 2); run() has only the arguments to go on.
    parser.set_defaults(print_gan_help=parser.print_help)

    train = commands.add_parser("train", help="train one DCGAN per class, or one projected GAN for all (resumable)")
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
    settings.add_argument("--arch", choices=("dcgan", "projected"), default="dcgan",
                          help="dcgan: one DCGAN per class in OUT/<class>/ (the W-Net paper's); projected: one "
                               "class-conditional generator for all classes, judged through frozen ImageNet "
                               "EfficientNet-Lite1 features (docs/synthetic.md), in OUT/")
    settings.add_argument("--size", type=int, default=64, choices=(32, 64, 128), help="image side in pixels")
    settings.add_argument("--iterations", type=int, default=None,
                          help="update steps (default: 1500 per class for dcgan, 5000 for projected)")
    settings.add_argument("--width", type=int, default=None, help="DCGAN ngf/ndf; projected: generator channels at 64 px "
                                                                   "(default 32)")
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
                          help="dcgan: spectrally normalised discriminator convolutions instead of batch norm")
    settings.add_argument("--mode-seeking", type=float, default=None,
                          help="projected: weight of the mode-seeking term against look-alike cells (default 1; 0: off)")
    settings.add_argument("--class-loss", type=float, default=None,
                          help="projected: weight of an auxiliary classifier's loss on generated cells (AC-GAN; "
                               "default 0: off)")
    settings.add_argument("--device", default="cpu", help="projected: where to train (cpu, or cuda where a GPU is lent)")
    settings.add_argument("--seed", type=int, default=0)
    settings.add_argument("--threads", type=int, default=2,
                          help="torch CPU threads (use 1 on a busy machine: small convolutions gain little from more)")
    settings.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    settings.add_argument("--max-minutes", type=float, default=None,
                          help="stop each class after this many minutes of training in this call (resume later)")
    settings.add_argument("--no-progress", action="store_true", help="hide progress bars")
    train.add_argument("--out", type=Path, required=True, help="run folder; one sub-folder per class")

    sample = commands.add_parser("sample", help="write synthetic PNGs into class folders")
    sample.add_argument("run_dir", type=Path, help="a folder made by 'gan train' (or one class's folder in it)")
    sample.add_argument("--n", type=int, default=100, help="images per class")
    sample.add_argument("--out", type=Path, required=True, help="output dataset folder OUT/<class>/*.png")
    sample.add_argument("--seed", type=int, default=0)

    report = commands.add_parser("report", help="the five quality checks of synthetic cells against real ones")
    report.add_argument("run_dir", type=Path, help="a folder made by 'gan train --split ...'")
    report.add_argument("--split", type=Path, required=True, help="the split CSV the GANs were trained with")
    report.add_argument("--out", type=Path, required=True, help="folder for report.md, metrics.json and plots")
    report.add_argument("--n-synthetic", type=int, default=500, help="synthetic images drawn per class")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    report.add_argument("--allow-unfinished", action="store_true",
                        help="preview: use the latest checkpoints of GANs still training")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the chosen sub-command (or print the help when there is none)."""
    if args.gan_command is None:
        args.print_gan_help()
        return 2
    return {"train": _train, "sample": _sample, "report": _report}[args.gan_command](args)


def _train(args: argparse.Namespace) -> int:
    import signal
    import time

    import torch

    from hematovision.errors import HematoVisionError
    from hematovision.gan.runs import train_gans, train_projected
    from hematovision.gan.train import GanConfig
    from hematovision.gan.train_projected import ProjectedGanConfig

    torch.set_num_threads(max(1, args.threads))
    # A plain `kill` (SIGTERM) stops like Ctrl-C: the current iteration's checkpoint is saved first.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    classes = [args.class_name] if args.class_name else parse_classes(args.classes)
    shared = {"size": args.size, "iterations": args.iterations, "width": args.width, "batch_size": args.batch_size,
              "lr": args.lr, "sample_every": args.sample_every, "seed": args.seed, "augment": args.augment,
              "minibatch_std": False if args.no_minibatch_std else None}
    started = time.perf_counter()
    if args.arch == "projected":
        if args.class_name:
            raise HematoVisionError("--arch projected trains one generator for several classes: use --all")
        if args.dropout is not None or args.spectral_norm:
            raise HematoVisionError("--dropout and --spectral-norm are DCGAN options; leave them out with --arch projected")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise HematoVisionError(f"--device {args.device}: no CUDA GPU is visible to torch here; use --device cpu")
        # Options not given keep the config's defaults.
        config = ProjectedGanConfig(**{k: v for k, v in {**shared, "mode_seeking": args.mode_seeking,
                                                                 "class_loss": args.class_loss}.items() if v is not None})
        card = train_projected(args.out, config, data=args.data, split=args.split, split_part=args.split_part,
                               classes=classes, resume=args.resume, progress=not args.no_progress,
                               max_minutes=args.max_minutes, device=args.device)
        print(f"trained one projected GAN for {len(card['classes'])} classes: {card['iterations']} iterations, "
              f"{card['train_seconds'] / 60:.1f} min of training time ({(time.perf_counter() - started) / 60:.1f} min wall); "
              f"run folder {args.out}")
        return 0
    if args.mode_seeking is not None or args.class_loss is not None:
        raise HematoVisionError("--mode-seeking and --class-loss are options of --arch projected")
    options = {**shared, "dropout": args.dropout, "spectral_norm": args.spectral_norm,
               "minibatch_std": not args.no_minibatch_std}
    config = GanConfig(**{key: value for key, value in options.items() if value is not None})

    def trained(class_name: str, card: dict) -> None:
        print(f"{class_name}: {card['iterations']} iterations, "
              f"{card['train_seconds'] / 60:.1f} min on {card['num_train_images']} images")

    cards = train_gans(
        args.out, config, data=args.data, split=args.split, split_part=args.split_part, classes=classes,
        resume=args.resume, progress=not args.no_progress, max_minutes=args.max_minutes, on_trained=trained,
    )
    total = sum(card["train_seconds"] for card in cards.values())
    print(f"trained {len(cards)} GAN(s) in {total / 60:.1f} min of training time "
          f"({(time.perf_counter() - started) / 60:.1f} min wall); run folder {args.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from hematovision.errors import HematoVisionError
    from hematovision.gan.train import write_samples

    if args.n < 1:
        raise HematoVisionError("--n must be at least 1")
    written = write_samples(args.run_dir, args.n, args.out, seed=args.seed)
    for class_name, paths in written.items():
        print(f"{class_name}: {len(paths)} images in {args.out / class_name}")
    return 0


def _report(args: argparse.Namespace) -> int:
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
