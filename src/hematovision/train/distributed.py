"""Data-parallel training under ``torchrun``: which process this is, and the few collectives the
training loop needs.

``torchrun --nproc_per_node N -m hematovision train ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in their environment;
:func:`init_from_env` joins them into one process group (gloo on CPU, nccl on GPU). Without those
variables it does nothing and :data:`SINGLE` describes the one process, so every helper here is
a no-op in an ordinary run and the single-process code path stays exactly what it was.

How a distributed fine-tune stays equal to one process with the same global batch:

- every rank draws the same global batch order from the same seeded generator (so ``--balance
  sampler`` keeps its meaning: a class-balanced draw over the whole training set) and trains on
  its contiguous slice of each global batch (:meth:`World.shard`);
- :func:`global_batch_loss` rescales each rank's loss so that DistributedDataParallel's gradient
  average is the gradient of the global batch's (class-weighted) mean loss, even when the slices
  differ in size (the last batch of an epoch);
- rank 0 alone validates, saves and writes the run folder; the others receive its validation
  row (:meth:`World.broadcast`), so they stop early at the same epoch.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hematovision.train.optim import LossFn

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: global rank, 0 .. size - 1.
        size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (its GPU index under nccl).
        device: where this rank trains: ``cuda:LOCAL_RANK`` under nccl, else the CPU.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch (sizes differ by at most one; may be empty)."""
        return np.array_split(index, self.size)[self.rank] if self.distributed else index

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel (which broadcasts rank 0's weights), or itself.

        On GPU, batch norm becomes SyncBatchNorm so it normalises over the global batch as one process
        would; torch has no CPU SyncBatchNorm, so under gloo each rank normalises over its own slice.
        """
        if not self.distributed:
            return model
        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]
            return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank])
        return nn.parallel.DistributedDataParallel(model)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def raise_if_interrupted(self) -> None:
        """Raise KeyboardInterrupt on every rank at the same step once any rank got Ctrl-C.

        Ranks stop together between steps, so none is left waiting in a collective for a peer
        that has gone (see :func:`stop_together`).
        """
        if self.distributed and self.sum(float(_interrupted))[0] > 0:
            raise KeyboardInterrupt

    @property
    def _collective_device(self) -> torch.device:
        # nccl reduces GPU tensors only.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


SINGLE = World()
_world = SINGLE
_interrupted = False


def world() -> World:
    """The current :class:`World` (:data:`SINGLE` unless :func:`init_from_env` joined a group)."""
    return _world


def is_main() -> bool:
    """True in an ordinary run and on rank 0 of a distributed one."""
    return _world.is_main


def init_from_env() -> World:
    """Join the process group described by torchrun's environment; a no-op without it.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and, inside ``init_process_group``,
    ``MASTER_ADDR``/``MASTER_PORT``). Uses nccl when CUDA is available, else gloo. Ranks other than 0
    log warnings only and show no progress bars, so the terminal shows one run.
    """
    global _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _world.distributed:
        return _world
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, device_id=device if backend == "nccl" else None)
    _world = World(rank, size, local_rank, device)
    if rank != 0:
        _quiet()
    log.info("distributed training: %d processes (%s), global batch split across them", size, backend)
    return _world


def _quiet() -> None:
    """Warnings only, and no progress bars, on ranks other than 0: the terminal shows one run."""
    import functools

    import tqdm  # type: ignore[import-untyped]

    logging.getLogger().setLevel(logging.WARNING)
    # tqdm reads TQDM_DISABLE when it is imported, which torch has already done; a bar given an
    # explicit ``disable`` (the training loop's) still decides for itself.
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


def cleanup() -> None:
    """Leave the process group (after which :func:`world` is :data:`SINGLE` again)."""
    global _world
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _world = SINGLE


@contextmanager
def session() -> Iterator[World]:
    """:func:`init_from_env` ... :func:`cleanup`, with Ctrl-C handled by :func:`stop_together`."""
    current = init_from_env()
    try:
        with stop_together(current):
            yield current
        # Leave together: a rank that tears its gloo group down while rank 0 still writes the run
        # folder was seen to abort at exit ("terminate called without an active exception").
        current.barrier()
    finally:
        cleanup()


@contextmanager
def stop_together(current: World) -> Iterator[None]:
    """In a distributed run, make the first Ctrl-C a request that every rank honours at the next step.

    A KeyboardInterrupt raised at an arbitrary point on one rank would leave the others blocked
    in a collective until gloo or nccl notice the lost peer (with a traceback each). Instead the
    signal sets a flag that :meth:`World.raise_if_interrupted` shares at each step. A second
    Ctrl-C interrupts at once, for a rank stuck elsewhere (decoding images, a dead peer).
    """
    global _interrupted
    if not current.distributed:
        yield
        return

    def request_stop(signum: int, frame: FrameType | None) -> None:
        global _interrupted
        if _interrupted:
            raise KeyboardInterrupt
        _interrupted = True

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False


def global_batch_loss(loss_fn: LossFn, class_weight: Tensor | None, current: World) -> LossFn:
    """``loss_fn`` on one rank's slice, scaled so DDP's averaged gradient is the global batch's.

    ``loss_fn`` must be a (class-weighted) mean over the batch, Σ w_y·l / Σ w_y, as the fine-tuning
    losses are (cross-entropy with label smoothing, Crammer-Singer hinge). DDP averages gradients
    over the N ranks, so each rank's term is N·Σ_rank w_y·l / Σ_global w_y. The returned value is
    the global batch's mean loss on every rank (what one process would report and check for NaN);
    only its gradient is the rank's share. In an ordinary run ``loss_fn`` is returned unchanged.
    """
    if not current.distributed:
        return loss_fn

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        normaliser = class_weight.to(target.device)[target].sum() if class_weight is not None else target.new_tensor(
            len(target), dtype=torch.float64)
        # An empty slice (a short last batch) still takes part in the gradient all-reduce, with zeros.
        local_sum = loss_fn(logits, target) * normaliser if len(target) else logits.sum() * 0.0
        total_sum, total_norm = current.sum(float(local_sum.detach()), float(normaliser))
        share = local_sum * (current.size / total_norm)
        return share + (total_sum / total_norm - share).detach()

    return loss
