"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

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


class APIError(Exception):
    """An error the API reports to the client as OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of this error."""
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self, anthropic: bool = False) -> web.Response:
        """The HTTP response; ``anthropic`` picks Anthropic's error shape (``/v1/messages``)."""
        body = anthropic_error_body(self.status, self.message) if anthropic else self.body()
        return web.json_response(body, status=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI error JSON for an HTTP status."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_validation_error(exc: ValidationError) -> APIError:
    """400 naming the first offending field (pydantic messages carry no paths or code)."""
    first = exc.errors(include_url=False, include_context=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    extra = f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""
    message = f"{loc}: {first['msg']}{extra}" if loc else f"{first['msg']}{extra}"
    return bad_request(message, param=loc or None)


def from_value_error(exc: ValueError) -> APIError:
    """400 for ``SamplingParams`` errors, whose messages start with the field name."""
    message = str(exc)
    name = message.split(" ", 1)[0] if message else None
    return bad_request(message, param=name if name and name.isidentifier() else None)


# HTTP status -> Anthropic error type (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic error JSON: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def is_anthropic_path(path: str) -> bool:
    """Routes that answer errors in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")
