"""Which runtime scores a run's images: PyTorch, ONNX Runtime (``model.onnx``) or its INT8 copy.

``auto`` picks the best the run folder has: ``model.onnx`` when it exists and was exported from the
current weights with the same test-time views (see :func:`stale_exports`), PyTorch otherwise. INT8 is
never chosen by itself (it may cost accuracy); ask for it with ``backend="int8"``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hematovision._io import sha256_file
from hematovision.errors import HematoVisionError
from hematovision.run import EXPORT_FILE, INT8_FILE, MODEL_FILE, ONNX_FILE, POLICY_FILE

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "int8")


def stale_exports(run_dir: str | Path, views: int) -> set[str]:
    """Which exported files (``onnx``, ``policy``) were made from other weights or other views.

    The rule of the server (``serve/engine.py``): ``export.json`` and ``serving.json`` record the
    sha256 of ``model.safetensors`` they were made from and the views; a mismatch makes them stale.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        return set()
    current = sha256_file(run_dir / MODEL_FILE)
    stale = set()
    for kind, name in (("onnx", EXPORT_FILE), ("policy", POLICY_FILE)):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = None
        if not isinstance(recorded, dict):
            log.warning("%s is not valid JSON; ignoring the %s (run `hematovision export RUN` again)", name, kind)
            stale.add(kind)
            continue
        sha = recorded.get("source_sha256")
        recorded_views = (recorded.get("onnx") or {}).get("views", 1) if kind == "onnx" else recorded.get("views", 1)
        if sha and sha != current:
            log.warning("%s was written for other weights than %s/%s; ignoring the %s "
                        "(run `hematovision export RUN` again)", name, run_dir, MODEL_FILE, kind)
            stale.add(kind)
        elif recorded_views != views:
            log.warning("%s was made with %s test-time view(s), the run uses %d; ignoring the %s "
                        "(run `hematovision export RUN` again)", name, recorded_views, views, kind)
            stale.add(kind)
    return stale


def resolve_backend(run_dir: str | Path, views: int, backend: str = "auto") -> tuple[str, Path | None]:
    """The backend to use and, for ONNX Runtime, the model file.

    Returns:
        ``("torch", None)``, ``("onnx", RUN/model.onnx)`` or ``("int8", RUN/model.int8.onnx)``.

    Raises:
        HematoVisionError: an explicit ``onnx``/``int8`` whose file is missing or stale, or an unknown name.
    """
    if backend not in BACKENDS:
        raise HematoVisionError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", None
    run_dir = Path(run_dir)
    name = INT8_FILE if backend == "int8" else ONNX_FILE
    path = run_dir / name
    stale = "onnx" in stale_exports(run_dir, views) if path.is_file() else False
    if backend == "auto":
        if stale:
            log.warning("%s was exported from other weights or views; using PyTorch "
                        "(run `hematovision export RUN` again)", ONNX_FILE)
        return ("onnx", path) if path.is_file() and not stale else ("torch", None)
    if not path.is_file():
        raise HematoVisionError(f"backend {backend!r} needs {name} in {run_dir}; "
                                f"run `hematovision export RUN{' --int8' if backend == 'int8' else ''}`")
    if stale:
        raise HematoVisionError(f"{name} in {run_dir} was exported from other weights or another number of "
                                f"test-time views ({views} now); run `hematovision export RUN` again")
    return backend, path
