"""``hematovision serve``: run the web app on uvicorn."""

from __future__ import annotations

import argparse


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
    parser.add_argument("--db", metavar="PATH", help="SQLite file (default $HEMATOVISION_HOME/serve/hematovision.db)")
    parser.add_argument("--storage", metavar="DIR", help="folder for uploaded images (default: beside the database)")
    parser.add_argument("--backend", choices=("auto", "onnx", "int8", "torch"),
                        help="inference backend (default auto: ONNX Runtime when RUN_DIR/model.onnx exists)")
    parser.add_argument("--threads", type=int, help="CPU threads for inference (default 2)")
    parser.add_argument("--confidence-threshold", type=float,
                        help="flag predictions below this confidence (default: calibrated value)")
    limits = parser.add_argument_group("upload limits")
    limits.add_argument("--max-files", type=int, help="images per request, zip members included (default 100)")
    limits.add_argument("--max-file-mb", type=float, help="largest file in MB (default 20)")
    limits.add_argument("--max-request-mb", type=float, help="largest request in MB (default 100)")
    limits.add_argument("--max-pixels", type=int, help="most pixels per image (default 25,000,000)")
    parser.add_argument("--no-gradcam", action="store_true", help="do not offer Grad-CAM heat maps")
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
        gradcam=False if args.no_gradcam else None,
    )
    app = create_app(settings)
    print(f"HematoVision serving {settings.model} on http://{settings.host}:{settings.port} "
          f"(database {settings.db}; API docs at /docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0
