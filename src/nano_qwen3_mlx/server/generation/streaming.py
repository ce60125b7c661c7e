"""Server-sent events: ``data: <json>\\n\\n`` chunks, keep-alive comments, ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ...errors import NanoQwen3Error
from ..state import STATE_KEY
from .call import ClientGone
from .formatter import Formatter, Payload, SSEEvent

if TYPE_CHECKING:
    from .runner import GenerationRun

log = logging.getLogger("nano_qwen3_mlx.server")

# Past the request's deadline a write still gets this long, so the 408 event can go out.
DEADLINE_GRACE_S = 1.0


class SSEWriter:
    """Writes one SSE stream; a failed write means the client went away.

    Each write is bounded by the server's ``write_timeout_s`` and by the request's deadline
    (``time.monotonic()`` based, None for none): a client that stops reading at the TCP level
    would otherwise hold the handler in ``write`` forever. Such a client is cut off.
    """

    def __init__(self, request: web.Request, deadline: float | None = None) -> None:
        self.request = request
        self.write_timeout_s = request.app[STATE_KEY].write_timeout_s
        self.deadline = deadline
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # stop reverse proxies from buffering the stream
            }
        )
        self.started = False

    async def start(self) -> None:
        self.started = True
        await self._guard(self.response.prepare(self.request))

    async def send(self, payload: Payload) -> None:
        """One event: ``data: <json>``, preceded by ``event: <name>`` for an ``SSEEvent``."""
        if isinstance(payload, SSEEvent):
            name, payload = f"event: {payload.event}\n" if payload.event else "", payload.data
        else:
            name = ""
        await self._write(f"{name}data: {json.dumps(payload, ensure_ascii=False)}\n\n")

    async def send_all(self, payloads: list[Payload]) -> None:
        for payload in payloads:
            await self.send(payload)

    async def keepalive(self) -> None:
        await self._write(": keep-alive\n\n")

    async def done(self, marker: bool = True) -> None:
        """End the stream, with OpenAI's ``data: [DONE]`` when ``marker``."""
        if marker:
            await self._write("data: [DONE]\n\n")
        await self._guard(self.response.write_eof())

    async def _write(self, text: str) -> None:
        await self._guard(self.response.write(text.encode()))

    async def _guard(self, awaitable: Any) -> None:
        try:
            await asyncio.wait_for(awaitable, self._timeout())
        except asyncio.TimeoutError:
            log.info("client stopped reading; closing its connection")
            self._cut_off()
            raise ClientGone from None
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: closing transport
            raise ClientGone from exc

    def _timeout(self) -> float:
        if self.deadline is None:
            return self.write_timeout_s
        left = self.deadline - time.monotonic()
        return min(self.write_timeout_s, max(left, 0.0) + DEADLINE_GRACE_S)

    def _cut_off(self) -> None:
        # abort(), not close(): close() would wait for the unread buffer to drain.
        transport = self.request.transport
        if transport is not None:
            transport.abort()


async def stream_run(request: web.Request, run: GenerationRun,
                     formatter: Formatter) -> web.StreamResponse:
    """Stream ``run`` as SSE; errors before the first byte are still plain HTTP errors.

    The response starts at the first output or the first keep-alive tick, so a full queue
    (raised at once) is a real 429 rather than an error event inside a 200 stream.
    """
    sse = SSEWriter(request, run.deadline)
    try:
        async with run:
            async for event in run.events():
                await _begin(sse, formatter)
                if event is None:
                    await sse.keepalive()
                    continue
                await sse.send_all(formatter.stream_output(*event))
        await _begin(sse, formatter)
        await sse.send_all(formatter.stream_end(run.result()))
        await sse.done(formatter.sse_done)
    except ClientGone:
        log.info("client went away; request aborted")
        run.record.client_gone = True
        if not sse.started:
            raise  # answered 499 by the error middleware
        return sse.response
    except NanoQwen3Error as err:
        if not sse.started:
            raise
        await _send_error(sse, formatter, err)
    return sse.response


async def _begin(sse: SSEWriter, formatter: Formatter) -> None:
    if not sse.started:
        await sse.start()
        await sse.send_all(formatter.stream_start())


async def _send_error(sse: SSEWriter, formatter: Formatter, err: NanoQwen3Error) -> None:
    """An error after the stream began: the formatter's error events, then the end."""
    try:
        await sse.send_all(formatter.stream_error(err))
        await sse.done(formatter.sse_done)
    except ClientGone:
        pass
