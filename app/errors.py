"""Status-carrying exceptions and the one handler that answers every error as JSON or as an HTML page.

Routes raise (`NotFound`, `PayloadTooLarge`, ...); nothing builds an error response by hand. The JSON shape
is always ``{"error": message, "status": code}``, plus ``"detail"`` (a list of ``{loc, msg, type}``) for
request validation errors. Browsers asking for HTML get the same message on an error page, and htmx partials
get a small fragment. A bug becomes a logged 500 with no stack trace in the response.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class AppError(Exception):
    """An error with an HTTP status and a message that is safe to show."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(AppError):
    status = 400


class NotFound(AppError):
    status = 404


class PayloadTooLarge(AppError):
    status = 413


class Unprocessable(AppError):
    status = 422


class ServiceUnavailable(AppError):
    """The server is busy or a resource (a model for live runs) is not available."""

    status = 503


class QueryTimeout(ServiceUnavailable):
    """SQL work ran past the request's deadline."""


class GatewayTimeout(AppError):
    """A live re-run ran past its time limit."""

    status = 504


def error_body(status: int, message: str, detail: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The one JSON error shape.

    >>> error_body(404, "no model 'x'")
    {'error': "no model 'x'", 'status': 404}
    """
    body: dict[str, Any] = {"error": message, "status": status}
    if detail is not None:
        body["detail"] = detail
    return body


def wants_json(request: Request) -> bool:
    """API paths and exports always get JSON; htmx and browsers (Accept: text/html) get HTML; others JSON."""
    path = request.url.path
    if path.startswith("/api/") or path.endswith((".json", ".csv")):
        return True
    if request.headers.get("hx-request") == "true":
        return False
    return "text/html" not in request.headers.get("accept", "")


def _respond(
    request: Request,
    status: int,
    message: str,
    detail: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    headers = dict(headers or {})
    headers["Cache-Control"] = "no-store"
    if wants_json(request):
        return JSONResponse(error_body(status, message, detail), status_code=status, headers=headers)
    if "/_partials/" in request.url.path:
        return request.app.state.templates.TemplateResponse(
            request,
            "_partials/_error.html",
            {"status": status, "message": message},
            status_code=status,
            headers=headers,
        )
    return request.app.state.templates.TemplateResponse(
        request,
        "error.html",
        {"status": status, "message": message, "detail": detail or []},
        status_code=status,
        headers=headers,
    )


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    detail: list[dict[str, Any]] = []
    for error in exc.errors():
        item = {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", "")),
            "type": error.get("type"),
        }
        # A parameter read by several dependencies (run, threshold) is reported by each of them: say it once.
        if item not in detail:
            detail.append(item)
    return detail


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return _respond(request, exc.status, exc.message, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, 422, "invalid request", _validation_detail(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "error"
    status = exc.status_code
    if status == 404 and message == "Not Found":
        message = f"no page at {request.url.path}"
    if status == 400 and "parsing the body" in message:  # FastAPI's answer to a body that is not JSON
        status, message = 422, "the request body is not valid JSON"
    return _respond(request, status, message, headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(request, 500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
