"""Dynamic micro-batching: images from concurrent requests share one forward pass.

On a CPU a batch of 8 costs far less than 8 single passes, so the server queues every
image and one worker takes what has arrived (up to ``max_batch_size``, waiting at most
``max_wait_ms`` for company) and runs it in one call. While a batch runs, new images
queue up, so batches grow by themselves under load and stay at one image when idle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Queue items from many coroutines and process them in batches on one worker thread.

    Args:
        process: ``process(items) -> results``, one result per item, in order; runs on a
            dedicated thread (inference is serialised there, so the model needs no locks).
        max_batch_size: most items per call of ``process``.
        max_wait_ms: how long to wait for more items after the first one arrived.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int = 16,
        max_wait_ms: float = 2.0,
    ) -> None:
        self.process = process
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Any]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes, for /health and the benchmarks

    async def submit(self, items: Sequence[Item]) -> list[Result]:
        """Process ``items`` (possibly together with other requests' items); results in order.

        Raises:
            Exception: whatever ``process`` raised for the batch an item was in.
        """
        self._ensure_worker()
        assert self._queue is not None and self._loop is not None
        futures = [self._loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hv-infer")
            self._worker = loop.create_task(self._run(), name="hv-micro-batcher")

    async def _run(self) -> None:
        assert self._queue is not None and self._loop is not None and self._executor is not None
        queue, loop, executor = self._queue, self._loop, self._executor
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            # A client that went away cancelled its futures; its items are not worth computing.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            try:
                results = await loop.run_in_executor(executor, self.process, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"process returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        """Stop the worker and its thread (queued items are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
