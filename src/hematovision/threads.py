"""CPU threads for a machine that other programs share, chosen once when a command starts.

OpenMP (PyTorch's intra-op pool) and BLAS read their settings when they load, so this runs before
the first ``import torch`` and only writes environment variables a user has not set:

* ``OMP_NUM_THREADS`` (and the BLAS equivalents): the cores that are idle right now, measured from
  ``/proc/stat`` over a quarter of a second, at least one. A parallel step is only as fast as its
  slowest thread, so two threads on two cores, one of them shared, run at the speed of the shared
  one; one thread on the free core is faster.
* ``OMP_WAIT_POLICY=PASSIVE`` when other work is running: a thread that waits at a barrier sleeps
  instead of spinning, so the threads left do not fight the other programs for their cores (a
  fine-tuning step measured 0.6 s alone and 17-20 s beside three other programs with spinning
  threads). On a quiet machine the default (spin, then sleep) is kept: sleeping threads made small
  fine-tuning steps 35 % slower there (``benchmarks/busy_machine.py``).

``HEMATOVISION_THREADS=N`` fixes the count (``auto`` or unset: measured); explicit ``--threads``
options of single commands still win, since they call ``torch.set_num_threads`` themselves.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import MutableMapping

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(interval: float = 0.25) -> float | None:
    """How many cores other work keeps busy, averaged over ``interval`` seconds (``None``: unknown)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_threads(cores: int, busy: float | None) -> int:
    """Threads for the idle cores: ``cores`` minus the cores busy at least 3/4 of the time, at least one.

    The 3/4 keeps a short spike of other work from halving a long job's threads.
    """
    if busy is None:
        return cores
    return max(1, min(cores, cores - int(busy + 0.25)))


def inference_threads() -> int:
    """Threads an exported model's runtime (ONNX Runtime, OpenVINO) gets: as many as PyTorch's intra-op pool.

    Read without importing torch (an exported run is scored without it): ``torch.get_num_threads()``
    when torch is loaded, else ``OMP_NUM_THREADS`` (what :func:`configure` set, or the user), else the
    available cores.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return available_cores()


def configure(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set the thread environment for this process, before torch loads; returns the thread count set.

    Returns ``None`` (and changes nothing) when torch is already imported, e.g. inside a test run,
    where the settings could no longer take effect.
    """
    if environ is None:
        environ = os.environ
    if "torch" in sys.modules:
        return None
    if any(name in environ for name in THREAD_VARIABLES):
        return None  # the user chose
    requested = environ.get("HEMATOVISION_THREADS", "auto").strip().lower()
    cores = available_cores()
    if requested not in ("", "auto"):
        try:
            threads = max(1, int(requested))
        except ValueError:
            threads = cores
    else:
        threads = choose_threads(cores, busy_cores())
        if threads < cores:  # other work is running
            environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for name in THREAD_VARIABLES:
        environ[name] = str(threads)
    return threads
