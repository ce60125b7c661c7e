"""``/openapi.json``: the OpenAPI 3.1 document, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from .anthropic.protocol import (
    AnthropicError,
    AnthropicStreamEvent,
    CountTokensRequest,
    CountTokensResponse,
    MessageResponse,
    MessagesRequest,
)
from .openai.embeddings import EmbeddingRequest, EmbeddingResponse
from .openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from .openai.responses_protocol import ResponseObject, ResponsesRequest, ResponsesStreamEvent

_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest, CompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
    CompletionResponse, ModelList, ModelCard, HealthResponse, ErrorResponse,
    MessagesRequest, MessageResponse, AnthropicStreamEvent, AnthropicError, CountTokensRequest,
    CountTokensResponse, ResponsesRequest, ResponseObject, ResponsesStreamEvent,
    EmbeddingRequest, EmbeddingResponse,
]
_ALL_ERRORS = ("400", "401", "404", "408", "413", "429", "503")
_ERRORS = {
    "400": "Invalid request", "401": "Missing or wrong API key", "404": "Unknown model",
    "408": "Request timed out", "413": "Body too large", "429": "Queue full (see Retry-After)",
    "503": "Model loading or engine not running",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _errors(*codes: str, error: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": _json(error)} for c in codes}


def _sse_event(chunk: type[BaseModel], error: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    """One SSE event (OpenAPI 3.1: the schema of ``text/event-stream`` describes each event):
    its data is a JSON chunk, an error object after the stream began, or the final [DONE]
    (OpenAI chat/completions only: the named-event APIs end without it)."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(chunk), _ref(error)]}}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]},
                       "event": {"type": "string"}, "id": {"type": "string"},
                       "retry": {"type": "integer"}},
    }


def _generate(request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel],
              summary: str, error: type[BaseModel] = ErrorResponse) -> dict:
    ok = {**_json(response), "text/event-stream": {"schema": _sse_event(chunk, error)}}
    return _post(request, summary, "Completion (JSON, or SSE when stream=true)", ok, error)


def _post(request: type[BaseModel], summary: str, description: str, ok: dict[str, Any],
          error: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {"200": {"description": description, "content": ok},
                          **_errors(*_ALL_ERRORS, error=error)},
        }
    }


def _get(summary: str, content: dict[str, Any], *errors: str) -> dict[str, Any]:
    return {"get": {"summary": summary,
                    "responses": {"200": {"description": "OK", "content": content},
                                  **_errors(*errors)}}}


def build_openapi(with_auth: bool) -> dict[str, Any]:
    """The OpenAPI document; ``with_auth`` adds the bearer scheme used by ``--api-key``."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    model_param = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    models_one = _get("One model", _json(ModelCard), "401", "404")
    models_one["get"]["parameters"] = [model_param]
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "nano-qwen3-mlx", "version": __version__},
        "paths": {
            "/v1/chat/completions": _generate(ChatCompletionRequest, ChatCompletionResponse,
                                              ChatCompletionChunk, "Chat completion"),
            "/v1/completions": _generate(CompletionRequest, CompletionResponse,
                                         CompletionResponse, "Text completion"),
            "/v1/messages": _generate(MessagesRequest, MessageResponse, AnthropicStreamEvent,
                                      "Anthropic Messages", AnthropicError),
            "/v1/messages/count_tokens": _post(CountTokensRequest, "Anthropic token count",
                                               "Prompt tokens", _json(CountTokensResponse),
                                               AnthropicError),
            "/v1/responses": _generate(ResponsesRequest, ResponseObject, ResponsesStreamEvent,
                                       "OpenAI Responses (stateless)"),
            "/v1/embeddings": _post(EmbeddingRequest, "Embeddings (last-token pooled)",
                                    "Embeddings", _json(EmbeddingResponse)),
            "/v1/models": _get("Served models", _json(ModelList), "401"),
            "/v1/models/{model_id}": models_one,
            "/health": _get("Liveness and readiness", _json(HealthResponse), "503"),
            "/stats": _get("Engine statistics", {"application/json": {"schema": {"type": "object"}}},
                           "401", "503"),
            "/metrics": _get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}),
        },
        "components": {"schemas": defs.get("$defs", {})},
    }
    if with_auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},  # Anthropic's
        }
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc
