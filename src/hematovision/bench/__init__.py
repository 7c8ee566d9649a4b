"""``hematovision bench``: the papers' methods and ours, trained and tested on the same splits.

A *cell* is one (model, fold) pair: train on the fold's training part with the model's paper
recipe, test on the held-out part, save one JSON file (:mod:`~hematovision.bench.runner`).

Splits: stratified k-fold (grouped by the dataset's ``provenance_sift.csv`` origin when present,
and always by file content so byte-identical images stay together), or fixed train/test folders
(:mod:`~hematovision.bench.data`). Pretrained CNN parts are frozen and their outputs computed once
per image and cached (``$HEMATOVISION_HOME/bench_cache``, :mod:`~hematovision.bench.encoders`), so
each cell trains only the heads (:mod:`~hematovision.bench.cells`). The recipes are in
:mod:`~hematovision.bench.recipes`; the tables and plot in :mod:`~hematovision.bench.summary`.
"""

from hematovision.bench.cells import classification_scores
from hematovision.bench.config import OURS, BenchConfig
from hematovision.bench.data import per_pixel_stats, to_tensor
from hematovision.bench.recipes import PAPER_RECIPES, VARIANTS, Recipe
from hematovision.bench.runner import run_bench
from hematovision.bench.summary import summarize, summary_markdown, write_summary

__all__ = ["OURS", "PAPER_RECIPES", "VARIANTS", "BenchConfig", "Recipe", "classification_scores", "per_pixel_stats",
           "run_bench", "summarize", "summary_markdown", "to_tensor", "write_summary"]
