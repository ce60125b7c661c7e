"""Access log + metrics, OpenAI error JSON, API key auth, CORS and request ids."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..config import ServerConfig
from ..errors import AuthenticationError, NanoQwen3Error
from .errors import anthropic_error_body, error_body, error_response, is_anthropic_path
from .generation.call import RUN_KEY, ClientGone
from .state import STATE_KEY

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

access_log = logging.getLogger("nano_qwen3_mlx.server.access")
log = logging.getLogger("nano_qwen3_mlx.server")

_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
_OPEN_PATHS = ("/", "/health", "/metrics", "/openapi.json")  # "/": the page (no data)
# HTTP status logged when the client left before we answered (as nginx does).
CLIENT_CLOSED = 499
# Typed request storage where aiohttp has it (3.12+), a plain key before.
REQUEST_ID_KEY = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"


def _route_name(request: web.Request) -> str:
    # The route template, not the raw path: bounded label cardinality.
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request (never the body: prompts stay out unless --log-prompts)."""
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID_KEY] = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    start = time.monotonic()
    status = CLIENT_CLOSED  # the handler was cancelled: the client went away
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed = time.monotonic() - start
        run = request.get(RUN_KEY)
        if run is not None and run.client_gone:
            status = CLIENT_CLOSED  # a stream the client ended: its 200 never completed
        request.app[STATE_KEY].metrics.observe_request(_route_name(request), status, elapsed)
        # The still-encoded path without the query: no log injection, no secrets in queries.
        access_log.info('%s "%s %s" %d %.1fms id=%s%s', request.remote, request.method,
                        request.rel_url.raw_path, status, elapsed * 1000,
                        request[REQUEST_ID_KEY], "" if run is None else f" tokens={run.tokens}")


@web.middleware
async def in_flight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the requests inside a handler: shutdown waits for them (server/shutdown.py)."""
    drain = request.app[STATE_KEY].drain
    drain.enter()
    try:
        return await handler(request)
    finally:
        drain.leave()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI error JSON, with no traceback or path in it."""
    try:
        return await handler(request)
    except NanoQwen3Error as err:
        return error_response(err, anthropic=is_anthropic_path(request.path))
    except ClientGone:
        return web.Response(status=CLIENT_CLOSED)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc, is_anthropic_path(request.path))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _http_error(web.HTTPInternalServerError(reason="internal server error"),
                           is_anthropic_path(request.path))


def _http_error(exc: web.HTTPException, anthropic: bool = False) -> web.Response:
    message = exc.reason
    if exc.status == 413:
        message = f"the request body is too large ({exc.text})"
    elif exc.status == 404:
        message = "no such endpoint"
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    body = anthropic_error_body(exc.status, message) if anthropic else error_body(exc.status, message)
    return web.json_response(body, status=exc.status, headers=headers)


def auth_middleware(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Require ``Authorization: Bearer <api_key>`` or ``x-api-key: <api_key>`` (Anthropic's
    header) on the API; health, metrics and the OpenAPI document stay open."""
    expected = api_key.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path not in _OPEN_PATHS:
            if not _has_key(request, expected):
                raise AuthenticationError("missing or invalid API key")
        return await handler(request)

    return middleware


def _has_key(request: web.Request, expected: bytes) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken does not reveal how much of the key matched.
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
        return True
    x_api_key = request.headers.get("x-api-key")
    return x_api_key is not None and hmac.compare_digest(x_api_key.strip().encode(), expected)


def cors_middleware(origins: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Answer preflight requests for the configured origins (CORS is off when none are)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and _allowed(origin, origins):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": ("Authorization, Content-Type, X-Request-Id, "
                                                 "x-api-key, anthropic-version"),
                "Access-Control-Max-Age": "600",
            })
        return await handler(request)

    return middleware


def _allowed(origin: str, origins: list[str]) -> bool:
    return "*" in origins or origin in origins


def response_headers(origins: list[str]) -> Callable[..., Awaitable[None]]:
    """``on_response_prepare`` hook: request id and CORS headers, also on SSE streams."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        if REQUEST_ID_KEY in request:
            response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
        if RUN_KEY in request:
            response.headers["X-Sampling-Params"] = request[RUN_KEY].sampling
        origin = request.headers.get("Origin")
        if origins and origin and _allowed(origin, origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Vary"] = "Origin"

    return hook


def build_middlewares(config: ServerConfig) -> list:
    """Outermost first: logging sees final statuses, errors are JSON, shutdown counts what
    runs, CORS precedes auth."""
    chain: list = [access_middleware, error_middleware, in_flight_middleware]
    if config.cors_origins:
        chain.append(cors_middleware(config.cors_origins))
    if config.api_key:
        chain.append(auth_middleware(config.api_key))
    return chain
