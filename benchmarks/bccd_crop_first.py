"""Benchmark: crop-first ``bccd_wbc4_aug`` — the white-cell crop of every frame, found by the project's own finder.

Reproduce (from the repository root; about 18 min for all 12,515 frames on one thread of the shared machine)::

    nice -n 10 .venv/bin/python benchmarks/bccd_crop_first.py --out runs/bccd_crops
    # then classify crops (TRAIN/TEST/TEST_SIMPLE kept; augmentations of one cell stay together):
    hematovision train --train-dir runs/bccd_crops/crops/TRAIN --test-dir runs/bccd_crops/crops/TEST \\
        --group-csv ../shared/data/bccd_wbc4_aug/provenance_sift.csv --out runs/bccd_crop_frozen

Each 320x240 frame goes through :func:`hematovision.segment.crops.write_crop_dataset` (the
adaptive finder and the square crop of ``hematovision count``; the largest, then most central,
white cell when several are found). Crops keep the source's relative path and file name, so the
source's ``provenance_sift.csv`` works as ``--group-csv``.

Check of the chosen cell on TEST_SIMPLE (the 71 un-augmented test frames): each is a BCCD frame
halved, and ``provenance_sift.csv`` names it, so the chosen box is compared with that frame's VOC
WBC boxes (halved): a crop is *right* when it matches one at IoU ≥ 0.5 (and the frame is not a
mirror image; mirrored frames are checked mirrored).

Writes ``crops/`` (the dataset, with ``crops.csv``), ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="bccd_wbc4_aug folder (default ../shared/data/bccd_wbc4_aug)")
    parser.add_argument("--bccd", type=Path, help="bccd folder for the TEST_SIMPLE check (default ../shared/data/bccd)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["TEST_SIMPLE", "TEST", "TRAIN"])
    args = parser.parse_args()

    from tqdm import tqdm

    from hematovision.paths import shared_data_dir
    from hematovision.segment.crops import MANIFEST_FILE, write_crop_dataset

    shared = shared_data_dir()
    data = args.data or (shared / "bccd_wbc4_aug" if shared else None)
    bccd = args.bccd or (shared / "bccd" if shared else None)
    if data is None or not data.is_dir():
        raise SystemExit("bccd_wbc4_aug not found; pass --data")
    results: dict = {"source": str(data), "splits": {}}
    for split in args.splits:
        bar = tqdm(desc=split, unit="frame")

        def advance(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = write_crop_dataset(data / split, args.out / "crops" / split, progress=advance)
        bar.close()
        results["splits"][split] = summary
        print(f"{split}: {summary['cropped']} of {summary['images']} frames cropped, "
              f"{summary['no_cell']} without a white cell, {summary['several_found']} with several", flush=True)
    if "TEST_SIMPLE" in args.splits and bccd is not None and (bccd / "Annotations").is_dir():
        manifest = args.out / "crops" / "TEST_SIMPLE" / MANIFEST_FILE
        results["test_simple_check"] = check_test_simple(manifest, data / "provenance_sift.csv", bccd)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))


def check_test_simple(manifest: Path, provenance: Path, bccd: Path) -> dict:
    """How many TEST_SIMPLE crops match a VOC WBC box of their (halved) BCCD original."""
    from hematovision.segment.field import Box, read_voc_boxes

    origin = {}
    with open(provenance, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "TEST_SIMPLE":
                origin[f"{row['class']}/{row['file']}"] = Path(row["source_original"]).stem
    right = checked = 0
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            stem = origin.get(row["file"])
            if not row["x0"] or stem is None:
                continue
            xml = bccd / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                continue
            truth = [Box(b.x0 / 2, b.y0 / 2, b.x1 / 2, b.y1 / 2) for b in read_voc_boxes(xml) if b.label == "wbc"]
            x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
            found, mirrored = Box(x0, y0, x1, y1), Box(320 - x1, y0, 320 - x0, y1)
            checked += 1
            right += any(max(found.iou(t), mirrored.iou(t)) >= 0.5 for t in truth)
    return {"checked": checked, "right": right}


def markdown(results: dict) -> str:
    lines = ["| split | frames | cropped | no white cell found | several found (largest kept) |", "|---|---:|---:|---:|---:|"]
    for split, s in results["splits"].items():
        lines.append(f"| {split} | {s['images']} | {s['cropped']} ({100 * s['cropped'] / max(1, s['images']):.1f} %) | "
                     f"{s['no_cell']} | {s['several_found']} |")
    lines += ["", "| split/class | frames | cropped |", "|---|---:|---:|"]
    for split, s in results["splits"].items():
        for folder, counts in s["by_folder"].items():
            total = sum(counts.get(k, 0) for k in ("cropped", "no_cell", "unreadable"))
            lines.append(f"| {split}/{folder} | {total} | {counts.get('cropped', 0)} |")
    check = results.get("test_simple_check")
    if check:
        lines += ["", f"TEST_SIMPLE: the chosen cell matches a VOC WBC box of the original frame (IoU ≥ 0.5) in "
                      f"{check['right']} of {check['checked']} cropped frames."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
