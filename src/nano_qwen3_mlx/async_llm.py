"""``AsyncLLM``: the engine in one background thread, results handed to asyncio.

Only the engine thread touches MLX (MLX streams are thread-local). The event loop talks
to it through a thread-safe inbox; outputs come back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import mlx.core as mx

from .config import EngineConfig, engine_config
from .engine.llm_engine import LLMEngine
from .engine_thread import EngineThread
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
                 thread: EngineThread | None = None, **engine_options: Any) -> None:
        """``thread``: an ``EngineThread`` shared with other engines (a multi-model server);
        by default the engine gets a thread of its own, stopped by ``close()``."""
        self.config = engine_config(config, model, engine_options)
        self.engine: LLMEngine | None = None
        self.error: BaseException | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._shared = thread
        self._driver: EngineThread | None = None  # the thread, from start() to close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats: dict[str, Any] = {}
        self._pending: list[tuple[str, Any]] = []  # engine-thread only: outputs to deliver
        self._last_stats, self._dirty = 0.0, False

    # ---- lifetime -----------------------------------------------------------------------
    async def start(self) -> AsyncLLM:
        """Load the model on the engine thread and wait until it is ready."""
        if self._driver is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._driver = self._shared or EngineThread()
        self._driver.start()
        try:
            await self._driver.run(self._load)
        except Exception as exc:  # surfaced to start()'s caller; is_ready stays False
            self.error = exc
            raise
        return self

    async def close(self) -> None:
        """Abort everything in flight and drop the engine (and stop its own thread)."""
        driver, self._driver = self._driver, None
        if driver is None:
            return
        if self._shared is None:
            driver.stop()
            # Wait without a limit: a thread still loading the model must not be left running
            # inside MLX while the interpreter shuts down (that aborts the process).
            await asyncio.get_running_loop().run_in_executor(None, driver.join)
            return
        with contextlib.suppress(RuntimeError):  # the shared thread has already stopped
            await driver.run(lambda: self._shutdown_engine(driver, release=True))

    async def __aenter__(self) -> AsyncLLM:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.error is None and self._driver is not None \
            and self._driver.is_alive

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
                self._post(("abort", request_id))

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
        self._post(("abort", request_id))

    def get_stats(self) -> dict[str, Any]:
        """The engine stats as of its latest step (refreshed at least every 0.25 s)."""
        return dict(self._stats) | {"queue_size": len(self._queues),
                                    "max_queue_size": self.config.max_queue_size}

    @property
    def num_requests(self) -> int:
        """Requests whose outputs are still awaited (0: idle)."""
        return len(self._queues)

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
        self._post(("add", request_id, prompt, params, priority, pooling))
        return request_id, out_queue

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        for request_id, item in items:
            if (q := self._queues.get(request_id)) is not None:
                q.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(error)

    def _post(self, command: tuple) -> None:
        if self._driver is not None:
            self._driver.post(self, command)

    # ---- on the engine thread (engine_thread.py calls these) ----------------------------
    def _load(self) -> None:
        self.engine = LLMEngine(self.config)
        if self.engine.world.is_follower:  # under mlx.launch: run rank 0's steps, then exit
            self.engine.dist.follow()
        self._stats = self.engine.get_stats()
        self._driver.attach(self)

    def _tick(self) -> bool:
        """One step if the engine has work; deliver outputs; refresh the stats snapshot."""
        engine, items, self._pending = self.engine, self._pending, []
        busy = engine.has_unfinished_requests()
        if busy:
            items += self._step()
        elif engine.shrink_if_idle():
            self._dirty = True
        if items:
            self._loop.call_soon_threadsafe(self._deliver, items)
        # Refresh the stats snapshot at most every 0.25 s while busy, once when idle. The
        # disk tier writes on after the last step: its counts are refreshed too until it is
        # done (else /stats would show its writes pending forever on an idle server).
        writing = engine.disk is not None and engine.disk.store.writing
        self._dirty = self._dirty or busy or bool(items) or writing
        now, busy = time.monotonic(), engine.has_unfinished_requests()
        if self._dirty and (now - self._last_stats > 0.25 or not (busy or writing)):
            self._stats, self._last_stats, self._dirty = engine.get_stats(), now, writing
        return busy

    def _step(self) -> list[tuple[str, Any]]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("engine step failed; failing the requests in flight")
            outputs = self.engine.fail_all(f"engine error: {type(exc).__name__}")
        return [(o.request_id, o) for o in outputs]

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if self.engine is None:  # unloaded (or never loaded) while the command was queued
            if kind == "add":
                error = EngineDeadError("the model was unloaded")
                self._loop.call_soon_threadsafe(self._deliver, [(command[1], error)])
            return
        if kind == "add":
            _, request_id, prompt, params, priority, pooling = command
            try:
                self.engine.add_request(prompt, params, request_id, priority, pooling)
            except ValueError as exc:
                self._pending.append((request_id, exc))
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "stop":
            self._shutdown_engine(self._driver)

    def _shutdown_engine(self, driver: EngineThread | None, release: bool = False) -> None:
        """Abort every request, deliver their last outputs, stop being driven; ``release``
        also drops the engine and MLX's buffer cache, so its memory goes back."""
        if driver is not None:
            driver.detach(self)
        engine = self.engine
        if engine is None:
            return
        engine.abort_all()
        items = [(o.request_id, o) for o in engine.step()]
        self._loop.call_soon_threadsafe(self._deliver, items)
        engine.close()  # the disk tier's queued writes, then its directory lock
        if release:
            self.engine = None
            del engine
            gc.collect()
            mx.clear_cache()

    def _thread_died(self, exc: BaseException) -> None:
        self.error = exc
        self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine thread died: {exc}"))


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
