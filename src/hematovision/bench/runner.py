"""``hematovision bench``: every missing (model, fold) cell, then the summary.

A cell trains on the fold's training part, tests on the held-out part and saves one JSON file.
Finished cells are never recomputed, so an interrupted benchmark continues where it stopped;
skipped cells (weights unavailable) are tried again. The summary is rebuilt from whatever cells
exist.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from hematovision._io import write_json
from hematovision.bench.cells import CellPlan, plan_cells, run_ours_cell, run_paper_cell
from hematovision.bench.config import OURS, BenchConfig
from hematovision.bench.data import ImageCache, prepare_data
from hematovision.bench.recipes import Recipe
from hematovision.bench.summary import summarize, write_summary
from hematovision.data.splits import write_split_csv
from hematovision.models import PretrainedUnavailableError

log = logging.getLogger(__name__)

__all__ = ["CellPlan", "cell_path", "prepare_data", "run_bench", "run_ours_cell", "run_paper_cell"]


def cell_path(out: Path, model: str, fold: str) -> Path:
    """Where the result record of ``model`` on ``fold`` is kept."""
    return out / "cells" / model.replace("@", "__") / f"{fold}.json"


def run_bench(config: BenchConfig, force: bool = False) -> list[dict]:
    """Run every missing (model, fold) cell, then write the summary; returns the summary rows."""
    torch.set_num_threads(max(1, min(config.threads, os.cpu_count() or 1)))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in config.models:
        if name.partition("@")[0] != OURS:
            Recipe.for_model(name)  # unknown names and variants fail before any work
    data = prepare_data(config)
    samples, labels, plans = plan_cells(data)
    parts = [*(f"fold{f}" for f in data.folds)] if data.folds is not None else ["train"] * len(data.train)
    parts += [name for name in sorted(data.tests) for _ in data.tests[name]]
    write_split_csv(out / "split.csv", samples, parts, data.groups + [""] * (len(samples) - len(data.train)))
    write_json(out / "config.json", {**asdict(config), "class_names": data.class_names, "data_key": data.key,
                                     "n_train_pool": len(data.train), "tests": {k: len(v) for k, v in data.tests.items()}})
    images = ImageCache(samples)
    for name in config.models:
        for plan in plans:
            path = cell_path(out, name, plan.fold)
            # Skipped cells (weights unavailable) are tried again: --random-init or a network may help now.
            if path.is_file() and not force and "skipped" not in json.loads(path.read_text()):
                continue
            log.info("bench: %s %s", name, plan.fold)
            try:
                if name == OURS:
                    record = run_ours_cell(data, plan, samples, labels, images, config)
                else:
                    record = run_paper_cell(name, data, plan, samples, labels, images, config)
            except PretrainedUnavailableError as error:
                log.warning("skipping %s: %s", name, error)
                record = {"model": name, "fold": plan.fold, "skipped": str(error)}
            record["class_names"] = data.class_names
            write_json(path, record)
    rows = summarize(out, config.models)
    write_summary(out, rows, config)
    return rows
