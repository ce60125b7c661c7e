"""What the handlers share: the engine, the server config and the metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from ..config import ServerConfig
from ..errors import EngineDeadError, ModelLoadingError, ModelNotFoundError, ShuttingDownError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .metrics import ServerMetrics
from .shutdown import Drain

if TYPE_CHECKING:
    from .management.pool import ModelPool


class AsyncLLMLike(Protocol):
    """The part of the ``AsyncLLM`` façade the server uses (tests pass a scripted double)."""

    tokenizer: Any
    model_name: str
    max_model_len: int
    num_parameters: dict[str, int]  # {"total": ..., "active": ...}
    sampling_defaults: dict[str, Any]
    is_ready: bool
    error: BaseException | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate_outputs(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]: ...

    async def abort(self, request_id: str) -> None: ...

    async def embed(self, prompt: str | list[int], *, priority: int = 0,
                    request_id: str | None = None) -> dict[str, Any]: ...

    def get_stats(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class ServerState:
    """Per-app state, stored under :data:`STATE_KEY`."""

    config: ServerConfig
    engine: AsyncLLMLike | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    # Keep-alive comment interval while a stream waits for tokens.
    keepalive_s: float = 10.0
    # Chunks buffered for a slow reader before its request is aborted.
    max_buffered_chunks: int = 4096
    # Seconds one write to a client may block before the client is cut off.
    write_timeout_s: float = 30.0
    start_error: BaseException | None = None
    start_failed: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    model_aliases: set[str] = field(default_factory=set)
    # Shutdown: requests in flight, running generations, refusing new ones (server/shutdown.py).
    drain: Drain = field(default_factory=Drain)
    # Several models (server/management/pool.py): each request's engine comes from here and
    # ``engine`` stays None.
    models: ModelPool | None = None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def failure(self) -> BaseException | None:
        """Why the engine cannot serve (failed start or dead engine thread), or None."""
        if self.start_error is not None:
            return self.start_error
        return None if self.engine is None else self.engine.error

    @property
    def model_name(self) -> str | None:
        if self.config.served_model_name:
            return self.config.served_model_name
        return None if self.engine is None else self.engine.model_name

    def not_ready(self) -> EngineDeadError | ModelLoadingError | ShuttingDownError | None:
        """The readiness rule (``/health`` and every handler): why no request can run, or None."""
        if self.failure is not None:
            return EngineDeadError(f"{type(self.failure).__name__}")
        if self.drain.draining:
            return ShuttingDownError()
        if self.models is not None:  # ready once the pinned models are loaded
            if not self.models.is_alive:
                return EngineDeadError("EngineThreadDied")
            return None if self.models.started else ModelLoadingError()
        if self.engine is None or not self.engine.is_ready:
            return ModelLoadingError()
        return None

    @property
    def is_ready(self) -> bool:
        return self.not_ready() is None

    def ready_engine(self) -> AsyncLLMLike:
        """The engine, or a 503 while it loads or after it died."""
        error = self.not_ready()
        if error is not None:
            raise error
        return self.engine

    async def engine_for(self, name: str | None) -> tuple[str, AsyncLLMLike]:
        """The model name a response reports and its engine: 503 unless ready, 404 for a model
        this server does not serve; with several models, the named one (loaded if need be)."""
        if self.models is None:
            engine = self.ready_engine()
            return self.check_model(name), engine
        error = self.not_ready()
        if error is not None:
            raise error
        return await self.models.engine(name)

    def check_model(self, name: str | None) -> str:
        """The served model name; 404 for a model this server does not serve."""
        served = self.model_name or ""
        if name is None or name == served or name in self.model_aliases:
            return served
        raise ModelNotFoundError(name)


STATE_KEY = web.AppKey("nano_qwen3_state", ServerState)
