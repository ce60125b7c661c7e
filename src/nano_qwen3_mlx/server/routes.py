"""The route table and the small endpoints (models, health, stats, metrics, OpenAPI)."""

from __future__ import annotations

from aiohttp import web

from ..errors import EngineDeadError, ModelLoadingError, ShuttingDownError
from .anthropic.messages import count_tokens, messages
from .management.routes import (
    engine_card,
    load_model,
    pool_card,
    pool_stats,
    unload_model,
    update_pool_metrics,
)
from .metrics import CONTENT_TYPE
from .openai.chat import chat_completions
from .openai.completions import completions
from .openai.embeddings import embeddings
from .openai.responses import responses
from .openapi import build_openapi
from .page import chat_page
from .state import STATE_KEY, ServerState

routes = web.RouteTableDef()
routes.post("/v1/chat/completions")(chat_completions)
routes.post("/v1/completions")(completions)
routes.post("/v1/messages")(messages)
routes.post("/v1/messages/count_tokens")(count_tokens)
routes.post("/v1/responses")(responses)
routes.post("/v1/embeddings")(embeddings)


routes.post("/v1/models/{model_id:.+}/load")(load_model)
routes.post("/v1/models/{model_id:.+}/unload")(unload_model)


def _model_card(state: ServerState) -> dict:
    return engine_card(state, state.model_name, state.ready_engine())


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """The served models (OpenAI ``list`` shape); with several, each says if it is loaded."""
    state = request.app[STATE_KEY]
    if state.models is not None:
        cards = [pool_card(state, model_id) for model_id in state.models.specs]
        return web.json_response({"object": "list", "data": cards})
    return web.json_response({"object": "list", "data": [_model_card(state)]})


@routes.get("/v1/models/{model_id:.+}")
async def get_model(request: web.Request) -> web.Response:
    """One model by id; 404 for anything this server does not serve."""
    state = request.app[STATE_KEY]
    if state.models is not None:
        return web.json_response(pool_card(state, state.models.spec(request.match_info["model_id"]).id))
    card = _model_card(state)
    state.check_model(request.match_info["model_id"])
    return web.json_response(card)


routes.get("/")(chat_page)


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 when ready; 503 while loading, after the engine died or while shutting down."""
    state = request.app[STATE_KEY]
    body = {"status": "ok", "model": state.model_name, "uptime_s": round(state.uptime_s, 3)}
    error = state.not_ready()
    if isinstance(error, EngineDeadError):
        # The exception class only (the message of a dead engine): messages may carry paths.
        body.update(status="error", error=error.message)
    elif error is not None:
        body["status"] = "shutting_down" if isinstance(error, ShuttingDownError) else "loading"
    if error is None:
        return web.json_response(body)
    return web.json_response(body, status=error.status, headers=error.headers)


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    """Engine statistics (``AsyncLLM.get_stats()``) plus server uptime."""
    state = request.app[STATE_KEY]
    if state.models is not None:
        return web.json_response(pool_stats(state, request.query.get("model") or None))
    engine = state.engine
    if engine is None:
        raise ModelLoadingError()
    # The server's uptime last: the engine's snapshot has its own (frozen while idle).
    body = {**engine.get_stats(), "model": state.model_name,
            "uptime_s": round(state.uptime_s, 3), "is_ready": state.is_ready}
    return web.json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    state = request.app[STATE_KEY]
    if state.models is not None:
        update_pool_metrics(state)
    elif state.is_ready:
        state.metrics.update_engine(state.engine.get_stats())
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document generated from the request/response models."""
    state = request.app[STATE_KEY]
    return web.json_response(build_openapi(with_auth=bool(state.config.api_key)))
