"""The API's published contract: one error model, and an OpenAPI document that says what the server does.

Client code for a lab system is often generated from ``/openapi.json``, so the document must list every
status code an operation can answer and the one shape of every error. Most of those codes do not come
from a route's own code but from how the app is wired, so they are derived here, in one place, from
that wiring rather than declared by hand on each route:

* every operation: 400 (a ``Host`` that is not served, a malformed ``Content-Length`` or body), 408
  (headers or body too slow, :mod:`~hematovision.serve.deadlines`), 413 (body over the limit) and 500
  (a bug; the details go only to the server log); 429 where the rate limit applies
  (:mod:`~hematovision.serve.protect`).
* operations behind a login (the :func:`~hematovision.serve.auth.authenticate` dependency): 401 with
  ``WWW-Authenticate: Bearer``; 403 where a role is required, or for a state-changing method (a
  cross-site request or a missing CSRF token with the browser's session cookie).
* operations with parameters or a body: 422.

Routes declare only what their own code raises (404, 409, 415, 503 ...), with a description, in FastAPI's
``responses={404: {"description": "..."}}``; every 4xx/5xx answer then gets the :class:`ErrorOut` schema.
The served model's class names become the ``enum`` of the review labels and of the heat map's ``label``,
so a schema-valid request is one the server accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.routing import Route, compile_path

from hematovision.serve.auth import UNSAFE_METHODS, authenticate
from hematovision.serve.protect import UNLIMITED_PREFIXES

ERROR_SCHEMA_REF = "#/components/schemas/ErrorOut"
# The default description of each error status; a route's own ``responses=`` description wins.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "malformed request: a host this server does not answer to, an invalid Content-Length, "
         "or a body that cannot be parsed",
    401: "no valid login: send 'Authorization: Bearer TOKEN' with a token from POST /api/v1/auth/token",
    403: "forbidden: the user's role does not allow it, or a browser session's request is cross-site "
         "or lacks the X-CSRF-Token header",
    404: "not found",
    408: "the request's headers or body did not arrive in time",
    409: "conflict with the current state",
    413: "the request body (or a file in it) is larger than the server's limit",
    415: "unsupported media type",
    422: "invalid parameters or body: 'detail' names each problem, 'errors' lists them by location",
    429: "too many requests: try again after Retry-After seconds",
    500: "internal server error (a bug: the details are only in the server log)",
    503: "the service cannot answer now",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "always 'Bearer'", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds until a request is allowed again", "schema": {"type": "integer"}}},
}
_EVERY_OPERATION = (400, 408, 413, 500)


class FieldError(BaseModel):
    """One invalid field of a 422 answer."""

    loc: list[str | int] = Field(description="where: e.g. ['query', 'page'] or ['body', 'labels', 0, 'label']")
    msg: str = Field(description="what is wrong with it")


class ErrorOut(BaseModel):
    """Every 4xx and 5xx answer of the API: one clear line in ``detail``, for people and for logs."""

    detail: str = Field(description="what went wrong and, where it helps, what to do about it")
    errors: list[FieldError] | None = Field(default=None, description="422 answers only: each invalid field")


def install_contract(app: FastAPI, labels: Sequence[str], review_labels: Sequence[str]) -> None:
    """Make ``app.openapi()`` publish the derived status codes, :class:`ErrorOut` and the label enums.

    Args:
        app: the app, with every route included.
        labels: the served model's class names (the heat map's ``label``).
        review_labels: what a review may set (the class names and ``excluded``).
    """

    generate = app.openapi  # FastAPI's own: builds the document once and keeps it in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            publish_contract(generate(), app.routes, labels, review_labels)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customize the document


def publish_contract(document: dict[str, Any], routes: Iterable[Any], labels: Sequence[str],
                     review_labels: Sequence[str]) -> None:
    """Rewrite an OpenAPI ``document`` in place (see the module docstring)."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorOut"] = error_schema
    for path, route in _api_routes(routes):
        for method in route.methods or ():
            operation = document["paths"].get(path, {}).get(method.lower())
            if operation is not None:
                _declare_errors(operation, route, method)
    # FastAPI's list-shaped validation error is not what this server sends (see ErrorOut).
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _served_labels(document, labels, review_labels)


def _declare_errors(operation: dict[str, Any], route: APIRoute, method: str) -> None:
    calls = set(_dependency_calls(route))
    codes = set(_EVERY_OPERATION)
    if not route.path.startswith(UNLIMITED_PREFIXES):
        codes.add(429)
    if authenticate in calls:
        codes.add(401)
        if method in UNSAFE_METHODS or any(getattr(call, "__name__", "") == "has_role" for call in calls):
            codes.add(403)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    codes.update(int(code) for code in responses if str(code).isdigit() and int(code) >= 400)
    for code in sorted(codes):
        entry = responses.setdefault(str(code), {})
        if not entry.get("description") or entry["description"] == "Validation Error":
            entry["description"] = ERROR_DESCRIPTIONS.get(code, "error")
        entry["content"] = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
        if code in _HEADERS:
            entry["headers"] = _HEADERS[code]
    operation["responses"] = dict(sorted(responses.items()))


def _routes_with_paths(routes: Iterable[Any]) -> Iterator[tuple[str, Route]]:
    """``(path as served, route)`` of every route with methods, those of included routers too."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.13x: included routers stay routers
    except ImportError:  # older FastAPI copies the routes of an included router into app.routes
        yield from ((route.path_format, route) for route in routes if isinstance(route, Route))
        return
    for context in iter_route_contexts(list(routes)):
        route = context.original_route
        if isinstance(route, Route):
            yield context.path_format or route.path_format, route


def _api_routes(routes: Iterable[Any]) -> Iterator[tuple[str, APIRoute]]:
    """``(path in the document, route)`` of every API route in the document."""
    for path, route in _routes_with_paths(routes):
        if isinstance(route, APIRoute) and route.include_in_schema:
            yield path, route


def _dependency_calls(route: APIRoute) -> Iterable[Callable[..., Any]]:
    stack = list(route.dependant.dependencies)
    while stack:
        dependant = stack.pop()
        if dependant.call is not None:
            yield dependant.call
        stack.extend(dependant.dependencies)


def _served_labels(document: dict[str, Any], labels: Sequence[str], review_labels: Sequence[str]) -> None:
    schemas = document["components"]["schemas"]
    item = schemas.get("ReviewItem", {}).get("properties", {})
    if "label" in item:
        item["label"]["enum"] = list(review_labels)
    for operation in document["paths"].get("/api/v1/predictions/{prediction_id}/heatmap.png", {}).values():
        for parameter in operation.get("parameters", []):
            if parameter["name"] == "label":
                # A query value is a string or absent, never null: the optional anyOf collapses to the enum.
                parameter["schema"] = {"type": "string", "enum": list(labels), "title": "Label",
                                       "description": "a class of the served model (default: the predicted one)"}


def allowed_methods(request: Request) -> list[str]:
    """The methods of every route at the request's path, for the ``Allow`` header of a 405.

    Starlette's router names only the first route matching the path, so ``DELETE`` and ``GET`` of one
    resource, declared as two routes, would advertise ``GET`` alone.
    """
    methods: set[str] = set()
    for path, route in _routes_with_paths(request.app.router.routes):
        if route.methods and compile_path(path)[0].match(request.url.path):
            methods |= route.methods
    return sorted(methods)


__all__ = ["ERROR_DESCRIPTIONS", "ErrorOut", "FieldError", "allowed_methods", "install_contract", "publish_contract"]
