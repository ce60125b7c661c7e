"""The errors this package raises on purpose, each with the HTTP ``status`` it maps to.

Every class carries ``.status``, ``.code`` and, where one field of the request is at fault,
``.field``; the server renders any of them as error JSON without looking at the message or
the class name. ``InvalidRequestError`` is a ``ValueError`` and the capacity errors are
``RuntimeError`` s, so callers of the Python API may keep catching those. This module imports
nothing heavy: the server uses it before (and without) loading MLX.
"""

from __future__ import annotations

import sys
from typing import ClassVar, NoReturn


class NanoQwen3Error(Exception):
    """Base class: ``message`` (what a client may see), ``status``, ``code``, ``field``."""

    status: ClassVar[int] = 500
    code: ClassVar[str | None] = None
    # Seconds a client should wait before retrying (sent as ``Retry-After``), None for no hint.
    retry_after: ClassVar[int | None] = None

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def headers(self) -> dict[str, str]:
        """Extra HTTP headers for the error response."""
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvalidRequestError(NanoQwen3Error, ValueError):
    """A request (prompt, sampling parameter, body field) that cannot run; ``field`` names it."""

    status = 400


class QueueFullError(NanoQwen3Error, RuntimeError):
    """The engine already holds ``max_queue_size`` requests; retry later."""

    status, code, retry_after = 429, "queue_full", 1
    client_message = "the server is busy: the request queue is full, retry later"


class EngineDeadError(NanoQwen3Error, RuntimeError):
    """The engine thread stopped (or never started); no request can be served."""

    status, code = 503, "engine_dead"
    # What a client sees: the message itself may hold file paths.
    client_message = "the engine is not running; see the server log"


class ModelLoadingError(NanoQwen3Error):
    """The engine is still loading the model."""

    status, code, retry_after = 503, "model_loading", 5

    def __init__(self, message: str = "the model is still loading") -> None:
        super().__init__(message)


class ShuttingDownError(NanoQwen3Error):
    """The server is shutting down: a new request is refused, or the grace ran out before a
    running request finished (it was aborted). Another replica, or a restart, can serve it."""

    status, code, retry_after = 503, "shutting_down", 1

    def __init__(self, message: str = "the server is shutting down") -> None:
        super().__init__(message)


class ModelNotFoundError(NanoQwen3Error):
    """A request names a model this server does not serve."""

    status, code = 404, "model_not_found"

    def __init__(self, name: str, available: list[str] | None = None) -> None:
        listed = f" Available models: {', '.join(available)}." if available else ""
        super().__init__(f"The model `{name}` does not exist.{listed}", field="model")


class ModelMemoryError(NanoQwen3Error, RuntimeError):
    """A model cannot be loaded inside the server's memory budget (``--max-memory-gb``), even
    after unloading every idle, unpinned model."""

    status, code, retry_after = 503, "insufficient_memory", 5


class RequestTimeoutError(NanoQwen3Error):
    """The request ran past its deadline (or its reader was too slow) and was aborted."""

    status, code = 408, "timeout"


class SlowReaderError(RequestTimeoutError):
    """The client read the stream so slowly that its buffer filled; the request was aborted."""

    code = "slow_reader"


class GenerationFailedError(NanoQwen3Error):
    """The engine failed a request (a step raised); details are in the server log."""

    code = "engine_error"


class AuthenticationError(NanoQwen3Error):
    """Missing or wrong API key."""

    status, code = 401, "invalid_api_key"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class APIError(NanoQwen3Error):
    """Any other error with an explicit HTTP status (``param`` is the OpenAI name of ``field``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, field=param)
        self.status = status  # type: ignore[misc]  # per instance here, per class elsewhere
        self.code = code  # type: ignore[misc]
        self._headers = headers or {}

    @property
    def headers(self) -> dict[str, str]:
        return self._headers


def client_message(exc: NanoQwen3Error) -> str:
    """The message a client sees: the class's fixed text where the message may leak internals."""
    return getattr(exc, "client_message", None) or exc.message


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none): what a
    one-line error for a user quotes of an error from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    """The command line's way out: ``error: <message>`` on stderr and a non-zero exit, never a
    traceback (typer/click pass the ``SystemExit`` through)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
