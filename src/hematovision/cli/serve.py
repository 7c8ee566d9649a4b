"""``hematovision serve``: run the web app on uvicorn."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="run the web app and JSON API for a trained run",
        description="Serve a run folder: upload page at /, JSON API at /api/v1, OpenAPI docs at /docs. "
                    "Every option can also be set as an environment variable HEMATOVISION_<OPTION> "
                    "(e.g. HEMATOVISION_MAX_FILES); flags win.",
    )
    parser.add_argument("--model", metavar="RUN_DIR", help="run folder made by `hematovision train` "
                        "(env HEMATOVISION_MODEL)")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--db", metavar="PATH|URL", help="SQLite file (default $HEMATOVISION_HOME/serve/hematovision.db), "
                        "or postgresql://USER@HOST/DBNAME shared by several server processes (docs/deployment.md)")
    parser.add_argument("--storage", metavar="DIR", help="folder for uploaded images (default: beside the database)")
    parser.add_argument("--backend", choices=("auto", "onnx", "int8", "openvino", "torch"),
                        help="inference backend (default auto: OpenVINO when its exported IR passed the accuracy "
                             "rule, else ONNX Runtime when RUN_DIR/model.onnx is up to date, else PyTorch)")
    parser.add_argument("--threads", type=int, help="CPU threads for inference (default 2)")
    parser.add_argument("--confidence-threshold", type=float,
                        help="flag predictions below this confidence (default: calibrated value)")
    limits = parser.add_argument_group("upload limits")
    limits.add_argument("--max-files", type=int, help="images per request, zip members included (default 100)")
    limits.add_argument("--max-file-mb", type=float, help="largest file in MB (default 20)")
    limits.add_argument("--max-request-mb", type=float, help="largest request in MB (default 100)")
    limits.add_argument("--max-pixels", type=int, help="most pixels per image (default 25,000,000)")
    limits.add_argument("--max-request-pixels", type=int,
                        help="most decoded pixels per request, all images together (default 100,000,000)")
    protect = parser.add_argument_group("browser and abuse protections (docs/deployment.md)")
    protect.add_argument("--allowed-hosts", metavar="HOSTS",
                         help="comma-separated host names clients may use, e.g. hemato.lab.example "
                              "(default: localhost, 127.0.0.1, ::1 and --host)")
    protect.add_argument("--hsts", action="store_true", default=None,
                         help="send Strict-Transport-Security (only when served over TLS, e.g. behind a proxy)")
    protect.add_argument("--rate-limit", type=int, metavar="N",
                         help="API requests per minute per user or client IP, 0 = off (default 1200)")
    protect.add_argument("--upload-rate-limit", type=int, metavar="N",
                         help="uploads per minute per user or client IP, 0 = off (default 120)")
    protect.add_argument("--failed-login-limit", type=int, metavar="N",
                         help="failed logins (401) per minute per client IP, 0 = off (default 10)")
    protect.add_argument("--header-timeout", type=float, metavar="S",
                         help="seconds a client has to send its request headers (default 10)")
    protect.add_argument("--body-timeout", type=float, metavar="S",
                         help="seconds a request body may stall between reads (default 30)")
    protect.add_argument("--max-connections", type=int, metavar="N",
                         help="most open connections; more get 503 (default 100)")
    parser.add_argument("--no-gradcam", action="store_true", help="do not offer Grad-CAM heat maps")
    parser.add_argument("--no-auth", action="store_true",
                        help="no login: everyone acts as user 'local' with every right. Only for a single-user "
                             "workstation; refused unless --host is 127.0.0.1 or localhost")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model once and serve until interrupted."""
    from hematovision._optional import optional_import
    from hematovision.serve.settings import Settings

    uvicorn = optional_import("uvicorn", "serve")
    optional_import("fastapi", "serve")
    from hematovision.serve.app import create_app

    def megabytes(value: float | None) -> int | None:
        return None if value is None else int(value * 1024 * 1024)

    settings = Settings.from_env(
        model=args.model, host=args.host, port=args.port, db=args.db, storage=args.storage,
        backend=args.backend, threads=args.threads, confidence_threshold=args.confidence_threshold,
        max_files=args.max_files, max_file_bytes=megabytes(args.max_file_mb),
        max_request_bytes=megabytes(args.max_request_mb), max_pixels=args.max_pixels,
        gradcam=False if args.no_gradcam else None, auth=False if args.no_auth else None,
        max_request_pixels=args.max_request_pixels, hsts=args.hsts,
        allowed_hosts=_host_list(args.allowed_hosts), rate_limit_per_minute=args.rate_limit,
        upload_rate_limit_per_minute=args.upload_rate_limit, failed_login_limit_per_minute=args.failed_login_limit,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, max_connections=args.max_connections,
    )
    app = create_app(settings)
    from hematovision.serve.sql import describe

    if not settings.auth:
        print("WARNING: --no-auth: no login, no roles, every action is recorded as user 'local'. "
              "Use it only on a single-user workstation.", file=sys.stderr, flush=True)
    print(f"HematoVision serving {settings.model} on http://{settings.host}:{settings.port} "
          f"(database {describe(settings.db)}; API docs at /docs)", flush=True)
    if not settings.allowed_hosts and settings.host in ("0.0.0.0", "::"):
        print("note: only requests for localhost are answered; name this server's host names with "
              "--allowed-hosts (or HEMATOVISION_ALLOWED_HOSTS)", flush=True)
    from hematovision.serve.deadlines import deadline_protocol

    # The h11 protocol with read deadlines (uvicorn alone has none while a request arrives).
    # uvicorn answers 503 once open connections reach limit_concurrency, the new one included: +1.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False,
                http=deadline_protocol(settings.header_timeout, settings.body_timeout),
                limit_concurrency=settings.max_connections + 1)
    return 0


def _host_list(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(host.strip() for host in value.split(",") if host.strip())
