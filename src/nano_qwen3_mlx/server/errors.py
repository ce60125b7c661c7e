"""OpenAI error JSON (``{"error": {"message", "type", "param", "code"}}``) for the typed errors.

The errors themselves live in :mod:`nano_qwen3_mlx.errors`; this module only renders them and
turns what is not one of them (pydantic validation, an unexpected engine failure) into one.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from ..errors import (
    APIError,
    EngineDeadError,
    InvalidRequestError,
    NanoQwen3Error,
    QueueFullError,
    client_message,
)

__all__ = ["APIError", "bad_request", "error_body", "error_json", "error_response",
           "from_validation_error", "to_api_error"]

log = logging.getLogger("nano_qwen3_mlx.server")

# HTTP status -> OpenAI error type (the client maps statuses to exception classes itself).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI error JSON for an HTTP status."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_json(err: NanoQwen3Error) -> dict[str, Any]:
    """The OpenAI error JSON of a typed error."""
    return error_body(err.status, client_message(err), param=err.field, code=err.code)


def error_response(err: NanoQwen3Error) -> web.Response:
    """A typed error as an HTTP response, with its headers (``Retry-After``, ...)."""
    return web.json_response(error_json(err), status=err.status, headers=err.headers)


def bad_request(message: str, field: str | None = None) -> InvalidRequestError:
    """A 400 naming the request field at fault."""
    return InvalidRequestError(message, field=field)


def from_validation_error(exc: ValidationError) -> InvalidRequestError:
    """400 naming the first offending field (pydantic messages carry no paths or code)."""
    first = exc.errors(include_url=False, include_context=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    extra = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
    message = f"{loc}: {first['msg']}{extra}" if loc else f"{first['msg']}{extra}"
    return bad_request(message, loc or None)


def to_api_error(exc: BaseException, engine_dead: bool = False) -> NanoQwen3Error:
    """What the client sees for an exception from the engine (never a traceback or a path).

    ``engine_dead``: the engine has stopped, so any failure is reported as such.
    """
    if engine_dead and not isinstance(exc, QueueFullError):
        return EngineDeadError(str(exc))
    if isinstance(exc, NanoQwen3Error):
        return exc
    if isinstance(exc, ValueError):  # a ValueError of the engine's input checks
        return InvalidRequestError(str(exc))
    log.error("engine request failed", exc_info=exc)
    return APIError(500, "internal error while generating", code="engine_error")
