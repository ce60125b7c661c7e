"""Graceful shutdown: in-flight requests drain within a grace, then end with an honest error.

What ``nano-qwen3 serve`` does on SIGTERM or SIGINT (``server/launch.py``):

1. :meth:`Drain.begin`: every new request gets 503 ``shutting_down`` (``/health`` too, so a
   load balancer stops routing here); running requests go on. The socket stays open, so a
   client that still reaches this replica is told why instead of being refused.
2. :func:`drain` waits until no request is left, at most the grace (a second signal ends the
   wait at once).
3. :meth:`Drain.halt`: each generation still running (and each wait in
   :meth:`Drain.until_halt`: embeddings) ends now with ``ShuttingDownError``: a
   stream with its API's own terminal error event (OpenAI chat/completions: a last chunk with
   ``finish_reason: "abort"`` and an ``error`` object, then ``data: [DONE]``; Anthropic: an
   ``error`` event; Responses: ``error`` then ``response.failed``), a JSON request with a 503
   error body; their engine requests are aborted. They get :data:`HALT_S` to write it.
4. The caller then closes the connections and stops the engine.

The whole exit therefore takes about the grace, not aiohttp's grace-then-grace-again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from ..errors import ShuttingDownError

log = logging.getLogger("nano_qwen3_mlx.server")

T = TypeVar("T")

# Seconds the requests halted at the end of the grace get to write their terminal events.
HALT_S = 2.0
HALTED = "the server shut down before the reply was complete; retry the request"


class Haltable(Protocol):
    """A running generation that can be ended early (``GenerationRun``, or the wait of
    :meth:`Drain.until_halt`)."""

    def halt(self, err: ShuttingDownError) -> None: ...


class Drain:
    """The shutdown state of one app: in-flight requests, running generations, refusals."""

    def __init__(self) -> None:
        self.draining = False  # new requests are refused with 503
        self.halted = False  # running generations were ended; no new one may start
        self.in_flight = 0  # HTTP requests inside a handler
        self._idle = asyncio.Event()
        self._idle.set()
        self._runs: set[Haltable] = set()

    def enter(self) -> None:
        """A request entered its handler."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A request left its handler."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def add(self, run: Haltable) -> None:
        """Track a generation that starts; once halted, none may start (a turn's second
        phase, a request that was parsed just before the halt)."""
        if self.halted:
            raise ShuttingDownError(HALTED)
        self._runs.add(run)

    def discard(self, run: Haltable) -> None:
        self._runs.discard(run)

    async def until_halt(self, work: Awaitable[T]) -> T:
        """Await ``work`` (a handler's wait that is no ``GenerationRun``: embeddings); when
        the grace ends first, cancel it and raise ``ShuttingDownError``."""
        task = asyncio.ensure_future(work)
        guard = _Guard(task)
        try:
            self.add(guard)
        except ShuttingDownError:
            task.cancel()
            raise
        try:
            return await task
        except asyncio.CancelledError:
            # The halt cancelled the work, not whoever cancels this handler (the client leaving);
            # Task.cancelling() is Python 3.11+, before it a halt wins.
            cancelling = getattr(asyncio.current_task(), "cancelling", lambda: 0)()
            if guard.error is not None and not cancelling:
                raise guard.error from None
            raise
        finally:
            self.discard(guard)

    def begin(self) -> None:
        """Refuse new requests from now on."""
        self.draining = True

    def halt(self) -> int:
        """End every running generation with ``ShuttingDownError``; how many there were."""
        self.halted = True
        runs = list(self._runs)
        for run in runs:
            run.halt(ShuttingDownError(HALTED))  # one each: an exception raised in one task
        return len(runs)

    async def wait_idle(self, timeout_s: float, hurry: asyncio.Event | None = None) -> bool:
        """Wait until no request is in flight (True), ``timeout_s`` passed or ``hurry`` was set
        (False)."""
        waits = {asyncio.ensure_future(self._idle.wait())}
        if hurry is not None:
            waits.add(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=max(timeout_s, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return self._idle.is_set()


class _Guard:
    """What :meth:`Drain.until_halt` registers: halting cancels the task it waits on."""

    def __init__(self, task: asyncio.Future) -> None:
        self.task = task
        self.error: ShuttingDownError | None = None

    def halt(self, err: ShuttingDownError) -> None:
        self.error = err
        self.task.cancel()


async def drain(app_drain: Drain, grace_s: float, hurry: asyncio.Event | None = None) -> None:
    """Steps 1 to 3 above: refuse new requests, wait up to ``grace_s``, halt the rest."""
    app_drain.begin()
    if app_drain.in_flight:
        log.info("shutting down: waiting up to %g s for %d request(s)", grace_s,
                 app_drain.in_flight)
    if await app_drain.wait_idle(grace_s, hurry):
        return
    halted = app_drain.halt()
    log.warning("shutdown grace over: %d running generation(s) ended with an error", halted)
    await app_drain.wait_idle(HALT_S)
