"""``POST /v1/completions``: raw prompts (strings or token ids), ``n`` choices per prompt."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from .errors import bad_request
from .generation import GenerationRun, collect, merge_usage
from .logprobs import completion_logprobs
from .params import generations, new_id, parse_body, vocab_size
from .protocol import CompletionRequest
from .state import STATE_KEY, Engine
from .streaming import stream_run

log = logging.getLogger("nano_qwen3_mlx.server")


def _prompts(req: CompletionRequest, engine: Engine) -> list[tuple[str, list[int]]]:
    """``(text, token_ids)`` per prompt; 400 for empty prompts or unknown token ids."""
    raw = req.prompt
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    tokenizer = engine.tokenizer
    vocab = vocab_size(engine)
    out = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        if not isinstance(item, str) and vocab and not all(0 <= i < vocab for i in ids):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        out.append((item if isinstance(item, str) else tokenizer.decode(ids), ids))
    return out


async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI text completions, streaming or not."""
    state = request.app[STATE_KEY]
    req = await parse_body(request, CompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    prompts = _prompts(req, engine)
    if state.config.log_prompts:
        log.info("completion prompts: %r", [text for text, _ in prompts])
    rid = new_id("cmpl")
    gens = generations(req, engine, [ids for _, ids in prompts], req.max_tokens or 16,
                       req.logprobs, rid)
    run = GenerationRun(request, gens, priority=req.priority, timeout=req.timeout)
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    echoes = {g.index: prompts[g.index // req.n][0] if req.echo else "" for g in gens}
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(request, run, head, echoes, prompt_tokens, include_usage)
    return await _complete(run, head, echoes, prompt_tokens)


async def _complete(run: GenerationRun, head: dict[str, Any], echoes: dict[int, str],
                    prompt_tokens: int) -> web.Response:
    out = await collect(run)
    wants_lp = {g.index: g.params.logprobs is not None for g in run.gens}
    choices = [
        {
            "index": index,
            "text": echoes[index] + out.texts[index],
            "logprobs": completion_logprobs(out.logprobs[index], len(echoes[index]))
            if wants_lp[index] else None,
            "finish_reason": out.finals[index].get("finish_reason"),
        }
        for index in sorted(out.finals)
    ]
    usage = merge_usage(prompt_tokens, out.finals)
    return web.json_response({**head, "choices": choices, "usage": usage,
                              "system_fingerprint": None})


async def _stream(request: web.Request, run: GenerationRun, head: dict[str, Any],
                  echoes: dict[int, str], prompt_tokens: int,
                  include_usage: bool) -> web.StreamResponse:
    extra = {"usage": None} if include_usage else {}
    wants_lp = {g.index: g.params.logprobs is not None for g in run.gens}
    offsets = {index: len(text) for index, text in echoes.items()}
    finals: dict[int, dict[str, Any]] = {}

    def on_start() -> list[dict[str, Any]]:
        return [_chunk(head, i, text, None, None, extra) for i, text in echoes.items() if text]

    def on_chunk(index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        text = chunk.get("text", "")
        lp = None
        if wants_lp[index]:
            lp = completion_logprobs(chunk.get("logprobs") or [], offsets[index])
        offsets[index] += len(text)
        finish = chunk.get("finish_reason") if chunk.get("finished") else None
        if chunk.get("finished"):
            finals[index] = chunk
        if not text and finish is None and lp is None:
            return []
        return [_chunk(head, index, text, lp, finish, extra)]

    def on_end() -> list[dict[str, Any]]:
        usage = merge_usage(prompt_tokens, finals)
        return [{**head, "choices": [], "usage": usage}] if include_usage else []

    return await stream_run(request, run, on_start, on_chunk, on_end)


def _chunk(head: dict[str, Any], index: int, text: str, logprobs: Any, finish: str | None,
           extra: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {**head, "choices": [choice], **extra}
