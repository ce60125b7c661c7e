"""The model-management side of the small endpoints with several models (``server/management/pool.py``):
model cards with ``loaded`` and memory, ``POST /v1/models/{id}/load`` and ``/unload``, and the
per-model ``/stats`` and ``/metrics`` readings."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..state import STATE_KEY, AsyncLLMLike, ServerState
from .pool import ModelPool, engine_memory

CAPABILITIES = ["chat", "completions", "messages", "responses", "embeddings"]


def engine_card(state: ServerState, model_id: str | None, engine: AsyncLLMLike) -> dict:
    """The OpenAI model object of a loaded engine."""
    return {"id": model_id, "object": "model", "created": state.created,
            "owned_by": "nano-qwen3-mlx", "max_model_len": engine.max_model_len,
            "parameters": engine.num_parameters,
            # What a request's left-out sampling fields (max_tokens included) become.
            "sampling_defaults": getattr(engine, "sampling_defaults", None),
            # Every served checkpoint also embeds (last-token pooling of the same body).
            "capabilities": CAPABILITIES}


def pool_card(state: ServerState, model_id: str) -> dict:
    """A configured model, loaded or not: ``loaded``, ``memory_bytes``, ``ttl_s``, ``pinned``."""
    pool = _pool(state)
    entry = pool.loaded.get(model_id)
    base = (engine_card(state, model_id, entry.engine) if entry is not None else
            {"id": model_id, "object": "model", "created": state.created,
             "owned_by": "nano-qwen3-mlx", "capabilities": CAPABILITIES})
    return base | pool.describe(model_id)


def _pool(state: ServerState) -> ModelPool:
    assert state.models is not None
    return state.models


async def load_model(request: web.Request) -> web.Response:
    """Load a model now (it stays until its TTL, the budget or ``/unload``)."""
    state = request.app[STATE_KEY]
    _ready(state)
    await _pool(state).load(request.match_info["model_id"])
    return web.json_response(pool_card(state, _pool(state).spec(request.match_info["model_id"]).id))


async def unload_model(request: web.Request) -> web.Response:
    """Unload a model (its running requests are aborted); 200 either way, ``unloaded`` says."""
    state = request.app[STATE_KEY]
    _ready(state)
    model_id = _pool(state).spec(request.match_info["model_id"]).id
    unloaded = await _pool(state).unload(model_id)
    return web.json_response(pool_card(state, model_id) | {"unloaded": unloaded})


def _ready(state: ServerState) -> None:
    error = state.not_ready()
    if error is not None:
        raise error
    if state.models is None:  # one model: nothing to load or unload
        raise web.HTTPNotFound(text="model management needs several models (--model A --model B)")


def pool_stats(state: ServerState, only: str | None) -> dict[str, Any]:
    """``/stats`` with several models: every model's stats, or the one ``?model=`` names."""
    pool = _pool(state)

    def one(model_id: str) -> dict[str, Any]:
        entry = pool.loaded.get(model_id)
        if entry is None:
            return {"model": model_id, "loaded": False}
        return {**entry.engine.get_stats(), "model": model_id, "loaded": True,
                "memory_bytes": engine_memory(entry.engine)}

    common = {"uptime_s": round(state.uptime_s, 3), "is_ready": state.is_ready}
    if only is not None:
        return one(pool.spec(only).id) | common
    return {"models": {m: one(m) for m in pool.specs},
            "memory": {"budget_bytes": pool.budget_bytes, "used_bytes": pool.memory_used()},
            "loads": dict(pool.load_counts), **common}


def update_pool_metrics(state: ServerState) -> None:
    pool = _pool(state)
    stats = {m: (e.engine.get_stats() if (e := pool.loaded.get(m)) else None) for m in pool.specs}
    memory = {m: engine_memory(e.engine) for m, e in pool.loaded.items()}
    state.metrics.update_models(stats, memory)


__all__ = ["engine_card", "load_model", "pool_card", "pool_stats",
           "unload_model", "update_pool_metrics"]
