"""``POST /v1/embeddings`` (OpenAI): last-token pooled, L2-normalised vectors.

Every input is one prefill-only engine request (same scheduler, KV pool and priorities as
generation; its blocks are freed as soon as it is pooled, full prompt blocks stay in the
prefix cache). See :mod:`nano_qwen3_mlx.embeddings` for the pooling and Qwen3-Embedding's
instruction convention.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, ValidationError, field_validator

from ...embeddings import embedding_ids, to_base64, truncate
from ...errors import RequestTimeoutError
from ..errors import bad_request, to_api_error
from ..generation.call import open_call
from ..generation.params import new_id, vocab_size
from ..state import AsyncLLMLike
from .protocol import _Request, _Response

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
# Inputs of one request in the engine at a time: enough to fill its batches, and a long
# list does not fill the request queue itself (which would answer it 429).
MAX_IN_FLIGHT = 64

TokenIds = Annotated[list[int], Field(min_length=1)]


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    input: (Annotated[str, Field(min_length=1)]
            | Annotated[list[Annotated[str, Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_INPUTS)]
            | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)])
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Extensions shared with the other endpoints: lower runs first; seconds before giving up.
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    timeout: float | None = Field(None, gt=0)

    @field_validator("input", mode="wrap")
    @classmethod
    def _one_clear_error(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"input must be a non-empty string, a list of non-empty strings, "
                             f"a list of token ids or a list of token-id lists (at most "
                             f"{MAX_INPUTS} inputs)") from None


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def prompts(req: EmbeddingRequest, engine: AsyncLLMLike) -> list[list[int]]:
    """Each input as token ids (400 for ids outside the vocabulary or over the context)."""
    raw = req.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    vocab = vocab_size(engine)
    out = []
    for i, item in enumerate(raw):
        ids = embedding_ids(engine.tokenizer, item) if isinstance(item, str) else item
        if not all(0 <= t < (vocab or 2**31) for t in ids):
            raise bad_request(f"input[{i}]: token ids must be in [0, {vocab})", "input")
        if len(ids) >= engine.max_model_len:
            raise bad_request(f"input[{i}] has {len(ids)} tokens; this model embeds at most "
                              f"{engine.max_model_len - 1}", "input")
        out.append(ids)
    return out


async def embeddings(request: web.Request) -> web.Response:
    """Embed each input; all of them run in the engine's batches together."""
    call = await open_call(request, EmbeddingRequest)
    req, engine, state = call.body, call.engine, call.state
    ids = prompts(req, engine)
    timeout = min((t for t in (req.timeout, state.config.request_timeout) if t), default=None)
    rid = new_id("embd")
    try:
        results = await asyncio.wait_for(
            state.drain.until_halt(_embed_all(engine, ids, rid, req.priority)), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request timed out after {timeout:g} s") from None
    data = [{"object": "embedding", "index": i,
             "embedding": _encode(truncate(r["embedding"], req.dimensions), req.encoding_format)}
            for i, r in enumerate(results)]
    tokens = sum(r["prompt_tokens"] for r in results)
    state.metrics.prompt_tokens.inc(tokens)
    return web.json_response({"object": "list", "data": data, "model": call.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _embed_all(engine: AsyncLLMLike, ids: list[list[int]], rid: str,
                     priority: int) -> list[dict[str, Any]]:
    """Every input (up to MAX_IN_FLIGHT at once); one failure (or the client leaving)
    cancels and aborts the rest."""
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def embed(i: int, prompt: list[int]) -> dict[str, Any]:
        async with slots:
            return await engine.embed(prompt, priority=priority, request_id=f"{rid}-{i}")

    tasks = [asyncio.ensure_future(embed(i, p)) for i, p in enumerate(ids)]
    try:
        return list(await asyncio.gather(*tasks))
    except (ValueError, RuntimeError) as exc:
        raise to_api_error(exc, engine_dead=engine.error is not None) from None
    finally:  # a failure or a cancellation (client gone, timeout): abort the others
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    return to_base64(vector) if encoding_format == "base64" else vector
