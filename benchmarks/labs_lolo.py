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
    # Each training lab standardised on its own class-balanced feature statistics; `evaluate` then
    # standardises the held-out lab on its own cells (the recommended recipe since 2026-12-04).
    "scale_stain_lab": {"cell_scale": 0.38, "stain_norm": "reinhard", "lab_standardise": True},
    # The morphology expert (cell measurements: nucleus share, lobes, hues, graininess) fused with the
    # network; measured on the prepared pixels, so without Reinhard, which distorts what it measures.
    "scale_lab_morph": {"cell_scale": 0.38, "lab_standardise": True, "morphology": True},
    "scale_stain_lab_morph": {"cell_scale": 0.38, "stain_norm": "reinhard", "lab_standardise": True, "morphology": True},
    # The same, plus the network `adapt --data` fine-tunes from: the last stages trained on the other
    # labs' cells (`train --few-shot-start`) instead of ImageNet's (the recommended recipe since 2026-12-05).
    "scale_stain_lab_morph_start": {"cell_scale": 0.38, "stain_norm": "reinhard", "lab_standardise": True,
                                    "morphology": True, "few_shot_start": 1000},
    "scale_augment": {"cell_scale": 0.38, "augment_copies": 2},
    # The recommended recipe with the features of 2 stain- and optics-augmented copies of each image.
    "scale_stain_lab_morph_aug": {"cell_scale": 0.38, "stain_norm": "reinhard", "lab_standardise": True,
                                  "morphology": True, "augment_copies": 2},
    # Fine-tuned end to end at 128 px with stain/optics/zoom augmentation: what the hidden labs
    # rewarded most for a PBC-only model (issue 12), here on every other lab.
    "finetune_strong": {"mode": "finetune", "image_size": 128, "cell_scale": 0.38, "stain_norm": "reinhard",
                        "finetune": {"epochs": 10, "strong_augment": True, "patience": 4}},
}
METRICS = ("n_images", "accuracy", "balanced_accuracy", "macro_f1", "ece")


def zero_shot(out: Path, recipe: str, held_out: str, root: Path) -> dict:
    """Train on the other labs with ``recipe`` and evaluate on ``held_out``; the cell's result."""
    from hematovision.evaluate.external import evaluate_folder
    from hematovision.train.finetune import FinetuneConfig
    from hematovision.train.pipeline import TrainConfig, run_training

    cell = out / recipe / f"{held_out}.json"
    if cell.is_file():
        return json.loads(cell.read_text())
    run = out / recipe / f"without_{held_out}"
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    sources = [root / LABS[lab] for lab in LABS if lab != held_out]
    settings = dict(RECIPES[recipe])
    if "finetune" in settings:
        settings["finetune"] = FinetuneConfig(**settings["finetune"])
    in_lab = run_training(TrainConfig(out=run, data=sources, classes=list(WBC5), seed=0, **settings))
    metrics = evaluate_folder(run, root / LABS[held_out], run / f"eval_{held_out}")
    result = {"recipe": recipe, "held_out": held_out, "train_labs": [lab for lab in LABS if lab != held_out],
              "in_lab_test": {k: in_lab[k] for k in METRICS},
              "held_out_lab": {k: metrics[k] for k in METRICS}, "lab_shift": metrics.get("lab_shift"),
              "lab_standardisation": metrics.get("lab_standardisation"), "review": metrics.get("review"),
              "per_class_recall": {name: row["recall"] for name, row in metrics.get("per_class", {}).items()},
              "seconds": time.perf_counter() - started}
    cell.parent.mkdir(parents=True, exist_ok=True)
    cell.write_text(json.dumps(result, indent=2))
    return result


def split_lab(root: Path, held_out: str, k: int, seed: int, folder: Path) -> tuple[Path, Path]:
    """Symlink k seeded cells per class of the held-out lab into ``folder/k_cells`` and the rest into
    ``folder/rest`` (class folders). A class with k or fewer cells gives half of them."""
    import numpy as np

    from hematovision.data.sources import scan_labelled

    samples = [s for s in scan_labelled(root / LABS[held_out]).samples if s.label in WBC5]
    rng = np.random.default_rng(seed)
    shutil.rmtree(folder, ignore_errors=True)
    for label in sorted({s.label for s in samples}):
        cells = [s for s in samples if s.label == label]
        order = rng.permutation(len(cells))
        take = min(k, len(cells) // 2) if len(cells) <= k else k
        for rank, index in enumerate(order):
            part = "k_cells" if rank < take else "rest"
            target = folder / part / label / f"{index:05d}_{cells[index].path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(cells[index].path.resolve())
    return folder / "k_cells", folder / "rest"


def few_shot(out: Path, recipe: str, held_out: str, root: Path, k: int, seed: int, adapt: str = "finetune",
             target: float | None = None) -> dict:
    """Adapt the run trained without ``held_out`` on k of its cells per class; score the rest.

    ``adapt``: ``finetune`` (what `hematovision adapt --data` does: head-only candidates and the
    fine-tuned last stages, chosen out-of-fold) or ``head`` (`--no-finetune`). ``target``: adapt's
    ``--target-accuracy`` (default: the source run's review target).
    """
    from hematovision.adapt.command import adapt_run
    from hematovision.evaluate.external import evaluate_folder

    suffix = ("" if adapt == "finetune" else f"_{adapt}") + (f"_t{round(100 * target)}" if target else "")
    cell = out / recipe / "few_shot" / f"{held_out}_k{k}_seed{seed}{suffix}.json"
    if cell.is_file():
        return json.loads(cell.read_text())
    run = out / recipe / f"without_{held_out}"
    work = out / recipe / "few_shot" / f"{held_out}_k{k}_seed{seed}{suffix}"
    shutil.rmtree(work, ignore_errors=True)
    k_cells, rest = split_lab(root, held_out, k, seed, work / "cells")
    started = time.perf_counter()
    adaptation = adapt_run(run, work / "adapted", data=k_cells, seed=seed, finetune=adapt == "finetune",
                           target_accuracy=target)
    metrics = evaluate_folder(work / "adapted", rest, work / "eval")
    # The k-shot target counts the classes that have k cells to label: a class with fewer
    # (Zheng's one basophil, BCCD's 3 basophils and 20 monocytes) gave half of them or none.
    full = [name for name, n in adaptation["cells"]["per_class"].items() if n >= k]
    recalls = [metrics["per_class"][name]["recall"] for name in full if name in metrics["per_class"]]
    result = {"recipe": recipe, "held_out": held_out, "k": k, "seed": seed, "adapt": adapt, "target_accuracy": target,
              "chosen": adaptation["choice"]["chosen"],
              # every candidate's out-of-fold score, the fine-tune's beside the head-only choice's
              "candidates": adaptation["choice"]["candidates"],
              "morphology": adaptation.get("morphology"),  # the lab's own expert, kept or not (out-of-fold)
              "rest": {key: metrics[key] for key in METRICS}, "review": metrics.get("review"),
              "lab_shift": metrics.get("lab_shift"),  # the adapted run on the rest of its own lab
              "classes_with_k_cells": full,
              "balanced_accuracy_classes_with_k_cells": sum(recalls) / len(recalls) if recalls else None,
              "seconds": time.perf_counter() - started}
    cell.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work / "adapted", ignore_errors=True)  # weights: large and not needed again
    return result


def write_curves(out: Path) -> Path | None:
    """Few-shot table (mean ± std over seeds) and plot, from every finished few-shot cell."""
    import numpy as np

    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*/few_shot/*.json"))]
    if not rows:
        return None
    zero = {(r["recipe"], r["held_out"]): r for r in (json.loads(p.read_text()) for p in out.glob("*/*.json"))}
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for row in rows:
        label = f"{row['recipe']}, adapt {row.get('adapt', 'head')}"
        if row.get("target_accuracy"):
            label += f", review target {row['target_accuracy']}"
        groups.setdefault((label, row["held_out"]), {}).setdefault(row["k"], []).append(row)
    zero = {(f"{recipe}, adapt {mode}", lab): row for (recipe, lab), row in zero.items() for mode in ("head", "finetune")}
    lines = ["| recipe | held-out lab | k per class | seeds | balanced acc. (rest of lab) | balanced acc., classes "
             "with k cells | accuracy | macro-F1 | % flagged | accuracy of unflagged |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for (recipe, held_out), by_k in sorted(groups.items()):
        ks, means, stds = [], [], []
        if (recipe, held_out) in zero:
            ks.append(0)
            means.append(zero[(recipe, held_out)]["held_out_lab"]["balanced_accuracy"])
            stds.append(0.0)
        for k, cells in sorted(by_k.items()):
            bal = np.array([c["rest"]["balanced_accuracy"] for c in cells])
            acc = np.array([c["rest"]["accuracy"] for c in cells])
            f1 = np.array([c["rest"]["macro_f1"] for c in cells])
            reviews = [c["review"] for c in cells if c.get("review")]
            flagged = f"{100 * np.mean([r['flagged_fraction'] for r in reviews]):.0f}" if reviews else "—"
            kept = [r["unflagged_accuracy"] for r in reviews if r["unflagged_accuracy"] is not None]
            kept_accuracy = f"{np.mean(kept):.3f}" if kept else "—"
            full = [c["balanced_accuracy_classes_with_k_cells"] for c in cells
                    if c.get("balanced_accuracy_classes_with_k_cells") is not None]
            full_text = f"{np.mean(full):.3f} ± {np.std(full):.3f}" if full else "—"
            lines.append(f"| {recipe} | {held_out} | {k} | {len(cells)} | {bal.mean():.3f} ± {bal.std():.3f} | "
                         f"{full_text} | {acc.mean():.3f} | {f1.mean():.3f} | {flagged} | {kept_accuracy} |")
            ks.append(k)
            means.append(float(bal.mean()))
            stds.append(float(bal.std()))
        axis.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=f"{held_out} ({recipe})")
    axis.set_xlabel("labelled cells per class from the held-out lab (k)")
    axis.set_ylabel("balanced accuracy on the rest of the lab")
    axis.set_ylim(0, 1)
    axis.axhline(0.92, color="grey", linestyle=":", linewidth=1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "few_shot.png", dpi=120)
    plt.close(figure)
    path = out / "few_shot.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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
    _plot_zero_shot(rows, out / "zero_shot.png")
    return path


def _plot_zero_shot(rows: list[dict], path: Path) -> None:
    """Grouped bars: each recipe's balanced accuracy on each held-out lab, chance and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted({row["recipe"] for row in rows}, key=list(RECIPES).index)
    labs = [lab for lab in LABS if any(row["held_out"] == lab for row in rows)]
    score = {(row["recipe"], row["held_out"]): row["held_out_lab"]["balanced_accuracy"] for row in rows}
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(recipes))
    for i, recipe in enumerate(recipes):
        xs = [j + i * width for j, lab in enumerate(labs) if (recipe, lab) in score]
        axis.bar(xs, [score[(recipe, lab)] for lab in labs if (recipe, lab) in score], width, label=recipe)
    axis.axhline(0.2, color="grey", linestyle=":", label="chance (5 classes)")
    axis.axhline(0.8, color="black", linestyle="--", label="target")
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(labs))], [f"{lab} held out" for lab in labs])
    axis.set_ylabel("balanced accuracy on the held-out lab")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="repeatable (default: all)")
    parser.add_argument("--held-out", action="append", choices=sorted(LABS), help="repeatable (default: all)")
    parser.add_argument("--shots", type=int, nargs="*", default=[],
                        help="few-shot curve: labelled cells per class of the held-out lab, e.g. 1 5 10 20")
    parser.add_argument("--seeds", type=int, default=3, help="few-shot draws per k (default 3)")
    parser.add_argument("--adapt", choices=("finetune", "head"), default="finetune",
                        help="few-shot adaptation: adapt's default (head-only candidates and fine-tuned last stages, "
                             "chosen out-of-fold) or head-only (--no-finetune)")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="few-shot: adapt's --target-accuracy for the review policy (default: the source run's)")
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
            for k in args.shots:
                for seed in range(args.seeds):
                    cell = few_shot(args.out, recipe, held_out, root, k, seed, args.adapt, args.target_accuracy)
                    print(f"{recipe:14} {held_out:6} k={k:<3} seed {seed}: bal.acc on the rest "
                          f"{cell['rest']['balanced_accuracy']:.3f}", flush=True)
                write_curves(args.out)
    print(f"table: {write_results(args.out)}; few-shot: {write_curves(args.out)}")


if __name__ == "__main__":
    main()
