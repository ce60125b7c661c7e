"""The aiohttp application factory; the engine lives and dies with the app (cleanup_ctx)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..config import EngineConfig, ServerConfig
from .management.pool import ModelPool
from .middlewares import build_middlewares, response_headers
from .routes import routes
from .state import STATE_KEY, AsyncLLMLike, ServerState

log = logging.getLogger("nano_qwen3_mlx.server")

ReadyCallback = Callable[[ServerState], Any]


def create_app(
    engine_config: EngineConfig | None = None,
    server_config: ServerConfig | None = None,
    engine: AsyncLLMLike | None = None,
    *,
    keepalive_s: float = 10.0,
    max_buffered_chunks: int = 4096,
    write_timeout_s: float = 30.0,
    on_ready: ReadyCallback | None = None,
    models: ModelPool | None = None,
) -> web.Application:
    """Build the OpenAI-compatible app.

    With ``engine=None`` an ``AsyncLLM`` is built from ``engine_config`` at startup. An engine
    that is not running yet is started in the background (``/health`` answers 503 meanwhile)
    and closed at cleanup; an engine that is already running is shared and left running.
    ``on_ready(state)`` is called once the engine is ready. A stream write that blocks for
    ``write_timeout_s`` (a client that stopped reading) cuts that client off. With
    ``models`` (several models, ``server/management/pool.py``) each request's engine comes from the
    pool and ``engine_config`` / ``engine`` are not used.
    """
    server_config = server_config or ServerConfig()
    state = ServerState(config=server_config, engine=engine, keepalive_s=keepalive_s,
                        max_buffered_chunks=max_buffered_chunks,
                        write_timeout_s=write_timeout_s, models=models)
    if models is None and engine_config is not None and engine_config.model != server_config.served_model_name:
        state.model_aliases.add(engine_config.model)
    app = web.Application(client_max_size=server_config.max_body_bytes,
                          middlewares=build_middlewares(server_config))
    app[STATE_KEY] = state
    app.add_routes(routes)
    app.on_response_prepare.append(response_headers(server_config.cors_origins))
    app.cleanup_ctx.append(_pool_lifetime(models, on_ready) if models is not None
                           else _engine_lifetime(engine_config, on_ready))
    return app


def _pool_lifetime(pool: ModelPool, on_ready: ReadyCallback | None):
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE_KEY]
        task = asyncio.create_task(_start_pool(state, pool, on_ready))
        yield
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await pool.close()

    return lifetime


async def _start_pool(state: ServerState, pool: ModelPool, on_ready: ReadyCallback | None) -> None:
    """Start the engine thread and load the pinned models; a failed pinned load fails the
    start like a single model's."""
    try:
        await pool.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.start_error = exc.__cause__ or exc
        state.start_failed.set()
        return
    if on_ready is not None:
        on_ready(state)


def _engine_lifetime(engine_config: EngineConfig | None, on_ready: ReadyCallback | None):
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE_KEY]
        owned = state.engine is None or not state.engine.is_ready
        task = asyncio.create_task(_start(state, engine_config, on_ready)) if owned else None
        if not owned and on_ready is not None:
            on_ready(state)
        yield
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if owned and state.engine is not None:
            await _close(state.engine)

    return lifetime


async def _start(state: ServerState, config: EngineConfig | None,
                 on_ready: ReadyCallback | None) -> None:
    try:
        if state.engine is None:
            from ..async_llm import AsyncLLM  # heavy (MLX): only when the app builds the engine

            state.engine = AsyncLLM(config=config or EngineConfig())
        await state.engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.start_error = exc
        state.start_failed.set()
        log.debug("the engine failed to start: %s", exc)  # the caller reports it to the user
        log.debug("engine start failure", exc_info=exc)
        return
    if state.engine.model_name and state.engine.model_name != state.model_name:
        state.model_aliases.add(state.engine.model_name)
    if on_ready is not None:
        on_ready(state)


async def _close(engine: AsyncLLMLike) -> None:
    try:
        await engine.close()
    except Exception:
        log.exception("error while closing the engine")
