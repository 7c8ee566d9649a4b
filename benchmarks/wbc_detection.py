"""Benchmark: finding white cells in whole fields from three labs, before (``lab`` finder) and after (``adaptive``).

Reproduce (from the repository root; one thread, niced, about 15 min on the shared 2-core machine)::

    nice -n 10 .venv/bin/python benchmarks/wbc_detection.py --out runs/wbc_detection
    # quick look: 20 frames per set, the adaptive finder only
    nice -n 10 .venv/bin/python benchmarks/wbc_detection.py --out /tmp/wbc --limit 20 --finders adaptive

Data: ``../shared/data/txl_pbc_multilab`` (YOLO boxes, class 0 = WBC) and ``../shared/data/bccd``
(only for its CBC split lists). Sets and splits:

* ``bcd`` (219 frames, 416x416, Kaggle "Blood Cell Detection", another lab): the *tuning* third
  (:func:`hematovision.segment.detection.is_tuning_frame`, a hash of the file name) and the
  *report* two thirds;
* ``bccd`` (221 BCCD frames with TXL-PBC's boxes): *report* = the 60 frames of BCCD's CBC ``test``
  list (held out from every BCCD tuning), *tuning* = the 157 frames of CBC ``train``;
* ``raabin`` (500 Raabin-WBC crops, 575x575, one or two WBCs each): tuning/report thirds as bcd;
* WBC-free tiles: the quarters of the bcd and BCCD report frames that overlap no WBC box (and
  hold at least two whole red cells); every white cell found there is false;
* ``--stress``: the report frames of bcd and BCCD again, with a cyan cast, a yellow cast, and at
  0.6x magnification (the boxes scaled with the image).

Finders: ``lab`` = the first BCCD finder (fixed b* < -20 stain mask) at the ``count`` default of
that time, a red-cell diameter of 100 px; ``adaptive`` = :mod:`hematovision.segment.nuclei` with
the diameter measured in each frame. Writes ``results.json``, ``results.md`` and ``per_frame.csv``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

# Colour casts for --stress: a cyan background (red channel weak) and a yellow one (blue weak).
CASTS = {"cyan cast": (0.65, 0.95, 1.0), "yellow cast": (1.0, 0.95, 0.65)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="txl_pbc_multilab folder (default ../shared/data/txl_pbc_multilab)")
    parser.add_argument("--bccd", type=Path, help="bccd folder, for its CBC split lists (default ../shared/data/bccd)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--finders", nargs="+", default=["lab", "adaptive"], choices=["lab", "adaptive"])
    parser.add_argument("--limit", type=int, help="at most this many frames per set and split (quick runs)")
    parser.add_argument("--stress", action="store_true", help="also score tinted and rescaled copies of the report frames")
    parser.add_argument("--no-tuning", action="store_true", help="score the report splits only")
    args = parser.parse_args()

    from hematovision.paths import shared_data_dir

    shared = shared_data_dir()
    data = args.data or (shared / "txl_pbc_multilab" if shared else None)
    bccd = args.bccd or (shared / "bccd" if shared else None)
    if data is None or not (data / "bcd" / "images").is_dir():
        raise SystemExit("txl_pbc_multilab not found; pass --data")
    args.out.mkdir(parents=True, exist_ok=True)

    sets = build_sets(data, bccd, args.limit, tuning=not args.no_tuning)
    from hematovision.segment.detection import false_finds_in_wbc_free_tiles

    results, rows, empty = [], [], []
    for finder in args.finders:
        find = make_finder(finder)
        for (name, split), frames in sets.items():
            results.append(run(find, finder, name, split, frames, rows))
        for name in ("bcd", "bccd"):
            tiles, finds = false_finds_in_wbc_free_tiles(sets[(name, "report")], find)
            empty.append({"finder": finder, "set": name, "tiles": tiles, "false_finds": finds})
            print(f"{finder:8s} {name:6s} report, WBC-free tiles: {finds} white cells found in {tiles} tiles", flush=True)
        if args.stress:
            from hematovision.segment.detection import tint

            for name in ("bcd", "bccd"):
                frames = sets[(name, "report")]
                for cast, gains in CASTS.items():
                    results.append(run(find, finder, name, f"report, {cast}", frames, rows,
                                       transform=lambda im, g=gains: tint(im, g)))
                results.append(run(find, finder, name, "report, 0.6x magnification", frames, rows, scale=0.6))

    (args.out / "results.json").write_text(json.dumps({"results": results, "wbc_free_tiles": empty}, indent=2) + "\n")
    with open(args.out / "per_frame.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "results.md").write_text(markdown(results, empty))
    print(markdown(results, empty))


def build_sets(data: Path, bccd: Path | None, limit: int | None, tuning: bool = True) -> dict:
    """{(set, split): frames} for bcd, bccd and raabin (see the module docstring)."""
    from hematovision.segment.bccd_eval import read_split
    from hematovision.segment.detection import is_tuning_frame, list_yolo_frames

    sets: dict = {}
    for name in ("bcd", "bccd", "raabin"):
        frames = list_yolo_frames(data / name)
        if name == "bccd":
            if bccd is None or not (bccd / "JPEGImages").is_dir():
                raise SystemExit("the bccd folder is needed for the CBC split lists; pass --bccd")
            names = bccd_names(frames, bccd)
            test, train = set(read_split(bccd, "test")), set(read_split(bccd, "train"))
            report = [f for f in frames if names.get(f.stem) in test]
            tune = [f for f in frames if names.get(f.stem) in train]
        else:
            report = [f for f in frames if not is_tuning_frame(f.stem)]
            tune = [f for f in frames if is_tuning_frame(f.stem)]
        sets[(name, "report")] = report[:limit]
        if tuning:
            sets[(name, "tuning")] = tune[:limit]
    return sets


def bccd_names(frames: list, bccd: Path) -> dict[str, str]:
    """TXL-PBC's BCCD file stem → BCCD frame name (the files are byte-identical)."""
    by_hash = {hashlib.md5(p.read_bytes()).hexdigest(): p.stem for p in (bccd / "JPEGImages").glob("*.jpg")}
    return {f.stem: by_hash.get(hashlib.md5(f.image.read_bytes()).hexdigest(), "") for f in frames}


def make_finder(finder: str):
    from hematovision.segment.field import FieldParams, locate_white_cells

    # "lab" as `count` ran it before the adaptive finder: fixed stain threshold, 100 px red cells.
    params = FieldParams(finder="lab", rbc_diameter=100.0) if finder == "lab" else FieldParams()
    return lambda image: [cell.box for cell in locate_white_cells(image, params)]


def run(find, finder: str, name: str, split: str, frames: list, rows: list, transform=None, scale: float = 1.0) -> dict:
    from hematovision.segment.detection import evaluate_finder, summarize

    start = time.perf_counter()
    scores = evaluate_finder(frames, find, transform=transform, scale=scale)
    seconds = (time.perf_counter() - start) / max(1, len(frames))
    summary = {"finder": finder, "set": name, "split": split, **summarize(scores), "seconds_per_frame": seconds}
    rows += [{"finder": finder, "set": name, "split": split, **asdict(s)} for s in scores]
    print(f"{finder:8s} {name:6s} {split:32s} F1 {summary['f1']:.3f}  P {summary['precision']:.3f}  "
          f"R {summary['recall']:.3f}  exact {summary['count_exact']:.3f}  ({len(frames)} frames, {seconds:.2f} s/frame)",
          flush=True)
    return summary


def markdown(results: list[dict], empty: list[dict]) -> str:
    lines = [
        "| finder | set | split | frames | WBC annotated / found | TP / FP / FN | precision | recall | **F1** | exact count |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['finder']} | {r['set']} | {r['split']} | {r['frames']} | {r['true']} / {r['found']} | "
            f"{r['tp']} / {r['fp']} / {r['fn']} | {r['precision']:.3f} | {r['recall']:.3f} | **{r['f1']:.3f}** | "
            f"{100 * r['count_exact']:.1f} % |"
        )
    return "\n".join(lines) + "\n\nIoU ≥ 0.5, one-to-one matching. Seconds per frame: " + ", ".join(
        f"{r['finder']}/{r['set']}/{r['split']} {r['seconds_per_frame']:.2f}" for r in results if "," not in r["split"]
    ) + " (shared 2-core machine, one thread).\n\nWBC-free tiles (report frames' quarters without a WBC box): " + "; ".join(
        f"{e['finder']}/{e['set']}: {e['false_finds']} false finds in {e['tiles']} tiles" for e in empty
    ) + ".\n"


if __name__ == "__main__":
    main()
