"""The benchmark's summary: one row per (model, test set) over the finished cells, as CSV, Markdown and a plot."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hematovision._io import write_text
from hematovision.bench.config import BenchConfig


def summarize(out: Path, models: Sequence[str] | None = None) -> list[dict]:
    """One row per (model, test set): mean and std over the finished folds."""
    records: dict[tuple[str, str], list[dict]] = defaultdict(list)
    skipped: dict[str, str] = {}
    order: list[str] = list(models or [])
    for path in sorted((out / "cells").glob("*/*.json")):
        record = json.loads(path.read_text())
        if record["model"] not in order:
            order.append(record["model"])
        if "skipped" in record:
            skipped[record["model"]] = record["skipped"]
            continue
        for test_name, scores in record["tests"].items():
            records[(record["model"], test_name)].append({**record, **scores})
    rows = []
    for model in order:
        if model in skipped and not any(key[0] == model for key in records):
            rows.append({"model": model, "test": "-", "skipped": skipped[model]})
        for (name, test_name), cells in sorted(records.items()):
            if name != model:
                continue
            row = {"model": model, "test": test_name, "paper": cells[0].get("paper", ""), "init": cells[0].get("init", ""),
                   "folds_done": len(cells), "n_test": sum(c["n_test"] for c in cells)}
            for metric in ("accuracy", "precision", "recall", "macro_f1", "balanced_accuracy", "log_loss"):
                values = np.array([c[metric] for c in cells])
                row[metric] = float(values.mean())
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            for key in ("params", "trainable_params", "train_s", "infer_ms", "n_train_augmented"):
                row[key] = float(np.mean([c[key] for c in cells]))
            rows.append(row)
    return rows


def _fmt(row: dict, metric: str) -> str:
    value = 100 * row[metric]
    return f"{value:.2f} ± {100 * row[metric + '_std']:.2f}" if row["folds_done"] > 1 else f"{value:.2f}"


def summary_markdown(rows: Sequence[dict], title: str = "") -> str:
    """The summary as a Markdown table (percentages; ± is the std over folds)."""
    lines = [f"### {title}", ""] if title else []
    header = ("| model | init | test | folds | accuracy % | precision % | recall % | macro-F1 % | log loss | params | "
              "train s | ms/img |")
    lines += [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['model']} | not run | - | 0 | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | {row['init']} | {row['test']} | {row['folds_done']} | {_fmt(row, 'accuracy')} | "
            f"{_fmt(row, 'precision')} | {_fmt(row, 'recall')} | {_fmt(row, 'macro_f1')} | {row['log_loss']:.3f} | "
            f"{row['params'] / 1e6:.2f} M | {row['train_s']:.0f} | {row['infer_ms']:.1f} |")
    notes = [f"- {row['model']}: {row['skipped']}" for row in rows if "skipped" in row]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_summary(out: Path, rows: Sequence[dict], config: BenchConfig | None = None) -> None:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out``."""
    import csv
    import io

    columns = ["model", "test", "paper", "init", "folds_done", "n_test", "accuracy", "accuracy_std", "precision",
               "precision_std", "recall", "recall_std", "macro_f1", "macro_f1_std", "balanced_accuracy",
               "balanced_accuracy_std", "log_loss", "log_loss_std", "params", "trainable_params", "train_s",
               "infer_ms", "n_train_augmented", "skipped"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_text(out / "results.csv", buffer.getvalue())
    title = f"{config.data}" if config else ""
    write_text(out / "results.md", summary_markdown(rows, title))
    done = [row for row in rows if "skipped" not in row]
    if done:
        plot_summary(out / "results.png", done)


def plot_summary(path: Path, rows: Sequence[dict]) -> None:
    """A bar chart of macro-F1 (mean ± std over folds) per (model, test set); matplotlib is imported here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hematovision._io import atomic_write

    labels = [f"{row['model']} ({row['test']})" for row in rows]
    figure, axis = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    axis.barh(range(len(rows)), [100 * row["macro_f1"] for row in rows],
              xerr=[100 * row["macro_f1_std"] for row in rows], color="#4c72b0")
    axis.set_yticks(range(len(rows)), labels)
    axis.invert_yaxis()
    axis.set_xlabel("macro-F1 % (mean ± std over folds)")
    axis.set_xlim(0, 100)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
