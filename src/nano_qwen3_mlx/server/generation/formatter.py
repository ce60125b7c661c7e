"""How an endpoint renders a run: one JSON body, or SSE events as outputs arrive.

Each endpoint subclasses :class:`Formatter`; the runner calls it and never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import NanoQwen3Error
from ..errors import error_json

if TYPE_CHECKING:
    from ...outputs import RequestOutput
    from .runner import RunResult


@dataclass(slots=True)
class SSEEvent:
    """A named SSE event (``event: <name>``); a plain dict payload is sent as ``data:`` only."""

    data: dict[str, Any]
    event: str | None = None


Payload = dict[str, Any] | SSEEvent


class Formatter:
    """Renders one endpoint's responses. Override ``response`` and the ``stream_*`` methods."""

    # OpenAI streams end with ``data: [DONE]``; APIs with named events (Anthropic) do not.
    sse_done: bool = True

    def response(self, result: RunResult) -> dict[str, Any]:
        """The JSON body of a non-streaming response."""
        raise NotImplementedError

    def stream_start(self) -> list[Payload]:
        """Events sent when the stream opens (before the first output)."""
        return []

    def stream_output(self, index: int, out: RequestOutput) -> list[Payload]:
        """Events for one engine output of choice ``index``."""
        raise NotImplementedError

    def stream_end(self, result: RunResult) -> list[Payload]:
        """Events after every choice finished (usage, final message, ...)."""
        return []

    def stream_error(self, err: NanoQwen3Error) -> list[Payload]:
        """Events for an error after the stream began (it ends the stream)."""
        return [error_json(err)]


def error_chunk(chunk: dict[str, Any], err: NanoQwen3Error) -> dict[str, Any]:
    """The last chunk of an OpenAI stream that an error ends: ``chunk`` (its choices carry
    ``finish_reason: "abort"``) with the error object beside them, so a client can tell a
    cut reply from a network fault; the OpenAI SDKs raise on the ``error`` key."""
    return {**chunk, **error_json(err)}
