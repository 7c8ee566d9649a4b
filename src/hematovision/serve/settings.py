"""Server settings: defaults, overridden by ``HEMATOVISION_*`` environment variables, then by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from hematovision.errors import HematoVisionError
from hematovision.paths import hematovision_home
from hematovision.serve.sql import database_location

ENV_PREFIX = "HEMATOVISION_"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # where --no-auth may listen


def _default_db() -> Path:
    return hematovision_home() / "serve" / "hematovision.db"


@dataclass(frozen=True)
class Settings:
    """Everything the web app needs to know; one immutable object per app.

    Every field can be set from the environment as ``HEMATOVISION_<FIELD>`` (upper case),
    e.g. ``HEMATOVISION_MAX_FILES=20``; :meth:`from_env` reads them.

    Attributes:
        model: run folder to serve (``model.safetensors`` + ``model_card.json``; ``model.onnx`` if exported).
        db: SQLite database file (created if missing), or a PostgreSQL URL ``postgresql://user@host/dbname``
            that several app processes share (serve/sql.py; docs/deployment.md).
        storage: folder for the uploaded images (server-chosen names); default ``<data_dir>/images``. Processes
            sharing a PostgreSQL database must share this folder too.
        host: interface to listen on (``127.0.0.1`` keeps the server local).
        port: TCP port.
        backend: ``auto`` (the best up-to-date export: OpenVINO within the accuracy rule, else ONNX
            Runtime, else PyTorch; see ``hematovision.infer.backend``), ``onnx``, ``int8``
            (``model.int8.onnx`` from ``hematovision export --int8``), ``openvino`` or ``torch``.
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
        allowed_hosts: host names the ``Host`` header may carry (DNS-rebinding guard; ``*.lab.example``
            and ``*`` allowed); empty takes :attr:`trusted_hosts`' defaults. Env: comma separated.
        hsts: send ``Strict-Transport-Security`` (only when the server is reached over TLS, e.g. behind
            a TLS reverse proxy).
        rate_limit_per_minute: API requests per minute per user (or per client IP without credentials);
            0 switches the limit off.
        upload_rate_limit_per_minute: uploads (``POST /api/v1/predict``) per minute, counted the same way.
        failed_login_limit_per_minute: failed logins and refused credentials (401) per minute per client
            IP; past it that IP may not try again until the minute has moved on (0: off).
        header_timeout: seconds a client has to send a request's headers (slow-header guard).
        body_timeout: seconds a request body may stall between two reads.
        max_connections: most open connections; further requests get 503.
        max_request_pixels: most decoded pixels per request, all images together; checked from the
            headers before anything is decoded.
        auth: require a logged-in user (serve/auth.py); ``False`` (``--no-auth``) only for a
            single-user workstation bound to 127.0.0.1/localhost, every action then by user ``local``.
        secret_key: key for the CSRF tokens; ``None`` uses ``<data_dir>/secret_key`` (created
            once, mode 0600). Set it as ``HEMATOVISION_SECRET_KEY`` when the db folder is shared, and
            to the same value in every process that shares a PostgreSQL database.
        session_hours: how long a browser login lasts.
        token_days: how long an API token from ``/api/v1/auth/token`` lasts.
        db_synchronous: SQLite ``synchronous`` for the database: ``FULL`` (default: a stored analysis
            survives a power loss; an fsync per commit, +0.4 ms per upload on a quiet disk, 8-10 ms on a
            busy one, see docs/deployment.md), ``NORMAL`` (survives a server crash, not a power loss) or ``EXTRA``.
    """

    model: Path | None = None
    db: Path | str = field(default_factory=_default_db)  # a str only for a postgresql:// URL
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
    allowed_hosts: tuple[str, ...] = ()
    hsts: bool = False
    rate_limit_per_minute: int = 1200
    upload_rate_limit_per_minute: int = 120
    failed_login_limit_per_minute: int = 10
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 100
    max_request_pixels: int = 100_000_000
    auth: bool = True
    secret_key: str | None = field(default=None, repr=False)  # never in a log line
    session_hours: float = 12.0
    token_days: float = 30.0
    db_synchronous: str = "FULL"

    def __post_init__(self) -> None:
        # A path (or sqlite:///path) becomes a Path, a postgresql:// URL stays text ("//" would not survive a Path).
        object.__setattr__(self, "db", database_location(self.db))
        if self.backend not in ("auto", "onnx", "int8", "openvino", "torch"):
            raise HematoVisionError(f"backend must be auto, onnx, int8, openvino or torch, not {self.backend!r}")
        for name in ("max_file_bytes", "max_request_bytes", "max_files", "max_pixels", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise HematoVisionError(f"{name} must be at least 1")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise HematoVisionError("confidence_threshold must be between 0 and 1")
        for name in ("max_connections", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise HematoVisionError(f"{name} must be at least 1")
        for name in ("rate_limit_per_minute", "upload_rate_limit_per_minute", "failed_login_limit_per_minute"):
            if getattr(self, name) < 0:
                raise HematoVisionError(f"{name} must be 0 (off) or more")
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise HematoVisionError("header_timeout and body_timeout must be positive")
        if not self.auth and self.host not in LOCAL_HOSTS:
            raise HematoVisionError(f"--no-auth is only for a single-user workstation: it needs --host 127.0.0.1 "
                                    f"or localhost, not {self.host!r}")
        if self.session_hours <= 0 or self.token_days <= 0:
            raise HematoVisionError("session_hours and token_days must be positive")
        if self.db_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise HematoVisionError(f"db_synchronous must be FULL, NORMAL or EXTRA, not {self.db_synchronous!r}")

    @property
    def data_dir(self) -> Path:
        """The folder for what the server keeps beside its database: the SQLite file's folder, or
        ``$HEMATOVISION_HOME/serve`` for a PostgreSQL database."""
        return self.db.parent if isinstance(self.db, Path) else hematovision_home() / "serve"

    @property
    def storage_dir(self) -> Path:
        """Where uploaded images are kept."""
        return self.storage if self.storage is not None else self.data_dir / "images"

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The host names the app answers to: :attr:`allowed_hosts`, or when that is empty
        ``localhost``, ``127.0.0.1``, ``::1`` and :attr:`host` (unless it is a wildcard address).

        The CSRF Origin check compares against the same list.
        """
        if self.allowed_hosts:
            return self.allowed_hosts
        local = ("localhost", "127.0.0.1", "::1")
        extra = () if self.host in ("0.0.0.0", "::", "") or self.host in local else (self.host,)
        return local + extra

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
        for key in ("model", "storage"):  # db: __post_init__ (a postgresql:// URL must stay text)
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
        if type_name.startswith("tuple"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError:
        raise HematoVisionError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name}") from None
    return raw
