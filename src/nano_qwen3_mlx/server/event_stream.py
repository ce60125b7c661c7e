"""Driving one assistant turn (:mod:`.turns`) into a typed-event SSE stream or one result.

Anthropic and OpenAI Responses streams name every event (``event: <type>`` then ``data:``)
and end without ``data: [DONE]``. A formatter turns engine chunks into such events; this
module owns the HTTP side: start on the first event (so a full queue is still a plain 429),
keep-alives, errors after the stream began, and a client that went away.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from .errors import APIError
from .generation import ClientGone, Event
from .streaming import SSEWriter
from .turns import Finish, TurnParser, finish_of

log = logging.getLogger("nano_qwen3_mlx.server")

NamedEvent = tuple[str, dict[str, Any]]


class EventFormatter(Protocol):
    """What an endpoint's stream formatter provides (pure: no I/O)."""

    def start(self) -> list[NamedEvent]: ...

    def chunk(self, chunk: dict[str, Any]) -> list[NamedEvent]: ...

    def error(self, err: APIError) -> list[NamedEvent]: ...

    def keepalive(self) -> list[NamedEvent]: ...


class NamedSSEWriter(SSEWriter):
    """SSE with ``event:`` names and no ``[DONE]`` terminator."""

    async def send_event(self, name: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False)
        await self._write(f"event: {name}\ndata: {data}\n\n")

    async def done(self) -> None:
        await self._guard(self.response.write_eof())


async def stream_events(request: web.Request, events: AsyncIterator[Event],
                        formatter: EventFormatter,
                        deadline: float | None = None) -> web.StreamResponse:
    """Stream a turn's events through ``formatter``; errors before the first byte stay HTTP."""
    sse = NamedSSEWriter(request, deadline)
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                await _begin(sse, formatter)
                payloads = formatter.keepalive() if event is None else formatter.chunk(event[1])
                if event is None and not payloads:
                    await sse.keepalive()
                await _send(sse, payloads)
        await _begin(sse, formatter)
        await sse.done()
    except ClientGone:
        log.info("client went away; request aborted")
        if not sse.started:
            raise
    except APIError as err:
        if not sse.started:
            raise
        with contextlib.suppress(ClientGone):
            await _send(sse, formatter.error(err))
            await sse.done()
    return sse.response


async def _begin(sse: NamedSSEWriter, formatter: EventFormatter) -> None:
    if not sse.started:
        await sse.start()
        await _send(sse, formatter.start())


async def _send(sse: NamedSSEWriter, payloads: list[NamedEvent]) -> None:
    for name, payload in payloads:
        await sse.send_event(name, payload)


@dataclass(slots=True)
class TurnResult:
    """A whole turn: reasoning, text, tool calls (OpenAI shape) and how it ended."""

    reasoning: str = ""
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish: Finish | None = None
    saw_reasoning: bool = False


async def collect_turn(events: AsyncIterator[Event], parser: TurnParser) -> TurnResult:
    """Run a turn to its end (non-streaming responses)."""
    parts: dict[str, list[str]] = {"reasoning": [], "text": []}
    last: dict[str, Any] = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if event is None:
                continue
            last = event[1]
            for kind, text in parser.feed(last):
                parts[kind].append(text)
    pieces, calls = parser.finish()
    for kind, text in pieces:
        parts[kind].append(text)
    return TurnResult("".join(parts["reasoning"]), "".join(parts["text"]), calls,
                      finish_of(last, parser), parser.reasoning.saw_reasoning)
