"""Server-sent events: ``data: <json>\\n\\n`` chunks, keep-alive comments, ``data: [DONE]``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .errors import APIError
from .generation import ClientGone, GenerationRun
from .state import STATE_KEY

log = logging.getLogger("nano_qwen3_mlx.server")

# Past the request's deadline a write still gets this long, so the 408 event can go out.
DEADLINE_GRACE_S = 1.0

ChunkFn = Callable[[int, dict[str, Any]], list[dict[str, Any]]]
PayloadsFn = Callable[[], list[dict[str, Any]]]


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

    async def send(self, payload: dict[str, Any]) -> None:
        await self._write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n")

    async def keepalive(self) -> None:
        await self._write(": keep-alive\n\n")

    async def done(self) -> None:
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


async def stream_run(
    request: web.Request,
    run: GenerationRun,
    on_start: PayloadsFn,
    on_chunk: ChunkFn,
    on_end: PayloadsFn,
) -> web.StreamResponse:
    """Stream ``run`` as SSE; errors before the first byte are still plain HTTP errors.

    The response starts at the first chunk or the first keep-alive tick, so a full queue
    (raised at once) is a real 429 rather than an error event inside a 200 stream.
    """
    sse = SSEWriter(request, run.deadline)
    try:
        async with run:
            async for event in run.events():
                await _begin(sse, on_start)
                if event is None:
                    await sse.keepalive()
                    continue
                for payload in on_chunk(*event):
                    await sse.send(payload)
        await _begin(sse, on_start)
        for payload in on_end():
            await sse.send(payload)
        await sse.done()
    except ClientGone:
        log.info("client went away; request aborted")
        run.record.client_gone = True
        if not sse.started:
            raise  # answered 499 by the error middleware
        return sse.response
    except APIError as err:
        if not sse.started:
            raise
        await _send_error(sse, err)
    return sse.response


async def _begin(sse: SSEWriter, on_start: PayloadsFn) -> None:
    if not sse.started:
        await sse.start()
        for payload in on_start():
            await sse.send(payload)


async def _send_error(sse: SSEWriter, err: APIError) -> None:
    """An error after the stream began: an error event, then the end of the stream."""
    try:
        await sse.send(err.body())
        await sse.done()
    except ClientGone:
        pass
