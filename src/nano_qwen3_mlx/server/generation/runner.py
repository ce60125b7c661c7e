"""The one generation path of the server: engine access, deadlines, disconnects, usage, metrics.

``serve(call, request, formatter)`` runs a :class:`~.request.GenerationRequest` and answers
with the endpoint's :class:`Formatter`: one JSON body, or SSE events as tokens arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...engine.grammar import GRAMMAR_FAILED
from ...errors import (
    GenerationFailedError,
    InvalidRequestError,
    RequestTimeoutError,
    ShuttingDownError,
    SlowReaderError,
)
from ...outputs import GenerationResult, RequestOutput, Usage
from ..errors import to_api_error
from .call import RUN_KEY, ApiCall, ClientGone, RunRecord
from .formatter import Formatter
from .request import Choice, GenerationRequest
from .streaming import stream_run

log = logging.getLogger("nano_qwen3_mlx.server")

Event = tuple[int, RequestOutput] | None  # None: nothing arrived for a keep-alive interval


@dataclass(slots=True)
class RunResult:
    """A finished run: every choice's result (by choice index) and the usage."""

    choices: list[Choice]
    results: dict[int, GenerationResult]
    usage: Usage


class GenerationRun:
    """Runs one engine stream per choice and merges their outputs into one event stream.

    Use as ``async with``: leaving the block (normally, on error, or because the handler was
    cancelled when the client went away) aborts every unfinished stream, freeing its blocks.
    """

    def __init__(self, call: ApiCall, request: GenerationRequest,
                 record: RunRecord | None = None) -> None:
        self.call = call
        self.request = request
        self.choices = request.choices(call.engine.max_model_len,
                                       getattr(call.engine, "sampling_defaults", None))
        # One record per API request: a turn's phases pass theirs, so tokens add up.
        self.record = record or RunRecord(self.choices[0].params.summary() if self.choices
                                          else "")
        call.http[RUN_KEY] = self.record
        limits = [t for t in (request.timeout, call.state.config.request_timeout) if t]
        self.timeout = min(limits) if limits else None
        # time.monotonic() when the request times out, None for never.
        self.deadline = time.monotonic() + self.timeout if self.timeout else None
        self.results = {c.index: GenerationResult(c.request_id) for c in self.choices}
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(
            call.state.max_buffered_chunks)
        self._tasks: list[asyncio.Task[None]] = []
        self._overflow = False
        self._halted: ShuttingDownError | None = None
        self._last_output_at: dict[int, float] = {}
        self._t0 = time.monotonic()

    async def __aenter__(self) -> GenerationRun:
        self.call.state.drain.add(self)  # ShuttingDownError once shutdown ended generations
        self.call.state.metrics.prompt_tokens.inc(self.request.num_prompt_tokens)
        self._tasks = [asyncio.create_task(self._pump(c)) for c in self.choices]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.call.state.drain.discard(self)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for choice in self.choices:
            if not self.results[choice.index].finished:
                await self._abort(choice.request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.call.engine.abort(request_id)
        except Exception:  # already gone, or the engine died: nothing left to free
            log.debug("abort %s failed", request_id, exc_info=True)

    async def _pump(self, choice: Choice) -> None:
        stream = self.call.engine.generate_outputs(
            choice.token_ids, choice.params, priority=self.request.priority,
            request_id=choice.request_id,
        )
        try:
            async for out in stream:
                self._count(out)
                if not self._put(choice.index, out) or out.finished:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._put(choice.index, exc)
        finally:
            await stream.aclose()

    def _count(self, out: RequestOutput) -> None:
        # Counted as the engine delivers them, so aborted and timed-out requests count too.
        self.record.tokens += len(out.token_ids)
        self.call.state.metrics.generation_tokens.inc(len(out.token_ids))

    def _put(self, index: int, item: RequestOutput | BaseException) -> bool:
        try:
            self._queue.put_nowait((index, item))
        except asyncio.QueueFull:
            # A reader this slow must not make the engine buffer without bound: stop pumping.
            self._overflow = True
            return False
        return True

    def halt(self, err: ShuttingDownError) -> None:
        """End the run at its next event with ``err`` (the shutdown grace is over)."""
        self._halted = err
        try:
            self._queue.put_nowait((-1, err))  # wakes a reader waiting for output
        except asyncio.QueueFull:
            pass  # the reader is not waiting: _next sees the halt first

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.results.values())

    async def events(self) -> AsyncIterator[Event]:
        """``(index, output)`` per engine output until every choice finished; None on idle."""
        while not self.finished:
            item = await self._next(self._wait_s())
            if item is None:
                yield None
                continue
            index, out = item
            self._check(out)
            self._observe_latency(index, out)
            self.results[index].add(out)
            yield index, out

    def usage(self) -> Usage:
        """Prompts counted once, completions summed over the choices. A prompt's cached
        tokens are the fewest any of its choices took from the prefix cache."""
        completion = sum(r.num_completion_tokens for r in self.results.values())
        cached: dict[int, int] = {}
        for choice in self.choices:
            last = self.results[choice.index].last
            n = last.num_cached_tokens if last else 0
            cached[choice.prompt_index] = min(cached.get(choice.prompt_index, n), n)
        return Usage(self.request.num_prompt_tokens, completion, sum(cached.values()))

    def result(self) -> RunResult:
        return RunResult(self.choices, self.results, self.usage())

    def _wait_s(self) -> float:
        wait = self.call.state.keepalive_s
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(f"the request timed out after {self.timeout:g} s")
            wait = min(wait, left)
        return wait

    async def _next(self, wait: float) -> tuple[int, Any] | None:
        if self._halted is not None:
            raise self._halted
        if self._overflow:
            raise SlowReaderError("the client read too slowly; the request was aborted")
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except asyncio.TimeoutError:
            if self.call.client_gone:
                raise ClientGone from None
            return None

    def _check(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            raise to_api_error(out, engine_dead=self.call.engine.error is not None)
        if out.finish_reason == "error" and (out.error or "").startswith(GRAMMAR_FAILED):
            # The request's own grammar could not go on (llguidance gave up): the client's.
            raise InvalidRequestError(f"{out.error} (the output so far does not complete it)")
        if out.finish_reason == "error":
            log.error("generation %s failed: %s", out.request_id, out.error)
            raise GenerationFailedError("generation failed inside the engine")

    def _observe_latency(self, index: int, out: RequestOutput) -> None:
        if not out.token_ids:
            return
        now = time.monotonic()
        last = self._last_output_at.get(index)
        metrics = self.call.state.metrics
        if last is None:
            metrics.ttft.observe(now - self._t0)
        else:
            metrics.itl.observe((now - last) / len(out.token_ids))
        self._last_output_at[index] = now

    async def collect(self) -> RunResult:
        """Run to the end for a non-streaming response (``ClientGone`` when the client left)."""
        async with self:
            async for _ in self.events():
                pass
        return self.result()


async def serve(call: ApiCall, request: GenerationRequest,
                formatter: Formatter) -> web.StreamResponse:
    """Run ``request`` and answer with ``formatter``: SSE when it streams, else one JSON body."""
    run = GenerationRun(call, request)
    if request.stream:
        return await stream_run(call.http, run, formatter)
    return web.json_response(formatter.response(await run.collect()))
