"""Driving the engine for one HTTP request: parsing, sampling params, n streams, deadlines."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ..sampling_params import SamplingParams
from .errors import APIError, bad_request, from_validation_error, from_value_error
from .protocol import SamplingFields
from .state import STATE_KEY, Engine, ServerState

log = logging.getLogger("nano_qwen3_mlx.server")
M = TypeVar("M", bound=BaseModel)


class ClientGone(Exception):
    """The client closed the connection; its requests are aborted."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read and validate a JSON body (size capped by ``client_max_size``)."""
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not _is_encodable(data):
        # JSON allows "\ud800" escapes; the tokenizer (and UTF-8) cannot take lone surrogates.
        raise bad_request("the request body contains invalid Unicode (a lone surrogate)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_encodable(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """``max_tokens`` for a prompt, or a 400 naming the lengths when it cannot fit."""
    room = max_model_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        asked = prompt_len + (requested or 0)
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({prompt_len} in the prompt, {requested or 0} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            param="max_tokens" if room > 0 else "messages",
        )
    return requested if requested is not None else room


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice (seed + i, so the n samples differ but repeat)."""
    given = {
        name: getattr(req, name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "stop_token_ids")
        if getattr(req, name) is not None
    }
    if req.top_k is not None:
        given["top_k"] = max(req.top_k, 0)  # OpenAI-style -1 means off
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias = _logit_bias(req.logit_bias)
    try:
        return [
            SamplingParams(
                **given, max_tokens=max_tokens, stop_sequences=stop, logprobs=logprobs,
                logit_bias=bias, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                seed=None if req.seed is None else req.seed + i,
            )
            for i in range(req.n)
        ]
    except ValueError as exc:
        raise from_value_error(exc) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.isdigit() or not math.isfinite(value) or not -100 <= value <= 100:
            raise bad_request("logit_bias maps token ids to biases in [-100, 100]", "logit_bias")
        out[int(key)] = value
    return out


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
        self.priority = priority
        limits = [t for t in (timeout, self.state.config.request_timeout) if t]
        self.timeout = min(limits) if limits else None
        self._deadline = time.monotonic() + self.timeout if self.timeout else None
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(self.state.max_buffered_chunks)
        self._tasks: list[asyncio.Task[None]] = []
        self._finished: set[int] = set()
        self._overflow = False
        self._last_chunk_at: dict[int, float] = {}
        self._t0 = time.monotonic()

    async def __aenter__(self) -> GenerationRun:
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
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
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


def merge_usage(prompt_tokens: int, chunks: dict[int, dict[str, Any]]) -> dict[str, int]:
    """Usage over all choices: prompt tokens as given, completion tokens summed."""
    completion = sum(c.get("usage", {}).get("completion_tokens", 0) for c in chunks.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
