"""Evaluation outputs: ``metrics.json``, a Markdown report and PNG plots in one folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hematovision._io import write_json, write_text
from hematovision.evaluate.metrics import classification_metrics, metrics_by_group, reliability_bins


def write_evaluation(out_dir: str | Path, y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str],
                     title: str, context: dict | None = None, history: Sequence[dict] | None = None,
                     sources: Sequence[str | None] | None = None) -> dict:
    """Compute metrics and write ``metrics.json``, ``report.md`` and plots into ``out_dir``.

    Args:
        out_dir: destination folder (created).
        y_true: (N,) integer labels.
        y_prob: (N, K) calibrated probabilities.
        class_names: the K class names.
        title: report heading, e.g. ``"pbc_dev test split"``.
        context: extra facts (model, data, split) stored under ``"context"`` and listed in the report.
        history: per-epoch training rows, plotted when given.
        sources: (N,) the dataset of each image; with two or more, ``per_source`` metrics are added.

    Returns:
        The metrics dict (as in ``metrics.json``).
    """
    from hematovision.evaluate import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(y_true, y_prob, class_names)
    if sources is not None and len(set(sources)) > 1:
        metrics["per_source"] = metrics_by_group(y_true, y_prob, class_names, [str(name) for name in sources])
    metrics["context"] = context or {}
    write_json(out / "metrics.json", metrics)
    figures = {
        "confusion_matrix.png": plots.plot_confusion_matrix(metrics["confusion_matrix"], class_names,
                                                            out / "confusion_matrix.png", title),
        "per_class_recall.png": plots.plot_per_class_recall(metrics["per_class"], out / "per_class_recall.png", title),
        "reliability.png": plots.plot_reliability(reliability_bins(y_true, y_prob), out / "reliability.png", title),
    }
    if history:
        figures["training_curves.png"] = plots.plot_training_curves(history, out / "training_curves.png")
    write_text(out / "report.md", markdown_report(metrics, title, list(figures)))
    return metrics


def markdown_report(metrics: dict, title: str, figures: Sequence[str] = ()) -> str:
    """A readable Markdown summary of a metrics dict."""
    auc = metrics["roc_auc_ovr"]
    lines = [
        f"# {title}",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| images | {metrics['n_images']} |",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| balanced accuracy | {metrics['balanced_accuracy']:.4f} |",
        f"| macro F1 | {metrics['macro_f1']:.4f} |",
        f"| log loss | {metrics['log_loss']:.4f} |",
        f"| ROC-AUC (one-vs-rest, macro) | {'n/a' if auc is None else f'{auc:.4f}'} |",
        f"| expected calibration error | {metrics['ece']:.4f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    if metrics.get("per_source"):
        lines += ["", "| source | images | accuracy | balanced accuracy | macro F1 | ECE |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {row['n_images']} | {row['accuracy']:.4f} | {row['balanced_accuracy']:.4f} | "
                  f"{row['macro_f1']:.4f} | {row['ece']:.4f} |" for name, row in metrics["per_source"].items()]
    context = metrics.get("context") or {}
    if context:
        lines += ["", "## Context", ""]
        lines += [f"- **{key}**: {value}" for key, value in context.items() if not isinstance(value, (dict, list))]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"
