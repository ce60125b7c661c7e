"""Driving the engine for one HTTP request: n streams, merged events, deadlines, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..sampling_params import SamplingParams
from .errors import APIError, from_value_error
from .state import STATE_KEY, Engine, ServerState

log = logging.getLogger("nano_qwen3_mlx.server")


@dataclass(slots=True)
class RunRecord:
    """What the access log and response headers report about a request's generation."""

    sampling: str  # the effective settings of its first choice (X-Sampling-Params)
    tokens: int = 0  # tokens generated, also for aborted and timed-out requests
    client_gone: bool = False  # the client left mid-stream (logged as 499)


RUN_KEY = web.RequestKey("run", RunRecord) if hasattr(web, "RequestKey") else "run"


class ClientGone(Exception):
    """The client closed the connection; its requests are aborted."""


@dataclass(slots=True)
class Generation:
    """One choice of a request: its prompt, params and engine request id."""

    index: int
    prompt: str | list[int]
    params: SamplingParams
    request_id: str


Event = tuple[int, dict[str, Any]] | None  # None: nothing arrived for a keep-alive interval


class GenerationRun:
    """Runs one engine stream per choice and merges their chunks into one event stream.

    Use as ``async with``: leaving the block (normally, on error, or because the handler was
    cancelled when the client went away) aborts every unfinished stream, freeing its blocks.
    """

    def __init__(self, request: web.Request, gens: list[Generation], *, priority: int = 0,
                 timeout: float | None = None) -> None:
        self.state: ServerState = request.app[STATE_KEY]
        self.engine: Engine = self.state.ready_engine()
        self.request = request
        self.gens = gens
        self.record = RunRecord(gens[0].params.summary() if gens else "")
        request[RUN_KEY] = self.record
        self.priority = priority
        limits = [t for t in (timeout, self.state.config.request_timeout) if t]
        self.timeout = min(limits) if limits else None
        # time.monotonic() when the request times out, None for never.
        self.deadline = time.monotonic() + self.timeout if self.timeout else None
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(self.state.max_buffered_chunks)
        self._tasks: list[asyncio.Task[None]] = []
        self._finished: set[int] = set()
        self._overflow = False
        self._last_chunk_at: dict[int, float] = {}
        self._t0 = time.monotonic()

    async def __aenter__(self) -> GenerationRun:
        prompts = {id(g.prompt): len(g.prompt) for g in self.gens}  # n choices share one
        self.state.metrics.prompt_tokens.inc(sum(prompts.values()))
        self._tasks = [asyncio.create_task(self._pump(g)) for g in self.gens]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for gen in self.gens:
            if gen.index not in self._finished:
                await self._abort(gen.request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # already gone, or the engine died: nothing left to free
            log.debug("abort %s failed", request_id, exc_info=True)

    async def _pump(self, gen: Generation) -> None:
        stream = self.engine.generate_stream(
            gen.prompt, gen.params, priority=self.priority, request_id=gen.request_id
        )
        try:
            async for chunk in stream:
                self._count(chunk)
                if not self._put(gen.index, chunk) or chunk.get("finished"):
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._put(gen.index, exc)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _count(self, chunk: dict[str, Any]) -> None:
        # Counted as the engine delivers them, so aborted and timed-out requests count too.
        num = len(chunk.get("token_ids") or [])
        self.record.tokens += num
        self.state.metrics.generation_tokens.inc(num)

    def _put(self, index: int, item: Any) -> bool:
        try:
            self._queue.put_nowait((index, item))
        except asyncio.QueueFull:
            # A reader this slow must not make the engine buffer without bound: stop pumping.
            self._overflow = True
            return False
        return True

    async def events(self) -> AsyncIterator[Event]:
        """``(index, chunk)`` per engine chunk until every choice finished; None on idle ticks."""
        while len(self._finished) < len(self.gens):
            item = await self._next(self._wait_s())
            if item is None:
                yield None
                continue
            index, chunk = item
            self._check_chunk(chunk)
            self._observe(index, chunk)
            if chunk.get("finished"):
                self._finished.add(index)
            yield index, chunk

    def _wait_s(self) -> float:
        wait = self.state.keepalive_s
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise APIError(408, f"the request timed out after {self.timeout:g} s",
                               code="timeout")
            wait = min(wait, left)
        return wait

    async def _next(self, wait: float) -> tuple[int, Any] | None:
        if self._overflow:
            raise APIError(408, "the client read too slowly; the request was aborted",
                           code="slow_reader")
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except asyncio.TimeoutError:
            transport = self.request.transport
            if transport is None or transport.is_closing():
                raise ClientGone from None
            return None

    def _check_chunk(self, chunk: Any) -> None:
        if isinstance(chunk, BaseException):
            raise _api_error(chunk, self.engine)
        if chunk.get("finish_reason") == "error":
            log.error("generation %s failed: %s", chunk.get("request_id"), chunk.get("error"))
            raise APIError(500, "generation failed inside the engine", code="engine_error")

    def _observe(self, index: int, chunk: dict[str, Any]) -> None:
        if not chunk.get("token_ids"):
            return
        now = time.monotonic()
        last = self._last_chunk_at.get(index)
        metrics = self.state.metrics
        if last is None:
            metrics.ttft.observe(now - self._t0)
        else:
            metrics.itl.observe((now - last) / len(chunk["token_ids"]))
        self._last_chunk_at[index] = now


def _api_error(exc: BaseException, engine: Engine) -> APIError:
    """Map an engine exception to what the client sees (never a traceback or a path)."""
    if isinstance(exc, APIError):
        return exc
    kind = _engine_error_kind(exc)
    if kind == "QueueFullError":
        return APIError(429, "the server is busy: the request queue is full, retry later",
                        code="queue_full", headers={"Retry-After": "1"})
    if kind == "EngineDeadError" or engine.error is not None:
        return APIError(503, "the engine is not running; see the server log", code="engine_dead")
    if isinstance(exc, ValueError):
        return from_value_error(exc)
    log.error("engine request failed", exc_info=exc)
    return APIError(500, "internal error while generating", code="engine_error")


def _engine_error_kind(exc: BaseException) -> str | None:
    """The class name of an AsyncLLM error (a test double's errors match by name)."""
    try:
        from ..async_llm import EngineDeadError, QueueFullError
    except ImportError:  # the engine cannot be imported here: match the names
        return type(exc).__name__
    if isinstance(exc, QueueFullError):
        return "QueueFullError"
    if isinstance(exc, EngineDeadError):
        return "EngineDeadError"
    return type(exc).__name__


@dataclass(slots=True)
class Collected:
    """A finished run's output per choice index (texts joined, finals = last chunks)."""

    texts: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[int, dict[str, Any]] = field(default_factory=dict)


async def collect(run: GenerationRun) -> Collected:
    """Run to the end for a non-streaming response (``ClientGone`` when the client left)."""
    texts: dict[int, list[str]] = {g.index: [] for g in run.gens}
    out = Collected(logprobs={g.index: [] for g in run.gens})
    async with run:
        async for event in run.events():
            if event is None:
                continue
            index, chunk = event
            texts[index].append(chunk.get("text", ""))
            out.logprobs[index].extend(chunk.get("logprobs") or [])
            if chunk.get("finished"):
                out.finals[index] = chunk
    out.texts = {index: "".join(parts) for index, parts in texts.items()}
    return out


def merge_usage(prompt_tokens: int, chunks: dict[int, dict[str, Any]]) -> dict[str, int]:
    """Usage over all choices: prompt tokens as given, completion tokens summed."""
    completion = sum(c.get("usage", {}).get("completion_tokens", 0) for c in chunks.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
