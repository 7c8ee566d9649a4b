"""Which runtime scores a run's images: PyTorch, ONNX Runtime (``model.onnx``), its INT8 copy, or OpenVINO.

``auto`` picks the best the run folder has, in this order:

1. **OpenVINO** (``model.xml``/``model.bin``, the IR of ``model.onnx``) when all of these hold:
   ``export.json`` records the IR for the current weights and the run's test-time views (see
   :func:`stale_exports`); ``openvino`` imports; the export measured the IR against fp32 ONNX Runtime
   on the run's test split (its validation split when it has no test split) and lost at most
   :data:`MAX_ACCURACY_LOSS` of top-1 accuracy (see :func:`openvino_verdict`); and the CPU plugin
   here runs it in the precision that was measured, or in f32 (bf16 on CPUs with AVX512-BF16 or AMX).
2. **ONNX Runtime** fp32 (``model.onnx``) when it was exported from the current weights with the
   same test-time views.
3. **PyTorch** otherwise.

INT8 is never chosen by itself (it may cost accuracy); ask for it with ``backend="int8"``. An
explicit ``onnx``, ``int8`` or ``openvino`` whose file is missing or stale, or whose package is not
installed, is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hematovision._io import sha256_file
from hematovision.data.transforms import Preprocessing
from hematovision.errors import HematoVisionError
from hematovision.infer.exported import (
    Forward,
    onnx_forward,
    onnx_session,
    openvino_forward,
    openvino_model,
    openvino_precision,
)
from hematovision.run import EXPORT_FILE, INT8_FILE, MODEL_FILE, ONNX_FILE, OPENVINO_FILE, POLICY_FILE

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "int8", "openvino")

#: Largest top-1 accuracy loss (a fraction: 0.005 = 0.5 points) against fp32, on the run's own test
#: split, for a reduced-precision backend to be used by default (issue 14). ``auto`` applies it to
#: OpenVINO; :func:`hematovision.export.quantize.meets_targets` to INT8.
MAX_ACCURACY_LOSS = 0.005


def stale_exports(run_dir: str | Path, views: int) -> set[str]:
    """Which exported files (``onnx``, ``openvino``, ``policy``) were made from other weights or other views.

    The rule of the server (``serve/engine.py``): ``export.json`` and ``serving.json`` record the
    sha256 of ``model.safetensors`` they were made from and the views; a mismatch makes them stale.
    An OpenVINO IR that ``export.json`` does not describe (an export that skipped it, or none) is
    stale too: nothing says which weights it holds.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        return set()
    current = sha256_file(run_dir / MODEL_FILE)
    stale = set()
    if (run_dir / OPENVINO_FILE).is_file() and _openvino_record_problem(run_dir, current, views):
        stale.add("openvino")
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


def _openvino_record_problem(run_dir: Path, current_sha: str, views: int) -> str | None:
    """Why ``export.json`` does not vouch for ``model.xml`` (``None``: it does); logged as a warning."""
    try:
        recorded = json.loads((run_dir / EXPORT_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    section = recorded.get("openvino") if isinstance(recorded, dict) else None
    problem = None
    if not isinstance(recorded, dict) or not isinstance(section, dict) or "views" not in section:
        problem = f"{EXPORT_FILE} does not record {OPENVINO_FILE} (an older or partial export)"
    elif recorded.get("source_sha256") != current_sha:
        problem = f"{OPENVINO_FILE} was written for other weights than {MODEL_FILE}"
    elif section["views"] != views:
        problem = f"{OPENVINO_FILE} was made with {section['views']} test-time view(s), the run uses {views}"
    if problem:
        log.warning("%s; ignoring the OpenVINO IR (run `hematovision export RUN` again)", problem)
    return problem


def openvino_verdict(run_dir: str | Path) -> tuple[bool, str]:
    """Whether ``auto`` may use the run's OpenVINO IR by the accuracy rule, and why (in words).

    The rule: the export measured the IR's top-1 accuracy against fp32 ONNX Runtime on the run's own
    images (``export.json`` → ``openvino.accuracy_change``) and lost at most :data:`MAX_ACCURACY_LOSS`.
    Without a measurement (no split when it was exported) the answer is no.
    """
    try:
        section = json.loads((Path(run_dir) / EXPORT_FILE).read_text()).get("openvino")
    except (OSError, ValueError, AttributeError):
        section = None
    change = section.get("accuracy_change") if isinstance(section, dict) else None
    if not isinstance(change, (int, float)) or isinstance(change, bool):
        return False, "its accuracy against fp32 was not measured (export without the run's split)"
    if not accuracy_rule_holds(change):
        return False, (f"it lost {-100 * change:.2f} accuracy points against fp32 on {section.get('split', 'the split')} "
                       f"(at most {100 * MAX_ACCURACY_LOSS:g} allowed)")
    return True, f"{100 * change:+.2f} accuracy points against fp32 on {section.get('split', 'the split')}"


def accuracy_rule_holds(accuracy_change: float) -> bool:
    """The accuracy rule: a top-1 change against fp32 (a fraction; negative is a loss) of at least -:data:`MAX_ACCURACY_LOSS`."""
    return accuracy_change >= -MAX_ACCURACY_LOSS


def openvino_installed() -> bool:
    """Whether the ``openvino`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(run_dir: str | Path, views: int, backend: str = "auto",
                    stale: set[str] | None = None, skip_openvino: bool = False) -> tuple[str, Path | None]:
    """The backend to use and, for ONNX Runtime or OpenVINO, the model file.

    Args:
        stale: :func:`stale_exports` of the run when the caller has it already (computed otherwise).
        skip_openvino: ``auto`` does not consider OpenVINO (see :func:`load_backend`).

    Returns:
        ``("torch", None)``, ``("onnx", RUN/model.onnx)``, ``("int8", RUN/model.int8.onnx)`` or
        ``("openvino", RUN/model.xml)``.

    Raises:
        HematoVisionError: an explicit ``onnx``/``int8``/``openvino`` whose file is missing or stale (or,
            for ``openvino``, whose package is not installed), or an unknown name.
    """
    if backend not in BACKENDS:
        raise HematoVisionError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch", None
    run_dir = Path(run_dir)
    if stale is None:
        exported = any((run_dir / name).is_file() for name in (ONNX_FILE, INT8_FILE, OPENVINO_FILE))
        stale = stale_exports(run_dir, views) if exported else set()
    if backend == "openvino":
        return "openvino", _explicit_openvino(run_dir, views, stale)
    if backend == "auto" and not skip_openvino:
        xml = run_dir / OPENVINO_FILE
        if xml.is_file() and "openvino" not in stale:
            usable, why = openvino_verdict(run_dir)
            if usable and openvino_installed():
                return "openvino", xml
            log.info("not using %s: %s", OPENVINO_FILE, why if not usable else "openvino is not installed")
    name = INT8_FILE if backend == "int8" else ONNX_FILE
    path = run_dir / name
    is_stale = path.is_file() and "onnx" in stale
    if backend == "auto":
        if is_stale:
            log.warning("%s was exported from other weights or views; using PyTorch "
                        "(run `hematovision export RUN` again)", ONNX_FILE)
        return ("onnx", path) if path.is_file() and not is_stale else ("torch", None)
    if not path.is_file():
        raise HematoVisionError(f"backend {backend!r} needs {name} in {run_dir}; "
                                f"run `hematovision export RUN{' --int8' if backend == 'int8' else ''}`")
    if is_stale:
        raise HematoVisionError(f"{name} in {run_dir} was exported from other weights or another number of "
                                f"test-time views ({views} now); run `hematovision export RUN` again")
    return backend, path


def _explicit_openvino(run_dir: Path, views: int, stale: set[str]) -> Path:
    xml = run_dir / OPENVINO_FILE
    if not openvino_installed():
        raise HematoVisionError("backend 'openvino' needs the openvino package; "
                                "install it with: pip install 'hematovision[openvino]'")
    if not xml.is_file():
        raise HematoVisionError(f"backend 'openvino' needs {OPENVINO_FILE} in {run_dir}; "
                                "run `hematovision export RUN` with openvino installed")
    if "openvino" in stale:
        raise HematoVisionError(f"{OPENVINO_FILE} in {run_dir} is not recorded in {EXPORT_FILE} for the current "
                                f"weights and {views} test-time view(s); run `hematovision export RUN` again")
    return xml


@dataclass(frozen=True)
class LoadedBackend:
    """A runtime ready to score a run's images.

    Attributes:
        name: ``torch``, ``onnx``, ``int8`` or ``openvino``.
        forward: (N, S, S, 3) uint8 → (logits, features); ``None`` for PyTorch (the caller's model).
        precision: the arithmetic it really uses: ``f32``, ``int8``, or OpenVINO's inference
            precision (``bf16`` on CPUs with AVX512-BF16 or AMX).
        path: the model file (``None`` for PyTorch).
    """

    name: str
    forward: Forward | None
    precision: str
    path: Path | None = None


def load_backend(run_dir: str | Path, views: int, prep: Preprocessing, threads: int, backend: str = "auto",
                 stale: set[str] | None = None) -> LoadedBackend:
    """Resolve ``backend`` (see :func:`resolve_backend`) and build its runtime with ``threads`` threads.

    With ``auto``, an OpenVINO IR that the CPU plugin here would run in another reduced precision than
    the one its accuracy was measured in (an IR exported on another machine) is passed over for
    ONNX Runtime: the measurement does not hold for it. f32 is always accepted (it is lossless).
    """
    run_dir = Path(run_dir)
    name, path = resolve_backend(run_dir, views, backend, stale)
    if name == "openvino" and path is not None:
        compiled = openvino_model(path, threads)
        precision = openvino_precision(compiled)
        measured = _recorded_openvino_precision(run_dir)
        if backend != "auto" or precision in (measured, "f32"):
            return LoadedBackend(name, openvino_forward(compiled, prep), precision, path)
        log.warning("OpenVINO would run %s in %s here, its accuracy was measured in %s; using %s instead "
                    "(run `hematovision export RUN` on this machine to measure it)", OPENVINO_FILE, precision,
                    measured, ONNX_FILE)
        name, path = resolve_backend(run_dir, views, backend, stale, skip_openvino=True)
    if path is None:
        return LoadedBackend("torch", None, "f32")
    return LoadedBackend(name, onnx_forward(onnx_session(path, threads), prep), "int8" if name == "int8" else "f32",
                         path)


def _recorded_openvino_precision(run_dir: Path) -> Any:
    try:
        return json.loads((run_dir / EXPORT_FILE).read_text()).get("openvino", {}).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
