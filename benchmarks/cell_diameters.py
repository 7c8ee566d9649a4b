"""Benchmark: the white cell's measured diameter in every single-cell dataset, and its accuracy.

Reproduce (from the repository root; run niced on a shared machine)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/cell_diameters.py --out runs/cell_diameters

For each dataset a seeded sample of at most ``--per-dataset`` images is measured with
:func:`hematovision.data.scale.find_cell`: the diameter in pixels, as a fraction of the image's
longer side (what ``Preprocessing.cell_scale`` would make it), the share of images where no cell
was found, and the CPU time per image. Where a reference exists the measurement is checked:

* ``wbc_seg_zheng/dataset1``: expert masks (nucleus + cytoplasm); equivalent-circle diameter.
* ``bccd``: Banik et al.'s expert masks of the BCCD frames, frames with one masked cell, cropped
  to a square around it with 25 % margin (as the segmentation benchmark does); and cropped
  tightly and off-centre so that the crop's edge cuts the cell, as automatic crops often do.
* ``txl_pbc_multilab/raabin``: TXL-PBC's WBC boxes (semi-automatic, checked by eye), the box
  nearest the centre; ``sqrt(width x height)`` (an ellipse's equivalent diameter).

Writes ``results.md`` (tables), ``results.json``, ``per_image.csv``, ``diameters.png`` (histograms)
and, with ``--overlays``, montages with the found cell circled for checking by eye.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATASETS = {
    "pbc_dev": "pbc_dev",
    "bccd_wbc_crops": "bccd_wbc_crops",
    "wbc_seg_zheng/dataset1": "wbc_seg_zheng/dataset1/images",
    "txl_pbc_multilab/raabin": "txl_pbc_multilab/raabin/images",
}


def sample_files(folder: Path, count: int, seed: int) -> list[Path]:
    """A seeded sample of the images under ``folder`` (sorted, so the sample is reproducible)."""
    from hematovision.data.images import is_image_file

    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if len(files) <= count:
        return files
    chosen = np.random.default_rng(seed).choice(len(files), count, replace=False)
    return [files[i] for i in sorted(chosen)]


def measure(image: np.ndarray) -> tuple[object, float]:
    """find_cell's result and its CPU milliseconds."""
    from hematovision.data.scale import find_cell

    start = time.process_time()
    cell = find_cell(image)
    return cell, 1000 * (time.process_time() - start)


def survey(shared: Path, per_dataset: int, seed: int) -> list[dict]:
    """One row per measured image of every dataset."""
    from hematovision.data.images import load_rgb

    rows = []
    for name, folder in DATASETS.items():
        root = shared / folder
        if not root.is_dir():
            print(f"skipped {name}: {root} not found")
            continue
        for path in sample_files(root, per_dataset, seed):
            image = load_rgb(path)
            cell, ms = measure(image)
            height, width = image.shape[:2]
            rows.append({
                "dataset": name, "file": str(path.relative_to(shared)), "label": path.parent.name.lower(),
                "height": height, "width": width, "ms": ms,
                "diameter": None if cell is None else cell.diameter,
                "fraction": None if cell is None else cell.diameter / max(height, width),
            })
    return rows


def validate(shared: Path, per_dataset: int, seed: int) -> dict[str, list[tuple[str, float, float | None]]]:
    """(name, reference diameter, measured diameter or None) per checked image, by reference."""
    from hematovision.data.images import load_rgb
    from hematovision.segment.masks import crop_to_cell, find_seg_samples, read_sample

    out: dict[str, list[tuple[str, float, float | None]]] = {}
    zheng = shared / "wbc_seg_zheng"
    if zheng.is_dir():
        out["wbc_seg_zheng/dataset1 (expert masks)"] = []
        for sample in find_seg_samples(zheng):
            image, labels = read_sample(sample)
            out["wbc_seg_zheng/dataset1 (expert masks)"].append(
                (sample.name, _equivalent_diameter(labels > 0), _diameter(image)))
    bccd = shared / "bccd"
    if bccd.is_dir():
        from scipy import ndimage as ndi

        out["bccd frames (expert masks, one cell)"] = []
        out["bccd frames, tight crops the edge cuts"] = []
        rng = np.random.default_rng(seed)
        for sample in find_seg_samples(bccd):
            image, labels = read_sample(sample)
            regions, count = ndi.label(labels > 0)
            sizes = np.bincount(regions.ravel())[1:]
            if count == 0 or (sizes > 0.2 * sizes.max()).sum() > 1:
                continue  # two masked cells: which one a crop should hold is ambiguous
            cell = regions == 1 + int(sizes.argmax())
            crop, crop_labels = crop_to_cell(image, cell.astype(np.uint8), margin=0.25)
            out["bccd frames (expert masks, one cell)"].append(
                (sample.name, _equivalent_diameter(crop_labels > 0), _diameter(np.ascontiguousarray(crop))))
            # Automatic crops are often tight and off-centre (46 % of bccd_wbc_crops' cells touch an edge).
            out["bccd frames, tight crops the edge cuts"].append(
                (sample.name, _equivalent_diameter(cell), _diameter(_tight_crop(image, cell, rng))))
    raabin = shared / "txl_pbc_multilab" / "raabin"
    if raabin.is_dir():
        out["txl_pbc_multilab/raabin (WBC boxes)"] = []
        for path in sample_files(raabin / "images", per_dataset, seed):
            boxes = _wbc_boxes(raabin / "labels" / f"{path.stem}.txt")
            if not boxes:
                continue
            image = load_rgb(path)
            height, width = image.shape[:2]
            x, y, w, h = min(boxes, key=lambda b: (b[0] - 0.5) ** 2 + (b[1] - 0.5) ** 2)
            out["txl_pbc_multilab/raabin (WBC boxes)"].append((path.stem, float(np.sqrt(w * width * h * height)),
                                                               _diameter(image)))
    return out


def _tight_crop(image: np.ndarray, cell: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square of the cell's extent whose centre is a quarter of the extent off the cell's, in a random direction."""
    rows, cols = np.nonzero(cell)
    extent = max(rows.max() - rows.min(), cols.max() - cols.min())
    angle = rng.uniform(0, 2 * np.pi)
    cy = (rows.min() + rows.max()) / 2 + 0.25 * extent * np.sin(angle)
    cx = (cols.min() + cols.max()) / 2 + 0.25 * extent * np.cos(angle)
    y0, x0 = int(max(0, cy - extent / 2)), int(max(0, cx - extent / 2))
    y1, x1 = int(min(image.shape[0], cy + extent / 2)), int(min(image.shape[1], cx + extent / 2))
    return np.ascontiguousarray(image[y0:y1, x0:x1])


def _diameter(image: np.ndarray) -> float | None:
    from hematovision.data.scale import measure_cell_diameter

    return measure_cell_diameter(image)


def _equivalent_diameter(mask: np.ndarray) -> float:
    return float(2.0 * np.sqrt(mask.sum() / np.pi))


def _wbc_boxes(path: Path) -> list[tuple[float, float, float, float]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [tuple(map(float, row[1:5])) for row in rows if row[0] == "0"]  # type: ignore[misc]


def summarise(rows: list[dict], checks: dict[str, list[tuple[str, float, float | None]]]) -> dict:
    """The numbers of the tables."""
    datasets = {}
    for name in DATASETS:
        part = [r for r in rows if r["dataset"] == name]
        if not part:
            continue
        found = [r for r in part if r["diameter"] is not None]
        diameters = np.array([r["diameter"] for r in found])
        fractions = np.array([r["fraction"] for r in found])
        sides = np.array([max(r["height"], r["width"]) for r in part])
        datasets[name] = {
            "images": len(part), "no_cell": 1 - len(found) / len(part),
            "side_median": float(np.median(sides)), "side_range": [int(sides.min()), int(sides.max())],
            "diameter_median": float(np.median(diameters)) if len(found) else None,
            "diameter_iqr": [float(v) for v in np.percentile(diameters, [25, 75])] if len(found) else None,
            "fraction_median": float(np.median(fractions)) if len(found) else None,
            "fraction_iqr": [float(v) for v in np.percentile(fractions, [25, 75])] if len(found) else None,
            "ms_median": float(np.median([r["ms"] for r in part])),
        }
    per_class = {}
    for row in rows:
        if row["dataset"] == "pbc_dev" and row["fraction"] is not None:
            per_class.setdefault(row["label"], []).append(row["fraction"])
    accuracy = {}
    for name, items in checks.items():
        errors = np.array([m / ref - 1 for _, ref, m in items if m is not None])
        accuracy[name] = {
            "images": len(items), "no_cell": sum(m is None for _, _, m in items),
            "median_abs_rel_error": float(np.median(np.abs(errors))), "median_rel_error": float(np.median(errors)),
            "within_15pct": float(np.sum(np.abs(errors) <= 0.15) / len(items)),
        }
    return {"datasets": datasets, "accuracy": accuracy,
            "pbc_fraction_by_class": {k: float(np.median(v)) for k, v in sorted(per_class.items())}}


def markdown(summary: dict, args: argparse.Namespace, load: tuple[float, float]) -> str:
    lines = [f"# White-cell diameters (`benchmarks/cell_diameters.py`, ≤ {args.per_dataset} images per dataset, "
             f"seed {args.seed})", "",
             "| dataset | images | typical side (px) | cell diameter, median (IQR) px | diameter / longer side, "
             "median (IQR) | no cell found | CPU ms / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, d in summary["datasets"].items():
        lo, hi = d["side_range"]
        side = f"{d['side_median']:.0f}" + (f" ({lo}–{hi})" if lo != hi else "")
        diameter = (f"{d['diameter_median']:.0f} ({d['diameter_iqr'][0]:.0f}–{d['diameter_iqr'][1]:.0f})"
                    if d["diameter_median"] is not None else "—")
        fraction = (f"{d['fraction_median']:.2f} ({d['fraction_iqr'][0]:.2f}–{d['fraction_iqr'][1]:.2f})"
                    if d["fraction_median"] is not None else "—")
        lines.append(f"| {name} | {d['images']} | {side} | {diameter} | {fraction} | {100 * d['no_cell']:.1f} % "
                     f"| {d['ms_median']:.1f} |")
    lines += ["", "Accuracy of the measured diameter against a reference:", "",
              "| reference | images | no cell found | median abs. relative error | median relative error (bias) "
              "| within 15 % |", "|---|---:|---:|---:|---:|---:|"]
    for name, a in summary["accuracy"].items():
        lines.append(f"| {name} | {a['images']} | {a['no_cell']} | {100 * a['median_abs_rel_error']:.1f} % "
                     f"| {100 * a['median_rel_error']:+.1f} % | {100 * a['within_15pct']:.1f} % |")
    lines += ["", "pbc_dev, median diameter / longer side by class (what scale normalisation takes away as a cue): "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary["pbc_fraction_by_class"].items()), "",
              f"CPU time of `find_cell` in this process on a shared machine (load average {load[0]:.1f} at the start, "
              f"{load[1]:.1f} at the end)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in DATASETS:
        found = [r for r in rows if r["dataset"] == name and r["diameter"] is not None]
        if not found:
            continue
        axes[0].hist([r["diameter"] for r in found], bins=40, range=(0, 500), histtype="step", label=name)
        axes[1].hist([r["fraction"] for r in found], bins=40, range=(0, 1.2), histtype="step", label=name)
    axes[0].set_xlabel("white-cell diameter (pixels)")
    axes[1].set_xlabel("diameter / image's longer side")
    for ax in axes:
        ax.set_ylabel("images")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlays(shared: Path, rows: list[dict], folder: Path, per_dataset: int = 8) -> None:
    """A montage per dataset: images spread over the sample (all classes) with the found cell circled."""
    from hematovision.data.images import load_rgb

    folder.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        part = [r for r in rows if r["dataset"] == name]
        part = [part[i] for i in np.linspace(0, len(part) - 1, min(per_dataset, len(part))).astype(int)] if part else []
        tiles = []
        for row in part:
            image = load_rgb(shared / row["file"])
            cell, _ = measure(image)
            tiles.append(draw_cell(image, cell))
        if tiles:
            Image.fromarray(np.concatenate(tiles, axis=1)).save(folder / f"{name.replace('/', '_')}.png")


def draw_cell(image: np.ndarray, cell: object, side: int = 240) -> np.ndarray:
    """The image scaled to ``side`` with the found cell's equivalent circle (green) and nucleus's (yellow)."""
    canvas = Image.new("RGB", (side, side))
    scale = side / max(image.shape[:2])
    picture = Image.fromarray(image).resize((round(image.shape[1] * scale), round(image.shape[0] * scale)))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    if cell is None:
        draw.line([0, 0, side, side], fill=(255, 0, 0), width=3)
        return np.asarray(canvas)
    row, col = (v * scale for v in cell.center)  # type: ignore[attr-defined]
    for radius, colour in ((cell.diameter / 2, (0, 220, 0)), (cell.nucleus_diameter / 2, (240, 220, 0))):  # type: ignore[attr-defined]
        r = radius * scale
        draw.ellipse([col - r, row - r, col + r, row + r], outline=colour, width=2)
    return np.asarray(canvas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared", type=Path, help="datasets folder (default: ../shared/data)")
    parser.add_argument("--per-dataset", type=int, default=300, help="images measured per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlays", type=Path, help="write montages with the found cells circled here")
    args = parser.parse_args()

    from hematovision.paths import shared_data_dir

    shared = args.shared or shared_data_dir()
    if shared is None or not shared.is_dir():
        raise SystemExit("../shared/data not found; give --shared")
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    rows = survey(shared, args.per_dataset, args.seed)
    checks = validate(shared, args.per_dataset, args.seed)
    summary = summarise(rows, checks)
    load = (load_start, os.getloadavg()[0])
    with open(args.out / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "results.json").write_text(json.dumps({**summary, "per_dataset": args.per_dataset, "seed": args.seed,
                                                      "load_average": load}, indent=2))
    (args.out / "results.md").write_text(markdown(summary, args, load))
    plot(rows, args.out / "diameters.png")
    if args.overlays:
        overlays(shared, rows, args.overlays)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
