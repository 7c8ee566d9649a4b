"""Benchmark: the whole-field pipeline on held-out BCCD frames, scored against the VOC boxes.

Reproduce (from the repository root)::

    nice -n 10 .venv/bin/python benchmarks/segmentation_bccd.py --out runs/seg_bccd
    # with white-cell classification by a classifier run folder (e.g. trained on PBC):
    nice -n 10 .venv/bin/python benchmarks/segmentation_bccd.py --out runs/seg_bccd --model runs/pbc_finetune128

Held-out set: CBC ``test`` list (60 frames); the pipeline parameters (``FieldParams`` defaults)
were chosen on CBC ``train`` frames only. ``--split train`` scores the tuning frames instead.

Writes ``results.json``, ``results.md``, ``per_frame.csv``, ``count_errors.png`` and, for a
visual audit of the red-cell annotations, ``audit/<frame>.png`` overlays of the first
``--audit`` frames (annotated boxes thin orange, found red cells as red circles).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bccd", type=Path, help="bccd folder (default ../shared/data/bccd)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--model", type=Path, help="classifier run folder for the found white cells")
    parser.add_argument("--audit", type=int, default=8, help="frames to draw for the red-cell annotation audit")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from hematovision.paths import shared_data_dir
    from hematovision.segment.bccd_eval import (
        check_split_leaks,
        evaluate_frames,
        read_split,
        unannotated_red_fraction,
    )

    torch.set_num_threads(args.threads)
    shared = shared_data_dir()
    bccd = args.bccd or (shared / "bccd" if shared else None)
    if bccd is None or not (bccd / "JPEGImages").is_dir():
        raise SystemExit("BCCD data not found; pass --bccd")
    args.out.mkdir(parents=True, exist_ok=True)
    stems = read_split(bccd, args.split)
    leaks = check_split_leaks(bccd, read_split(bccd, "train"), read_split(bccd, "test"))
    classifier = None
    if args.model:
        from hematovision.infer.predictor import Predictor

        classifier = Predictor.from_run_dir(args.model)
    rows, summary = evaluate_frames(bccd, stems, classifier=classifier)
    if classifier is not None:
        # The timing above includes classification; time detection alone too.
        _, plain = evaluate_frames(bccd, stems, progress=False)
        summary["seconds_per_frame_without_classifier"] = plain["seconds_per_frame"]
    outside = [unannotated_red_fraction(bccd, stem)[0] for stem in stems]
    summary["rbc"]["unannotated_red_area_fraction_median"] = float(np.median(outside))
    summary["rbc"]["unannotated_red_area_fraction_mean"] = float(np.mean(outside))
    for row, value in zip(rows, outside):
        row["unannotated_red_area_fraction"] = round(value, 4)
    results = {"split": f"CBC {args.split}", "frames": len(stems), "near_duplicate_leaks": leaks, "summary": summary,
               "model": str(args.model) if args.model else None}
    if classifier is not None:
        results["model_classes"] = list(classifier.class_names)

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(args.out / "per_frame.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "results.md").write_text(markdown(results))
    plot(rows, args.out / "count_errors.png")
    draw_audit(bccd, stems[: args.audit], args.out / "audit")
    print(markdown(results))


def markdown(results: dict) -> str:
    s = results["summary"]
    w, p, r = s["wbc"], s["platelet"], s["rbc"]
    lines = [
        f"BCCD, {results['split']} frames: {results['frames']} "
        f"(near-duplicate pairs across train/test: {len(results['near_duplicate_leaks'])}).",
        "",
        "| white cells | value |",
        "|---|---:|",
        f"| annotated / found | {w['true']} / {w['found']} |",
        f"| TP / FP / FN at IoU ≥ 0.5 | {w['tp']} / {w['fp']} / {w['fn']} |",
        f"| precision | {w['precision']:.4f} |",
        f"| recall | {w['recall']:.4f} |",
        f"| F1 | {w['f1']:.4f} |",
        f"| frames with the exact WBC count | {100 * w['count_exact_fraction']:.1f} % |",
        f"| mean IoU of matched boxes | {w['mean_iou_matched']:.3f} |",
        "",
        "| count per frame (found − annotated) | platelets | red cells |",
        "|---|---:|---:|",
        f"| annotated / found (all frames) | {p['true']} / {p['found']} | {r['true']} / {r['found']} |",
        f"| mean error | {p['mean_error']:+.2f} | {r['mean_error']:+.2f} |",
        f"| mean absolute error | {p['mean_abs_error']:.2f} | {r['mean_abs_error']:.2f} |",
        f"| frames exact | {100 * p['exact_fraction']:.1f} % | {100 * r['exact_fraction']:.1f} % |",
        f"| frames within ±1 | {100 * p['within_1_fraction']:.1f} % | {100 * r['within_1_fraction']:.1f} % |",
        "",
        (f"Red cells: {r['matched']} of {r['true']} annotated boxes contain a found centre "
        f"(recall of annotated cells {r['recall_of_annotated']:.3f}); {r['unmatched']} found cells are left unmatched. "
        f"{r['outside_boxes']} found cells lie inside no annotated box at all; {r['outside_boxes_at_edge']} of them are centred "
        f"within a radius of the frame edge. "
        f"Counting only cells centred at least a radius inside the frame: "
        f"annotated {r['interior_true']}, found {r['interior_found']}, "
        f"mean error {r['interior_mean_error']:+.2f}, mean absolute error {r['interior_mean_abs_error']:.2f} per frame. "
        f"Median fraction of red-cell-coloured area outside every annotated box: "
        f"{100 * r['unannotated_red_area_fraction_median']:.1f} % (mean {100 * r['unannotated_red_area_fraction_mean']:.1f} %)."),
        "",
        f"Speed: {s['seconds_per_frame']:.3f} s per 640x480 frame ({1 / s['seconds_per_frame']:.2f} frames/s)"
        + (f"; without classification {s['seconds_per_frame_without_classifier']:.3f} s"
           if "seconds_per_frame_without_classifier" in s else "")
        + ".",
    ]
    if "classification" in s:
        c = s["classification"]
        lines += [
            "",
            (f"White-cell type vs `labels.csv` ({results['model']}): agreement {100 * c['agreement']:.1f} % on "
            f"{c['frames_scored']} frames with one found cell and one label."),
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, kind, title in zip(axes, ("wbc", "platelet", "rbc"), ("white cells", "platelets", "red cells")):
        errors = [row[f"{kind}_found"] - row[f"{kind}_true"] for row in rows]
        low, high = min(errors + [-1]), max(errors + [1])
        ax.hist(errors, bins=np.arange(low - 0.5, high + 1.5), color="tab:blue")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{title}: found − annotated")
        ax.set_xlabel("count error per frame")
    axes[0].set_ylabel("frames")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_audit(bccd: Path, stems: list[str], folder: Path) -> None:
    from PIL import Image, ImageDraw

    from hematovision.data.images import load_rgb
    from hematovision.segment.field import analyze_field, draw_field, read_voc_boxes

    folder.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        image = load_rgb(bccd / "JPEGImages" / f"{stem}.jpg")
        result = analyze_field(image)
        canvas = Image.fromarray(draw_field(image, result))
        draw = ImageDraw.Draw(canvas)
        for box in read_voc_boxes(bccd / "Annotations" / f"{stem}.xml"):
            colour = {"wbc": (0, 200, 255), "rbc": (255, 150, 0), "platelet": (255, 0, 255)}[box.label]
            draw.rectangle(box.as_list(), outline=colour, width=1)
        draw.text((4, 4), f"{stem}: {result.message}", fill=(0, 0, 0))
        canvas.save(folder / f"{stem}.png")


if __name__ == "__main__":
    main()
