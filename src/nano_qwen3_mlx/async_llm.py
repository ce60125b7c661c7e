"""``AsyncLLM``: the engine in one background thread, results handed to asyncio.

Only the engine thread touches MLX (MLX streams are thread-local). The event loop talks
to it through a thread-safe inbox; outputs come back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .config import EngineConfig, engine_config
from .engine.llm_engine import LLMEngine
from .errors import EngineDeadError, InvalidRequestError, QueueFullError
from .outputs import GenerationResult, RequestOutput, add_reasoning
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)
Prompt = str | list[int]


__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError"]


class AsyncLLM:
    """Asynchronous generation on one shared batching engine.

    ``AsyncLLM(model=None, **engine_options)``; use ``async with`` or ``await start()`` /
    ``await close()``.
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 **engine_options: Any) -> None:
        self.config = engine_config(config, model, engine_options)
        self.engine: LLMEngine | None = None
        self.error: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: dict[str, Any] = {}
        self._stopping = False

    # ---- lifetime -----------------------------------------------------------------------
    async def start(self) -> AsyncLLM:
        """Load the model in the engine thread and wait until it is ready."""
        if self._thread is not None:
            return self
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="nano-qwen3-engine",
                                        daemon=True)
        self._thread.start()
        await ready
        return self

    async def close(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        if self._thread is None:
            return
        self._inbox.put(("stop",))
        # Wait without a limit: a thread still loading the model must not be left running
        # inside MLX while the interpreter shuts down (that aborts the process).
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    async def __aenter__(self) -> AsyncLLM:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.error is None and self._thread is not None \
            and self._thread.is_alive()

    @property
    def tokenizer(self):
        return self._engine().tokenizer

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def max_model_len(self) -> int:
        return self._engine().max_model_len

    @property
    def num_parameters(self) -> dict[str, int]:
        """``{"total": ..., "active": ...}`` (active: used per token; fewer for MoE)."""
        return self._engine().num_parameters

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """What left-out request fields become (model generation_config, then server)."""
        return self._engine().sampling_defaults

    # ---- generation ---------------------------------------------------------------------
    async def generate_stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
        priority: int = 0, request_id: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield chunk dicts as tokens arrive. Leaving early (break, cancel) aborts the request."""
        outputs = self.generate_outputs(prompt, sampling_params, priority=priority,
                                        request_id=request_id)
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                yield out.as_chunk()

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
                       priority: int = 0, request_id: str | None = None) -> dict[str, Any]:
        """Generate to the end; returns the result dict (``generated_text``, ``usage``, ...)."""
        result: GenerationResult | None = None
        outputs = self.generate_outputs(prompt, sampling_params, priority=priority,
                                        request_id=request_id)
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                result = result or GenerationResult(out.request_id)
                result.add(out)
        return result.as_dict()

    async def embed(self, prompt: Prompt, *, priority: int = 0,
                    request_id: str | None = None) -> dict[str, Any]:
        """Embed one prompt through the batching engine (prefill only, no token sampled).

        Returns ``{"embedding": [...], "prompt_tokens": n}``: the last prompt token's
        final-norm hidden state, L2-normalised (Qwen3-Embedding's last-token pooling).
        """
        params = SamplingParams(temperature=0.0, max_tokens=1)
        outputs = self.generate_outputs(prompt, params, priority=priority,
                                        request_id=request_id, pooling=True)
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                if out.finished:
                    if out.embedding is None:
                        raise RuntimeError(out.error or f"embedding ended: {out.finish_reason}")
                    return {"embedding": out.embedding, "prompt_tokens": out.num_prompt_tokens}
        raise RuntimeError("the embedding request ended without an output")

    async def generate_outputs(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
        priority: int = 0, request_id: str | None = None, pooling: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """The typed stream: one ``RequestOutput`` per step until it finishes.

        Leaving early (break, cancel, ``aclose()``) aborts the request and frees its blocks.
        ``pooling=True`` makes it an embedding request (``LLMEngine.add_request``).
        """
        request_id, out_queue = self._submit(prompt, sampling_params, priority, request_id,
                                             pooling)
        finished = False
        try:
            while not finished:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def generate_batch(self, prompts: list[Prompt],
                             sampling_params: SamplingParams | None = None) -> list[dict[str, Any]]:
        """All prompts at once through the batching engine; results in prompt order."""
        return list(await asyncio.gather(*(self.generate(p, sampling_params) for p in prompts)))

    async def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                   **chat_template_kwargs: Any) -> dict[str, Any]:
        """Chat; ``reasoning_content`` holds Qwen3 thinking when present."""
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=True, **chat_template_kwargs)
        result = await self.generate(prompt, sampling_params)
        return add_reasoning(result, self.tokenizer, prompt)

    async def submit(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                     priority: int = 0) -> str:
        """Start a request in the background; fetch it later with ``retrieve``."""
        request_id = uuid.uuid4().hex
        self._check_capacity()
        task = asyncio.create_task(self.generate(prompt, sampling_params, priority=priority,
                                                 request_id=request_id))
        self._tasks[request_id] = task
        await asyncio.sleep(0)  # let it enqueue, so a full queue fails here
        if task.done() and task.exception() is not None:
            self._tasks.pop(request_id)
            raise task.exception()
        return request_id

    async def retrieve(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The result of a submitted request (``KeyError`` if unknown, ``TimeoutError``)."""
        task = self._tasks[request_id]
        result = await asyncio.wait_for(asyncio.shield(task), timeout)
        self._tasks.pop(request_id, None)
        return result

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed by the engine's next iteration."""
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()
        self._inbox.put(("abort", request_id))

    def get_stats(self) -> dict[str, Any]:
        """The engine stats as of its latest step (refreshed at least every 0.25 s)."""
        return dict(self._stats) | {"queue_size": len(self._queues),
                                    "max_queue_size": self.config.max_queue_size}

    # ---- the asyncio side ---------------------------------------------------------------
    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("AsyncLLM is not started: use `async with` or `await start()`")
        return self.engine

    def _check_capacity(self) -> None:
        if not self.is_ready:
            raise EngineDeadError(f"engine is not running: {self.error or 'not started'}")
        if len(self._queues) >= self.config.max_queue_size:
            raise QueueFullError(f"request queue is full ({self.config.max_queue_size} requests)")

    def _submit(self, prompt, params, priority, request_id,
                pooling: bool = False) -> tuple[str, asyncio.Queue]:
        self._check_capacity()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already in use",
                                      field="request_id")
        out_queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = out_queue
        self._inbox.put(("add", request_id, prompt, params, priority, pooling))
        return request_id, out_queue

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        for request_id, item in items:
            if (q := self._queues.get(request_id)) is not None:
                q.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(error)

    # ---- the engine thread --------------------------------------------------------------
    def _run(self, ready: asyncio.Future) -> None:
        try:
            self.engine = LLMEngine(self.config)
        except BaseException as exc:  # surfaced to start()'s caller
            self.error = exc
            self._loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        self._stats = self.engine.get_stats()
        self._loop.call_soon_threadsafe(_set_result, ready, self)
        try:
            self._serve_forever()
        except BaseException as exc:
            log.exception("engine thread died")
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine thread died: {exc}"))

    def _serve_forever(self) -> None:
        engine, last_stats, dirty = self.engine, 0.0, False
        while not self._stopping:
            items = self._handle_commands(block=not engine.has_unfinished_requests())
            busy = engine.has_unfinished_requests()
            if busy:
                items += self._step()
            elif engine.shrink_if_idle():
                dirty = True
            if items:
                self._loop.call_soon_threadsafe(self._deliver, items)
            # Refresh the stats snapshot at most every 0.25 s while busy, once when idle.
            dirty = dirty or busy or bool(items)
            now = time.monotonic()
            if dirty and (now - last_stats > 0.25 or not engine.has_unfinished_requests()):
                self._stats, last_stats, dirty = engine.get_stats(), now, False
        engine.abort_all()
        self._loop.call_soon_threadsafe(self._deliver, [(o.request_id, o) for o in engine.step()])
        engine.close()  # the disk tier's queued writes, then its directory lock

    def _step(self) -> list[tuple[str, Any]]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("engine step failed; failing the requests in flight")
            outputs = self.engine.fail_all(f"engine error: {type(exc).__name__}")
        return [(o.request_id, o) for o in outputs]

    def _handle_commands(self, block: bool) -> list[tuple[str, Any]]:
        items = []
        try:
            command = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                items += self._handle(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return items

    def _handle(self, command: tuple) -> list[tuple[str, Any]]:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, priority, pooling = command
            try:
                self.engine.add_request(prompt, params, request_id, priority, pooling)
            except ValueError as exc:
                return [(request_id, exc)]
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "stop":
            self._stopping = True
        return []


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
