"""Benchmark: EK-means vs plain k-means vs U-Net on held-out Zheng et al. images (and EK-means on BCCD masks).

Reproduce (from the repository root; heavy, run niced)::

    nice -n 10 .venv/bin/python benchmarks/segmentation_zheng.py --out runs/seg_zheng
    # reuse a U-Net trained before by 'hematovision segment train' (same split: seed 0, 0.2 test, 0.1 val):
    nice -n 10 .venv/bin/hematovision segment train --data ../shared/data/wbc_seg_zheng --out runs/unet_zheng \\
        --width 8 --epochs 12
    nice -n 10 .venv/bin/python benchmarks/segmentation_zheng.py --out runs/seg_zheng --unet-run runs/unet_zheng
    # parts separately (results accumulate in --out):
    nice -n 10 .venv/bin/python benchmarks/segmentation_zheng.py --out runs/seg_zheng --parts clustering,bccd

Split: Zheng Dataset 1, seeded (seed 0) 210 train / 30 val / 60 test, pixel-identical images
kept together (:func:`hematovision.segment.masks.split_seg_samples`). EK-means and k-means
have no training; the U-Net trains on *train*, picks its epoch on *val*; all numbers are on *test*.

Writes ``results.json``, ``results.md`` (the tables in docs/segmentation.md), ``per_image.csv``
and ``dice_by_method.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="wbc_seg_zheng folder (default ../shared/data/wbc_seg_zheng)")
    parser.add_argument("--bccd", type=Path, help="bccd folder for EK-means on its masks (default ../shared/data/bccd)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=10, help="seeds for the stability comparison")
    parser.add_argument("--unet-run", type=Path, help="evaluate this U-Net run instead of training one")
    parser.add_argument("--unet-width", type=int, default=8)
    parser.add_argument("--unet-epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="clustering,unet,bccd", help="comma-separated parts to run")
    args = parser.parse_args()

    import torch

    from hematovision.paths import shared_data_dir
    from hematovision.segment.masks import (
        find_seg_samples,
        read_sample,
        split_seg_samples,
    )

    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    data = args.data or (shared / "wbc_seg_zheng" if shared else None)
    if data is None or not data.is_dir():
        raise SystemExit("Zheng data not found; pass --data")
    args.out.mkdir(parents=True, exist_ok=True)
    split = split_seg_samples(find_seg_samples(data), test_fraction=0.2, val_fraction=0.1, seed=0)
    test = split["test"]
    pairs = [read_sample(s) for s in test]
    results_path = args.out / "results.json"
    # Parts can be run separately (--parts); earlier results in the same --out are kept.
    results: dict = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update(split={k: len(v) for k, v in split.items()}, test_images=[s.name for s in test])
    per_image_path = args.out / "per_image.csv"
    per_image: list[dict] = []
    if per_image_path.exists():
        with open(per_image_path, newline="") as handle:
            per_image = [{k: (v if k in ("method", "image") else float(v)) for k, v in row.items()}
                         for row in csv.DictReader(handle)]
    parts = set(args.parts.split(","))
    if "clustering" in parts:
        per_image = [row for row in per_image if row["method"] == "U-Net"]
        results["clustering"] = clustering_benchmark(test, pairs, args.seeds, per_image)
    if "unet" in parts:
        per_image = [row for row in per_image if row["method"] != "U-Net"]
        results["unet"] = unet_benchmark(split, pairs, args, per_image)
    bccd = args.bccd or (shared / "bccd" if shared else None)
    if "bccd" in parts and bccd is not None and (bccd / "masks").is_dir():
        results["bccd_masks"] = bccd_mask_benchmark(bccd)

    results_path.write_text(json.dumps(results, indent=2) + "\n")
    with open(per_image_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(per_image[0]))
        writer.writeheader()
        writer.writerows(per_image)
    if "clustering" in results and "unet" in results:
        (args.out / "results.md").write_text(markdown(results))
        plot(per_image, args.out / "dice_by_method.png")
        print(markdown(results))
    else:
        print(json.dumps({k: results[k] for k in ("clustering", "unet", "bccd_masks") if k in results}, indent=2))


def clustering_benchmark(test: list, pairs: list, seeds: int, per_image: list[dict]) -> dict:
    """EK-means and k-means (random, k-means++) on the test images, each with ``seeds`` seeds."""
    from tqdm import tqdm

    from hematovision.segment.ekmeans import segment_ekmeans
    from hematovision.segment.metrics import segmentation_scores

    out = {}
    for init in ("fcm", "kmeans++", "random"):
        name = "EK-means (FCM init)" if init == "fcm" else f"k-means ({init} init)"
        scores = np.zeros((seeds, len(pairs), 5))
        times = []
        for seed in tqdm(range(seeds), desc=name, unit="seed"):
            for index, (image, target) in enumerate(pairs):
                start = time.perf_counter()
                pred = segment_ekmeans(image, init=init, seed=seed)
                times.append(1000 * (time.perf_counter() - start))
                row = segmentation_scores(pred, target)
                scores[seed, index] = [row[k] for k in KEYS]
                if seed == 0:
                    per_image.append({"method": name, "image": test[index].name, **{k: round(row[k], 5) for k in KEYS}})
        seed0 = scores[0].mean(axis=0)
        per_seed_mean = scores[:, :, 0].mean(axis=1)         # mean nucleus Dice of each seed
        per_image_std = scores[:, :, 0].std(axis=0)          # how much one image's result moves with the seed
        out[name] = {
            **{k: float(v) for k, v in zip(KEYS, seed0)},
            "nucleus_dice_over_seeds_mean": float(per_seed_mean.mean()),
            "nucleus_dice_over_seeds_std": float(per_seed_mean.std()),
            "nucleus_dice_per_image_seed_std_mean": float(per_image_std.mean()),
            "images_changing_with_seed": int((per_image_std > 1e-6).sum()),
            "runs_with_nucleus_dice_below_0.8": float((scores[:, :, 0] < 0.8).mean()),
            "ms_per_image_median": float(np.median(times)),
        }
    return out


def unet_benchmark(split: dict, pairs: list, args: argparse.Namespace, per_image: list[dict]) -> dict:
    """Train (or load) a U-Net and score it on the test images at their own size."""
    import torch

    from hematovision.segment.metrics import segmentation_scores
    from hematovision.segment.unet import (
        UNetConfig,
        load_unet,
        predict_labels,
        train_unet,
    )

    run = args.unet_run
    train_seconds = None
    if run is None:
        run = args.out / "unet"
        config = UNetConfig(base_width=args.unet_width, epochs=args.unet_epochs, threads=args.threads)
        split_info = {name: [s.name for s in items] for name, items in split.items()}
        history = train_unet(split["train"], split["val"], run, config, split_info)
        train_seconds = history["seconds"][-1]
    model, config = load_unet(run)
    history = json.loads((Path(run) / "history.json").read_text())
    torch.set_num_threads(args.threads)
    rows, times = [], []
    predict_labels(model, pairs[0][0], config)  # warm-up (first call allocates), not timed
    for sample, (image, target) in zip(split["test"], pairs):
        start = time.perf_counter()
        pred = predict_labels(model, image, config)
        times.append(1000 * (time.perf_counter() - start))
        row = segmentation_scores(pred, target)
        rows.append(row)
        per_image.append({"method": "U-Net", "image": sample.name, **{k: round(row[k], 5) for k in KEYS}})
    return {
        **{k: float(np.mean([r[k] for r in rows])) for k in KEYS},
        "nucleus_dice_min": float(np.min([r["nucleus_dice"] for r in rows])),
        "ms_per_image_median": float(np.median(times)),
        "run": str(run),
        "base_width": config.base_width, "depth": config.depth, "image_size": config.image_size,
        "epochs": config.epochs, "best_epoch": history.get("best_epoch"),
        "train_seconds": train_seconds if train_seconds is not None else history["seconds"][-1],
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def bccd_mask_benchmark(bccd: Path) -> dict:
    """EK-means on BCCD mask crops of the CBC test frames (crop from the mask: segmentation given a detection)."""
    from hematovision.segment.bccd_eval import read_split
    from hematovision.segment.ekmeans import segment_ekmeans
    from hematovision.segment.masks import find_seg_samples
    from hematovision.segment.metrics import evaluate_segmenter

    test = set(read_split(bccd, "test"))
    samples = [s for s in find_seg_samples(bccd) if s.name in test]
    rows, summary = evaluate_segmenter(samples, lambda image: segment_ekmeans(image), crop_to_cell=True)
    return {"images": len(rows), **{k: summary[k]["mean"] for k in KEYS}, "ms_per_image_median": summary["ms"]["median"]}


KEYS = ("nucleus_dice", "nucleus_iou", "cell_dice", "cell_iou", "pixel_accuracy")


def markdown(results: dict) -> str:
    split = results["split"]
    lines = [
        f"Zheng Dataset 1, held-out test split: {split['test']} images (seed 0; train {split['train']}, val {split['val']}).",
        "",
        "| method | nucleus Dice | nucleus IoU | cell Dice | cell IoU | pixel acc. | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = dict(results["clustering"])
    rows["U-Net"] = results["unet"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['nucleus_dice']:.4f} | {r['nucleus_iou']:.4f} | {r['cell_dice']:.4f} | "
            f"{r['cell_iou']:.4f} | {r['pixel_accuracy']:.4f} | {r['ms_per_image_median']:.1f} |"
        )
    lines += [
        "",
        "Stability over seeds (clustering methods, nucleus Dice on the test images):",
        "",
        "| method | mean over seeds | std of the per-seed mean | mean per-image std "
        "| images that change with the seed | runs with Dice < 0.8 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["clustering"].items():
        lines.append(
            f"| {name} | {r['nucleus_dice_over_seeds_mean']:.4f} | {r['nucleus_dice_over_seeds_std']:.4f} | "
            f"{r['nucleus_dice_per_image_seed_std_mean']:.4f} | {r['images_changing_with_seed']} | "
            f"{100 * r['runs_with_nucleus_dice_below_0.8']:.1f} % |"
        )
    u = results["unet"]
    lines += [
        "",
        (f"U-Net: width {u['base_width']}, depth {u['depth']}, {u['image_size']} px, {u['parameters']:,} parameters, "
        f"best epoch {u['best_epoch']} of {u['epochs']}, training {u['train_seconds'] / 60:.1f} min; "
        f"worst test image nucleus Dice {u['nucleus_dice_min']:.3f}."),
    ]
    if "bccd_masks" in results:
        b = results["bccd_masks"]
        lines += [
            "",
            (f"EK-means on BCCD masks (CBC test frames with masks: {b['images']}; crop around the labelled cell): "
            f"nucleus Dice {b['nucleus_dice']:.4f}, cell Dice {b['cell_dice']:.4f}, pixel accuracy {b['pixel_accuracy']:.4f}."),
        ]
    return "\n".join(lines) + "\n"


def plot(per_image: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in per_image))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("nucleus_dice", "cell_dice")):
        data = [[row[key] for row in per_image if row["method"] == m] for m in methods]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [m.replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_title(key.replace("_", " ") + " per test image")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
