"""``create_app(settings)``: the FastAPI application with its page, API and error handling.

Every error reaches the client as JSON ``{"detail": "..."}`` with a 4xx code (or a bare
500 "internal server error" for bugs, whose traceback goes only to the server log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hematovision.errors import HematoVisionError
from hematovision.infer.predictor import NonFiniteOutputError
from hematovision.serve import login
from hematovision.serve.api import AppState, public_router, router
from hematovision.serve.auth import LoginRequired, install_auth, login_redirect_url, page_user
from hematovision.serve.batching import MicroBatcher
from hematovision.serve.contract import allowed_methods, install_contract
from hematovision.serve.db import EXCLUDED, ConflictError, Database, NotFoundError, ReviewError
from hematovision.serve.engine import Engine, PredictorLike, load_engine
from hematovision.serve.protect import inline_script_policy, install_protections
from hematovision.serve.settings import Settings
from hematovision.serve.sql import IntegrityError
from hematovision.serve.uploads import UploadError

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, predictor: PredictorLike | None = None,
               engine: Engine | None = None) -> FastAPI:
    """Build the app; the model is loaded here, once.

    Args:
        settings: server settings; :meth:`Settings.from_env` when ``None``.
        predictor: an already loaded predictor (tests inject one); otherwise the run folder
            ``settings.model`` is loaded.
        engine: a ready engine (takes precedence over ``predictor``).

    Raises:
        HematoVisionError: no model given, or the run folder cannot be loaded.
    """
    settings = settings or Settings.from_env()
    if engine is None:
        if predictor is not None:
            engine = Engine(predictor, settings.model, backend=settings.backend, threads=settings.threads,
                            confidence_threshold=settings.confidence_threshold)
        elif settings.model is not None:
            engine = load_engine(settings.model, settings.backend, settings.threads, settings.confidence_threshold)
        else:
            raise HematoVisionError("no model to serve: pass --model RUN_DIR or set HEMATOVISION_MODEL")
    db = Database(settings.db, synchronous=settings.db_synchronous)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    batcher: MicroBatcher[Any, Any] = MicroBatcher(engine.run_batch, settings.batch_size, settings.batch_wait_ms)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await batcher.close()
        db.close()

    app = FastAPI(
        title="HematoVision",
        version="1",
        description="White-blood-cell classification with review: upload images, get the cell type, "
                    "confidence, a Grad-CAM heat map and a review flag; confirm or correct; export the "
                    "differential count.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: the default page loads Swagger UI from a CDN
        redoc_url=None,
    )
    app.state.hv = AppState(settings, engine, db, batcher)
    install_auth(app, settings, db)
    app.include_router(public_router)
    app.include_router(login.router)  # the login page and the token endpoint: reachable without a login
    app.include_router(router)  # everything else under /api/v1 needs a user (serve/auth.py)
    _add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    install_protections(app, settings)  # hosts, security headers, rate limits: outside the body limit

    static = resources.files("hematovision.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    _add_docs(app)
    # The document says what the server does: every status code, one error model (serve/contract.py).
    install_contract(app, engine.class_names, [*engine.class_names, EXCLUDED])

    # The pages need a login too; a browser without one is sent to /login (API routes answer 401 instead).
    @app.get("/", include_in_schema=False, dependencies=[Depends(page_user)])
    def index() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    @app.get("/history", include_in_schema=False, dependencies=[Depends(page_user)])
    def history() -> FileResponse:
        return FileResponse(str(static / "history.html"))

    return app


def _add_docs(app: FastAPI) -> None:
    """OpenAPI docs at /docs with Swagger UI from the ``swagger-ui-bundle-v2`` package (no CDN: works offline)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_path is None:
            # Without the bundle there is nothing local to render with; the schema itself still works.
            return HTMLResponse("<!doctype html><title>HematoVision API</title><p>Interactive docs need "
                                "<code>pip install swagger-ui-bundle-v2</code>; the OpenAPI schema is at "
                                "<a href='/openapi.json'>/openapi.json</a>.</p>")
        page = get_swagger_ui_html(
            openapi_url=str(app.openapi_url), title="HematoVision API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
        # FastAPI starts Swagger UI with an inline script: allow exactly that one by its hash.
        page.headers["Content-Security-Policy"] = inline_script_policy(bytes(page.body))
        return page


def _add_error_handlers(app: FastAPI) -> None:
    statuses: list[tuple[type[Exception], int]] = [
        (NotFoundError, 404), (ConflictError, 409), (ReviewError, 422),
        (IntegrityError, 409),  # a constraint of the database (SQLite or PostgreSQL) refused the change
        (NonFiniteOutputError, 503),  # the model, not the upload, is at fault: never store or show "nan"
    ]
    for error_type, status in statuses:
        app.add_exception_handler(error_type, _fixed_status(status))

    async def login_required(_request: Request, error: Exception) -> RedirectResponse:
        assert isinstance(error, LoginRequired)
        return RedirectResponse(login_redirect_url(error.next_url), 303)

    app.add_exception_handler(LoginRequired, login_required)

    async def upload_error(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=getattr(error, "status", 400))

    async def other_user_error(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    async def validation_error(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "request"
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        # "input" is left out on purpose: echoing what the client sent helps no one.
        return JSONResponse({"detail": "; ".join(problems) or "invalid request",
                             "errors": [{"loc": list(i.get("loc", ())), "msg": i.get("msg", "")}
                                        for i in error.errors()]}, status_code=422)

    async def http_error(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        headers = error.headers
        if error.status_code == 405:  # every method of the resource, not only those of the first route matched
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(_request))}
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=headers)

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    app.add_exception_handler(UploadError, upload_error)
    app.add_exception_handler(HematoVisionError, other_user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def _fixed_status(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    return handler


class BodySizeLimit:
    """Refuse request bodies above ``max_bytes`` with 413, before they are parsed.

    A declared ``Content-Length`` is checked up front; a chunked body is counted as it
    arrives and cut off when it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than the limit of {self.max_bytes:,} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    detail = message if declared > self.max_bytes else "invalid Content-Length header"
                    response = JSONResponse({"detail": detail}, status_code=413 if declared > 0 else 400,
                                            headers={"Connection": "close"})
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.max_bytes:
                    raise UploadError(message, 413)
            return incoming

        await self.app(scope, limited_receive, send)
