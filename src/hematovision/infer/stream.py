"""Streaming inference: decode and prepare images in worker threads while the model scores earlier ones.

Memory is bounded by the look-ahead (a few batches of prepared images), not by the number of files,
so a folder of 12,000 images costs what 100 do. Results come back one per file, in the order given;
an unreadable file is a result with its reason, never an exception. One progress bar (rate and ETA)
covers the whole job.

Why threads: Pillow releases the GIL while it decodes and resizes, and so do the model's kernels,
so one decoding thread beside the model keeps two cores busy without copying pixels between
processes (measured in ``benchmarks/predict_stream.py``). The model keeps its own intra-op threads;
on a busy 2-core machine one decoder plus PyTorch's threads is what fits (see docs/scale.md).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hematovision._io import sha256_file
from hematovision.data.images import ImageLoadError, load_rgb
from hematovision.infer.exported import BATCH_SIZE
from hematovision.infer.predictor import Predictor


@dataclass
class StreamResult:
    """One file's answer.

    Attributes:
        index: the file's position in the sequence given.
        path: the file.
        probabilities: (K,) calibrated probabilities; ``None`` when the file could not be read.
        flagged: whether the run's review policy flags it (``False`` without a policy).
        shift_score: the image's lab-shift score (``None``: the run has no shift reference, or unreadable).
        error: why the file could not be read (``None`` when it was).
        sha256: the file's content hash when asked for (``hash_files=True``) and readable, else ``""``.
    """

    index: int
    path: Path
    probabilities: np.ndarray | None = None
    flagged: bool = False
    shift_score: float | None = None
    error: str | None = None
    sha256: str = ""


def default_workers() -> int:
    """Decoding threads: half the cores (at least one); the model's threads use the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


Decoded = tuple[Any, str | None, str]  # (prepared image (Predictor.prepare's), error, sha256)


def decode_stream(paths: Sequence[Path], prepare: Callable[[np.ndarray], Any], workers: int = 1,
                  lookahead: int = 64, hash_files: bool = False) -> Generator[Decoded, None, None]:
    """Decode and ``prepare`` each file in ``workers`` threads, at most ``lookahead`` files ahead, in order.

    Yields:
        ``(image, None, sha256)`` for a readable file, ``(None, reason, "")`` for an unreadable one.
    """

    def load(path: Path) -> Decoded:
        try:
            image = prepare(load_rgb(path))
        except ImageLoadError as error:
            return None, str(error), ""
        try:
            sha = sha256_file(path) if hash_files else ""
        except OSError as error:  # removed or changed permissions between decoding and hashing
            return None, f"{path}: cannot read ({error.strerror or error})", ""
        return image, None, sha

    pending: deque[Future[Decoded]] = deque()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hv-decode")
    try:
        upcoming = iter(paths)
        for path in upcoming:  # fill the look-ahead window
            pending.append(pool.submit(load, path))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(load, following))
            yield result
    finally:
        # Ctrl-C or an abandoned generator: drop the queued work and wait only for the running files.
        pool.shutdown(wait=True, cancel_futures=True)


def stream_predictions(predictor: Predictor, paths: Sequence[Path], batch_size: int | None = None,
                       workers: int | None = None, hash_files: bool = False, desc: str = "predicting",
                       progress: bool = True) -> Iterator[StreamResult]:
    """Predict ``paths`` in batches while the next batch is decoded; one result per file, in order.

    The images are one batch for the lab-shift score: ``predictor.lab_shift()`` afterwards covers
    every image predicted (the caller resets it with ``predictor.reset_shift()`` when needed).
    At most about ``3 * batch_size`` prepared images are in memory at a time.

    Args:
        workers: decoding threads (default :func:`default_workers`).
        hash_files: give each readable file's sha256 (``predict --resume`` keys on it).
        progress: show a tqdm bar with rate and ETA over all ``paths``.
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # no stubs installed

    batch_size = batch_size or BATCH_SIZE
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, smoothing=0.1)
    held: list[StreamResult] = []  # a batch's results, unreadable files included, in order
    images: list[Any] = []  # Predictor.prepare's: pixels, or pixels and the cell's measurements
    decoded = decode_stream(paths, predictor.prepare, workers or default_workers(), 2 * batch_size, hash_files)

    def flush() -> list[StreamResult]:
        if images:
            readable = [result for result in held if result.error is None]
            shift = predictor.shift
            seen = len(shift.scores) if shift is not None else 0
            probabilities, flagged = predictor.predict_reviewed(images, batch_size, prepared=True)
            scores = shift.scores[seen:] if shift is not None else [None] * len(readable)
            for result, probs, flag, score in zip(readable, probabilities, flagged, scores):
                result.probabilities, result.flagged, result.shift_score = probs, bool(flag), score
            images.clear()
        done = list(held)
        held.clear()
        bar.update(len(done))
        return done

    try:
        for index, (path, (image, error, sha)) in enumerate(zip(paths, decoded)):
            held.append(StreamResult(index, Path(path), error=error, sha256=sha))
            if image is not None:
                images.append(image)
            if len(images) >= batch_size or len(held) >= 4 * batch_size:  # a run of unreadable files is bounded too
                yield from flush()
        yield from flush()
    finally:
        decoded.close()
        bar.close()
