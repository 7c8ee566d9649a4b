"""Reproduce docs/synthetic.md: per-class DCGANs on pbc_dev's five WBC classes, then the quality report.

    python benchmarks/gan_pbc.py --out runs/gan_pbc64            # split, train (resumable), report
    python benchmarks/gan_pbc.py --out runs/gan_pbc64 --step report

Steps (each skips work already done, so an interrupted run continues where it stopped):
  1. split: a seeded, stratified 70/30 split of basophil, eosinophil, lymphocyte, monocyte and
     neutrophil (byte-identical files kept on one side) -> OUT/split.csv;
  2. train: one DCGAN per class on the 70% part only -> OUT/gans/<class>/;
  3. report: the five checks against the 30% held-out part -> OUT/report/report.md;
  4. doc: copy the report into docs/synthetic.md (between its report markers) and its figures
     into docs/img/gan_*.png.

Run it niced on a shared machine: ``nice -n 10 python benchmarks/gan_pbc.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hematovision._io import write_text
from hematovision.cli import main as hematovision_main
from hematovision.data.classes import WBC5
from hematovision.data.folder import scan_image_folder
from hematovision.data.splits import (
    content_groups,
    train_val_test_split,
    write_split_csv,
)
from hematovision.paths import shared_data_dir


def make_split(data_dir: Path, out_csv: Path, seed: int, test_fraction: float) -> None:
    """Write the seeded stratified train/test split of pbc_dev's five WBC classes."""
    folder = scan_image_folder(data_dir, classes=WBC5)
    groups = content_groups(folder.samples)
    parts = train_val_test_split([s.label for s in folder.samples], groups,
                                 fractions=(1.0 - test_fraction, 0.0, test_fraction), seed=seed)
    write_split_csv(out_csv, folder.samples, parts, groups)
    counts: dict[tuple[str, str], int] = {}
    for sample, part in zip(folder.samples, parts):
        counts[(sample.label, part)] = counts.get((sample.label, part), 0) + 1
    for label in WBC5:
        print(f"{label:11s} train {counts.get((label, 'train'), 0):4d}  test {counts.get((label, 'test'), 0):4d}")


FIGURES = ("real_vs_synthetic.png", "frechet.png", "nearest_distances.png", "closest_pairs.png",
           "augmentation_recall.png")
PROGRESS_CLASSES = ("basophil", "monocyte")  # the doc shows these two; each strip is ~200 KB
START, END = "<!-- gan-report:start -->", "<!-- gan-report:end -->"


def _copy_small(source: Path, target: Path, max_bytes: int) -> None:
    """Copy a PNG, re-saving it with a 256-colour palette if it is larger than ``max_bytes``."""
    image = Image.open(source).convert("RGB")
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, optimize=True)
    if target.stat().st_size > max_bytes:
        image.quantize(256).save(target, optimize=True)
    if target.stat().st_size > max_bytes:
        print(f"warning: {target} is {target.stat().st_size} bytes, above {max_bytes}")


def update_doc(report_dir: Path, doc: Path, max_bytes: int = 300_000) -> None:
    """Put ``report.md`` between the doc's report markers and copy the figures to ``docs/img/gan_*.png``."""
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {START} / {END}")
    report = (report_dir / "report.md").read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(doc, f"{head}{START}\n{report}\n{END}{tail}")
    for name in FIGURES:
        _copy_small(report_dir / name, doc.parent / "img" / f"gan_{name}", max_bytes)
    # Training progress: the first row of each saved sample grid (same latent vectors), one row per grid.
    for class_name in PROGRESS_CLASSES:
        grids = sorted((report_dir.parent / "gans" / class_name / "samples").glob("iter_*.png"))
        if grids:
            grid = [np.asarray(Image.open(path).convert("RGB")) for path in grids]
            tile = (grid[0].shape[1] - 2) // 8 - 2  # 8 columns of tiles with 2-px gutters
            rows = [image[: tile + 4] for image in grid]
            strip = np.concatenate(rows, axis=0)
            target = doc.parent / "img" / f"gan_progress_{class_name}.png"
            Image.fromarray(strip).save(target)
            _copy_small(target, target, max_bytes)
    print(f"updated {doc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gan_pbc64"))
    parser.add_argument("--data", type=Path, default=None, help="pbc_dev folder (default ../shared/data/pbc_dev)")
    parser.add_argument("--step", choices=("all", "split", "train", "report", "doc"), default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a busy shared CPU)")
    parser.add_argument("--max-minutes", type=float, default=None, help="training-time cap per class and call")
    parser.add_argument("--allow-unfinished", action="store_true", help="report on GANs still training (preview)")
    parser.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "synthetic.md")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2000, help="GAN update steps per class")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-synthetic", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    args = parser.parse_args(argv)

    data = args.data or ((shared_data_dir() or Path("../shared/data")) / "pbc_dev")
    if not data.is_dir():
        print(f"pbc_dev not found at {data}", file=sys.stderr)
        return 2
    split = args.out / "split.csv"
    if args.step in ("all", "split") and not split.exists():
        make_split(data, split, args.seed, args.test_fraction)
    if args.step in ("all", "train"):
        resume = ["--resume"] if (args.out / "gans").exists() else []
        code = hematovision_main([
            "gan", "train", "--split", str(split), "--all", "--size", str(args.size),
            "--iterations", str(args.iterations), "--width", str(args.width), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--threads", str(args.threads), "--out", str(args.out / "gans"), *resume,
            *(["--max-minutes", str(args.max_minutes)] if args.max_minutes else []),
        ])
        if code:
            return code
    if args.step in ("all", "report"):
        code = hematovision_main([
            "gan", "report", str(args.out / "gans"), "--split", str(split), "--out", str(args.out / "report"),
            "--n-synthetic", str(args.n_synthetic), "--seed", str(args.seed), "--threads", str(args.threads),
            *(["--allow-unfinished"] if args.allow_unfinished else []),
        ])
        if code:
            return code
    if args.step in ("all", "doc"):
        update_doc(args.out / "report", args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
