"""The Ray engine: ``predict --engine ray`` scores an archive on Ray Data actors, here or on a cluster.

The same code as the local engine runs inside each actor: :class:`BatchPredictor` loads the run
once with :meth:`Predictor.from_run_dir <hematovision.infer.predictor.Predictor.from_run_dir>` and
scores each batch of file paths with :func:`~hematovision.infer.stream.stream_predictions`
(decoding, preprocessing, views, calibration, review flags, per-image lab-shift score), so the
answers are the local engine's for the same images. The dataset is just the paths: pixels are
decoded where they are scored, so nothing but file names and results crosses the network.

The results stream back to the driver (a few hundred bytes per image), which writes them exactly
as the local engine does (CSV, JSON, or Parquet shards with ``--resume``, see
:mod:`hematovision.parquet_results`) and shows one progress bar with rate and ETA for the job.

Every worker must see the run folder and the images under the same paths as the driver (a shared
file system); each actor changes to the driver's working folder when it exists there, so relative
paths work on one machine and on a cluster that mounts the same tree. See docs/scale.md.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from hematovision.errors import HematoVisionError
from hematovision.infer.exported import BATCH_SIZE
from hematovision.infer.predictor import Predictor
from hematovision.infer.stream import StreamResult, stream_predictions

INSTALL_HINT = "pip install 'hematovision[ray]'"


def require_ray() -> ModuleType:
    """``ray`` with Ray Data, or one line that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  # the extra is ray[data]; a bare ray lacks pyarrow and pandas
    except ImportError as error:
        raise HematoVisionError(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from error
    return ray


class BatchPredictor:
    """A Ray Data actor: a run loaded once, scoring batches of file paths with the local engine's code.

    Args:
        run_dir: the run folder (as every worker sees it).
        views: dihedral views per image; backend: ``torch``, ``onnx`` or ``int8`` (resolved by the driver,
            so every actor uses the same one).
        threads: PyTorch/ONNX Runtime intra-op threads (the actor's CPUs).
        batch_size: images per forward pass; decode_workers: decoding threads beside the model.
        cwd: the driver's working folder, entered when it exists here (relative paths then resolve alike).
    """

    def __init__(self, run_dir: str, views: int, backend: str, threads: int, batch_size: int, decode_workers: int,
                 cwd: str) -> None:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        # The actor's CPUs, before the model loads: an exported runtime reads them without torch
        # (hematovision.threads.inference_threads), the torch backend from torch itself.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if backend == "torch" or "torch" in sys.modules:
            import torch

            torch.set_num_threads(threads)
        self.predictor = Predictor.from_run_dir(run_dir, views, backend=backend)
        self.batch_size = batch_size
        self.decode_workers = decode_workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"index", "path"}`` → index, probabilities (n, K; NaN when unreadable), error, sha256, shift, flag."""
        paths = [Path(os.fsdecode(bytes(raw))) for raw in batch["path"]]
        self.predictor.reset_shift()  # per-image scores only; the job-wide score is the driver's
        results = list(stream_predictions(self.predictor, paths, self.batch_size, self.decode_workers,
                                          hash_files=True, progress=False))
        probabilities = np.full((len(paths), len(self.predictor.class_names)), np.nan)
        for i, result in enumerate(results):
            if result.probabilities is not None:
                probabilities[i] = result.probabilities
        return {
            "index": np.asarray(batch["index"], np.int64),
            "probabilities": probabilities,
            "error": np.array([result.error or "" for result in results], object),
            "sha256": np.array([result.sha256 for result in results], object),
            "shift_score": np.array([np.nan if result.shift_score is None else result.shift_score for result in results]),
            "flagged": np.array([result.flagged for result in results], bool),
        }


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's INFO lines (execution plan, "finished in") would cut through the progress bar."""
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    quiet = _DropMessage("Progress bars disabled")  # we turned them off: ours covers the job
    for handler in logger.handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in logger.handlers:
            handler.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def connect(ray: ModuleType, address: str | None, num_cpus: int) -> bool:
    """Join the cluster at ``address`` or start an in-process Ray with ``num_cpus``; True when started here.

    An already initialised Ray (a notebook, the tests) is used as it is.

    Raises:
        HematoVisionError: no cluster answers at ``address``.
    """
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # "local": always a new in-process Ray, even where `ray start` left a cluster address behind.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise HematoVisionError(f"--address {address}: no Ray cluster answered ({error}); start one with "
                                "`ray start --head` or leave out --address for a local Ray") from error
    return True


def actor_count(ray: ModuleType, requested: int | None, cpus_per_worker: int) -> int:
    """Actors to start: ``requested``, or as many as the cluster's CPUs hold.

    Raises:
        HematoVisionError: more actors than the cluster has CPUs for (Ray would wait for them forever).
    """
    cpus = int(ray.cluster_resources().get("CPU", 1))
    fits = max(1, cpus // cpus_per_worker)
    if requested is None:
        return fits
    if requested > fits:
        raise HematoVisionError(f"--ray-workers {requested}: the Ray cluster has {cpus} CPU(s), room for {fits} "
                                f"worker(s) of {cpus_per_worker} CPU(s)")
    return requested


def ray_predictions(predictor: Predictor, run_dir: str | Path, paths: Sequence[Path], batch_size: int | None = None,
                    ray_workers: int | None = None, address: str | None = None, cpus_per_worker: int = 1,
                    decode_workers: int = 1, progress: bool = True) -> Generator[StreamResult, None, None]:
    """Predict ``paths`` on Ray Data actors; one result per file, in the order they finish.

    ``predictor`` is the driver's copy of the run: its views and resolved backend are what the
    actors load, and it scores nothing itself. Without ``address`` an in-process Ray is started
    with this machine's cores (and shut down at the end).

    Args:
        batch_size: images per forward pass (default: the local engine's, ``infer.exported.BATCH_SIZE``).
        ray_workers: actors (each holds a model); default: as many as the CPUs hold.
        address: ``auto`` (a cluster started on this machine with ``ray start``) or ``ray://HOST:10001``.
        cpus_per_worker: CPUs reserved per actor, also its intra-op threads.
        decode_workers: decoding threads per actor, beside its model.
        progress: one tqdm bar (rate and ETA) over all ``paths``; Ray Data's own bars are turned off.

    Raises:
        HematoVisionError: Ray missing, no cluster at ``address``, too many workers, or a failure in
            the model (e.g. non-finite outputs) reported by an actor.
    """
    if not paths:
        return
    ray = require_ray()
    batch_size = batch_size or BATCH_SIZE
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs installed

    from hematovision.threads import available_cores

    local_cpus = max(available_cores(), (ray_workers or 1) * cpus_per_worker)
    started = connect(ray, address, local_cpus)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    try:
        actors = actor_count(ray, ray_workers, cpus_per_worker)
        context.enable_progress_bars = False  # ours covers the whole job with rate and ETA
        per_call = max(1, min(4 * batch_size, math.ceil(len(paths) / actors)))
        # fsencode: a file name that is not valid UTF-8 travels as its bytes (Arrow strings must be UTF-8).
        items = [{"index": i, "path": os.fsencode(path)} for i, path in enumerate(paths)]
        dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_call)).map_batches(
            BatchPredictor, batch_size=per_call, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_worker,
            fn_constructor_kwargs={"run_dir": str(run_dir), "views": predictor.views, "backend": predictor.backend,
                                   "threads": cpus_per_worker, "batch_size": batch_size,
                                   "decode_workers": decode_workers, "cwd": os.getcwd()})
        with tqdm(total=len(paths), desc=f"predicting (ray, {actors} worker(s))", unit="img", disable=not progress,
                  smoothing=0.1) as bar, _quiet_ray_data():
            try:
                for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    yield from _results(out, paths)
                    bar.update(len(out["index"]))
            except Exception as error:  # an actor's own error arrives wrapped in Ray's exception types
                explained = _worker_failure(error)
                if explained is None:
                    raise
                raise explained from error
    finally:
        context.enable_progress_bars = bars  # a Ray the caller started keeps its own setting
        if started:
            ray.shutdown()


def _results(out: dict[str, Any], paths: Sequence[Path]) -> Generator[StreamResult, None, None]:
    for index, probs, error, sha, shift, flagged in zip(out["index"], out["probabilities"], out["error"], out["sha256"],
                                                         out["shift_score"], out["flagged"]):
        readable = not error
        yield StreamResult(int(index), paths[int(index)], np.asarray(probs) if readable else None, bool(flagged),
                           None if math.isnan(shift) else float(shift), str(error) or None, str(sha))


def _worker_failure(error: BaseException) -> HematoVisionError | None:
    """One line for what went wrong in an actor, found through Ray's wrappers; ``None``: not an actor's error.

    An error raised while scoring travels as itself (``RayTaskError.cause``). An actor that could
    not start (its ``__init__`` failed: usually a run folder the worker cannot see) arrives as
    ``ActorDiedError`` with only the text of the error, whose last line names it.
    """
    for current in _causes(error):
        if isinstance(current, HematoVisionError):
            return HematoVisionError(f"a Ray worker failed: {current}")
    for current in _causes(error):
        if getattr(current, "actor_init_failed", False):
            lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(current)).splitlines() if line.strip()]
            return HematoVisionError(f"a Ray worker could not load the run: {lines[-1] if lines else current}; every "
                                     "worker must see the run folder and the images under the same paths (docs/scale.md)")
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: Ray's ``cause`` attribute, ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                pending.append(inner)
