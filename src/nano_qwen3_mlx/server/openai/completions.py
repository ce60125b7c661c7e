"""``POST /v1/completions``: raw prompts (strings or token ids), ``n`` choices per prompt."""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from ...errors import NanoQwen3Error
from ...outputs import GenerationResult, RequestOutput
from ..errors import bad_request
from ..generation.call import open_call
from ..generation.formatter import Formatter, Payload, error_chunk
from ..generation.params import new_id, openai_request, vocab_size
from ..generation.request import GenerationRequest
from ..generation.runner import RunResult, serve
from ..state import AsyncLLMLike
from .constraints import check, request_constraint
from .logprobs import completion_logprobs
from .protocol import CompletionRequest
from .thinking import budget_fields

log = logging.getLogger("nano_qwen3_mlx.server")


def _prompts(req: CompletionRequest, engine: AsyncLLMLike) -> list[tuple[str, list[int]]]:
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
    call = await open_call(request, CompletionRequest)
    req = call.body
    prompts = _prompts(req, call.engine)
    if call.state.config.log_prompts:
        log.info("completion prompts: %r", [text for text, _ in prompts])
    constraint, field = request_constraint(req)
    check(constraint, field)
    constraint = {**constraint, **budget_fields(call, req.thinking_budget, req.max_tokens)}
    gen = openai_request(req, call.engine, [ids for _, ids in prompts],
                         req.max_tokens or 16,  # OpenAI's documented default for completions
                         req.logprobs, new_id("cmpl"), constraint, prompt_field="prompt")
    head = {"id": gen.response_id, "object": "text_completion", "created": int(time.time()),
            "model": call.model}
    echoes = [text if req.echo else "" for text, _ in prompts]
    return await serve(call, gen, CompletionFormatter(head, gen, echoes))


class CompletionFormatter(Formatter):
    """``text_completion`` bodies and events; ``echo`` puts the prompt text first."""

    def __init__(self, head: dict[str, Any], gen: GenerationRequest, echoes: list[str]) -> None:
        self.head = head
        self.wants_logprobs = gen.params.logprobs is not None
        self.include_usage = gen.include_usage
        # Choice index -> its prompt's echo (choice p * n + i belongs to prompt p).
        self.echoes = {p * gen.n + i: text for p, text in enumerate(echoes) for i in range(gen.n)}
        self.offsets = {index: len(text) for index, text in self.echoes.items()}
        self.finished: set[int] = set()  # choices whose stream sent its finish_reason

    def response(self, result: RunResult) -> dict[str, Any]:
        choices = [self._choice(index, r) for index, r in sorted(result.results.items())]
        return {**self.head, "choices": choices, "usage": result.usage.as_openai(),
                "system_fingerprint": None}

    def _choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        echo = self.echoes[index]
        lp = None
        if self.wants_logprobs:
            lp = completion_logprobs(result.logprobs or [], len(echo))
        return {"index": index, "text": echo + result.text, "logprobs": lp,
                "finish_reason": result.finish_reason}

    def _chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> Payload:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return {**self.head, "choices": [choice], **extra}

    def stream_start(self) -> list[Payload]:
        return [self._chunk(i, text, None, None) for i, text in self.echoes.items() if text]

    def stream_output(self, index: int, out: RequestOutput) -> list[Payload]:
        lp = None
        if self.wants_logprobs:
            lp = completion_logprobs(out.logprobs or [], self.offsets[index])
        self.offsets[index] += len(out.text)
        finish = out.finish_reason if out.finished else None
        if out.finished:
            self.finished.add(index)
        if not out.text and finish is None and lp is None:
            return []
        return [self._chunk(index, out.text, lp, finish)]

    def stream_end(self, result: RunResult) -> list[Payload]:
        if not self.include_usage:
            return []
        return [{**self.head, "choices": [], "usage": result.usage.as_openai()}]

    def stream_error(self, err: NanoQwen3Error) -> list[Payload]:
        ends = [{"index": i, "text": "", "logprobs": None, "finish_reason": "abort"}
                for i in self.echoes if i not in self.finished]
        extra = {"usage": None} if self.include_usage else {}
        return [error_chunk({**self.head, "choices": ends, **extra}, err)]
