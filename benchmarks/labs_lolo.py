"""Leave-one-lab-out: train on every labelled lab in ``../shared/data`` but one, test on the one left out.

The labs are PBC (``pbc_dev``, CellaVision, Barcelona), BCCD (``bccd_wbc_crops``) and Zheng et al.'s
``wbc_seg_zheng/dataset1`` (Jiangxi Tecom, yellow stain); the five white-cell classes. Each recipe is a
``hematovision train --mode frozen`` configuration; the held-out lab is scored with
``hematovision evaluate RUN --data LAB`` (all of it is test data), and then, for the few-shot curve,
``hematovision adapt RUN --data K_CELLS`` followed by ``evaluate`` on the rest of that lab.

    python benchmarks/labs_lolo.py --out runs/labs --recipe baseline --recipe scale
    python benchmarks/labs_lolo.py --out runs/labs --recipe scale --shots 0 1 5 10 20 --seeds 3

Finished cells (a recipe and a held-out lab, or one few-shot seed) are kept as JSON and never run again;
``--out/results.md`` is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from hematovision.data.classes import WBC5
from hematovision.paths import shared_data_dir

LABS = {"pbc": "pbc_dev", "bccd": "bccd_wbc_crops", "zheng": "wbc_seg_zheng/dataset1"}
# Each recipe is a set of `hematovision train` settings (TrainConfig fields).
RECIPES: dict[str, dict] = {
    "baseline": {},
    "scale": {"cell_scale": 0.38},
    "scale_stain": {"cell_scale": 0.38, "stain_norm": "reinhard"},
    "scale_augment": {"cell_scale": 0.38, "augment_copies": 2},
}
METRICS = ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "ece")


def zero_shot(out: Path, recipe: str, held_out: str, root: Path) -> dict:
    """Train on the other labs with ``recipe`` and evaluate on ``held_out``; the cell's result."""
    from hematovision.evaluate.external import evaluate_folder
    from hematovision.train.pipeline import TrainConfig, run_training

    cell = out / recipe / f"{held_out}.json"
    if cell.is_file():
        return json.loads(cell.read_text())
    run = out / recipe / f"without_{held_out}"
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    sources = [root / LABS[lab] for lab in LABS if lab != held_out]
    in_lab = run_training(TrainConfig(out=run, data=sources, classes=list(WBC5), seed=0, **RECIPES[recipe]))
    metrics = evaluate_folder(run, root / LABS[held_out], run / f"eval_{held_out}")
    result = {"recipe": recipe, "held_out": held_out, "train_labs": [lab for lab in LABS if lab != held_out],
              "in_lab_test": {k: in_lab[k] for k in METRICS},
              "held_out_lab": {k: metrics[k] for k in METRICS}, "lab_shift": metrics.get("lab_shift"),
              "seconds": time.perf_counter() - started}
    cell.parent.mkdir(parents=True, exist_ok=True)
    cell.write_text(json.dumps(result, indent=2))
    return result


def write_results(out: Path) -> Path:
    """A Markdown table of every finished zero-shot cell."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/*.json"))]
    lines = ["| recipe | held-out lab | trained on | n | accuracy | balanced acc. | macro-F1 | ECE | "
             "in-lab test bal. acc. |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        held = row["held_out_lab"]
        lines.append(f"| {row['recipe']} | {row['held_out']} | {'+'.join(row['train_labs'])} | {held['n_images']} | "
                     f"{held['accuracy']:.3f} | {held['balanced_accuracy']:.3f} | {held['macro_f1']:.3f} | "
                     f"{held['ece']:.3f} | {row['in_lab_test']['balanced_accuracy']:.3f} |")
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="repeatable (default: all)")
    parser.add_argument("--held-out", action="append", choices=sorted(LABS), help="repeatable (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = shared_data_dir()
    if root is None:
        raise SystemExit("labs_lolo: ../shared/data is not here; it needs the labelled labs")
    for recipe in args.recipe or sorted(RECIPES):
        for held_out in args.held_out or list(LABS):
            result = zero_shot(args.out, recipe, held_out, root)
            held = result["held_out_lab"]
            print(f"{recipe:14} {held_out:6} bal.acc {held['balanced_accuracy']:.3f} acc {held['accuracy']:.3f} "
                  f"({result['seconds'] / 60:.1f} min)", flush=True)
            write_results(args.out)
    print(f"table: {write_results(args.out)}")


if __name__ == "__main__":
    main()
