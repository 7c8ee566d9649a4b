"""Server settings: defaults, overridden by ``HEMATOVISION_*`` environment variables, then by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from hematovision.errors import HematoVisionError
from hematovision.paths import hematovision_home

ENV_PREFIX = "HEMATOVISION_"


def _default_db() -> Path:
    return hematovision_home() / "serve" / "hematovision.db"


@dataclass(frozen=True)
class Settings:
    """Everything the web app needs to know; one immutable object per app.

    Every field can be set from the environment as ``HEMATOVISION_<FIELD>`` (upper case),
    e.g. ``HEMATOVISION_MAX_FILES=20``; :meth:`from_env` reads them.

    Attributes:
        model: run folder to serve (``model.safetensors`` + ``model_card.json``; ``model.onnx`` if exported).
        db: SQLite database file; created if missing.
        storage: folder for the uploaded images (server-chosen names); default ``<db folder>/images``.
        host: interface to listen on (``127.0.0.1`` keeps the server local).
        port: TCP port.
        backend: ``auto`` (ONNX Runtime when ``model.onnx`` exists, else PyTorch), ``onnx``,
            ``int8`` (``model.int8.onnx`` from ``hematovision export --int8``) or ``torch``.
        threads: CPU threads for inference.
        max_file_bytes: largest single upload (an image or a zip), in bytes.
        max_request_bytes: largest request body, in bytes; checked before parsing.
        max_files: most images in one request, zip members included.
        max_pixels: most pixels in one image; checked from the header before decoding.
        max_zip_bytes: most uncompressed bytes taken from one zip.
        max_zip_ratio: highest compression ratio accepted for a zip member (zip-bomb guard).
        batch_size: most images the micro-batcher sends through the model at once.
        batch_wait_ms: how long the micro-batcher waits for more images once one arrived.
        confidence_threshold: flag predictions below this confidence; ``None`` takes the
            value calibrated on validation data (``serving.json`` in the run folder).
        gradcam: whether the app offers Grad-CAM heat maps.
    """

    model: Path | None = None
    db: Path = field(default_factory=_default_db)
    storage: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    threads: int = 2
    max_file_bytes: int = 20 * 1024 * 1024
    max_request_bytes: int = 100 * 1024 * 1024
    max_files: int = 100
    max_pixels: int = 25_000_000
    max_zip_bytes: int = 200 * 1024 * 1024
    max_zip_ratio: float = 200.0
    batch_size: int = 16
    batch_wait_ms: float = 2.0
    confidence_threshold: float | None = None
    gradcam: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "onnx", "int8", "torch"):
            raise HematoVisionError(f"backend must be auto, onnx, int8 or torch, not {self.backend!r}")
        for name in ("max_file_bytes", "max_request_bytes", "max_files", "max_pixels", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise HematoVisionError(f"{name} must be at least 1")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise HematoVisionError("confidence_threshold must be between 0 and 1")

    @property
    def storage_dir(self) -> Path:
        """Where uploaded images are kept."""
        return self.storage if self.storage is not None else self.db.parent / "images"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then ``HEMATOVISION_*`` variables, then ``overrides`` (``None`` values ignored).

        Raises:
            HematoVisionError: a variable does not parse as its field's type.
        """
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for spec in fields(cls):
            raw = environ.get(ENV_PREFIX + spec.name.upper())
            if raw is not None and raw != "":
                values[spec.name] = _parse(spec.name, str(spec.type), raw)
        values.update({key: value for key, value in overrides.items() if value is not None})
        for key in ("model", "db", "storage"):
            if values.get(key) is not None:
                values[key] = Path(str(values[key])).expanduser()
        return replace(cls(), **values)  # type: ignore[arg-type]


def _parse(name: str, type_name: str, raw: str) -> object:
    try:
        if type_name.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise HematoVisionError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name}") from None
    return raw
