"""A scripted stand-in for ``AsyncLLM`` (same contract) for fast server unit tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from nano_qwen3_mlx.errors import QueueFullError
from nano_qwen3_mlx.outputs import RequestOutput
from nano_qwen3_mlx.sampling_params import SamplingParams

Reply = Callable[[Any, SamplingParams], "str | BaseException"]


class FakeEngine:
    """Replies with scripted text, one chunk per token, honouring max_tokens, stop, logprobs."""

    def __init__(self, tokenizer: Any, reply: Reply | None = None, *, max_model_len: int = 512,
                 max_queue_size: int = 64, token_delay: float = 0.0,
                 first_token_delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.reply = reply or (lambda prompt, params: "Hello there, friend.")
        self.model_name = "fake-qwen3"
        self.max_model_len = max_model_len
        self.num_parameters = {"total": 1000, "active": 1000}
        self.max_queue_size = max_queue_size
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.is_ready = True
        self.error: BaseException | None = None
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.closed = False

    async def start(self) -> None:
        self.is_ready = True

    async def close(self) -> None:
        self.closed = True

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.aborted.append(request_id)

    def get_stats(self) -> dict[str, Any]:
        return {"requests": {"waiting": 0, "running": len(self.active), "finished": 0,
                             "aborted": len(self.aborted)},
                "kv_cache": {"num_blocks": 64, "num_used_blocks": len(self.active),
                             "num_free_blocks": 64 - len(self.active)}}

    async def generate_outputs(self, prompt: Any, params: SamplingParams, *, priority: int = 0,
                               request_id: str | None = None):
        if len(self.active) >= self.max_queue_size:
            raise QueueFullError("queue full")
        request_id = request_id or uuid.uuid4().hex
        self.calls.append({"prompt": prompt, "params": params, "priority": priority,
                           "request_id": request_id})
        reply = self.reply(prompt, params)
        if isinstance(reply, BaseException):
            raise reply
        self.active.add(request_id)
        finished = False
        try:
            async for chunk in self._chunks(request_id, prompt, params, reply):
                finished = chunk.finished
                yield chunk
        finally:
            self.active.discard(request_id)
            if not finished and request_id not in self.aborted:
                self.aborted.append(request_id)

    async def _chunks(self, request_id: str, prompt: Any, params: SamplingParams, reply: str):
        ids = self.tokenizer.encode(reply, add_special_tokens=False)
        num_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer.encode(prompt))
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        text = ""
        for k, token_id in enumerate(ids):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            piece = self.tokenizer.decode(ids[: k + 1])[len(text):]
            text += piece
            reason = None
            hit = next((s for s in params.stop_sequences if s in text), None)
            if hit is not None:
                piece = piece[: max(0, len(piece) - (len(text) - text.index(hit)))]
                reason = "stop"
            elif k + 1 >= (params.max_tokens or 10**9):
                reason = "length"
            elif k == len(ids) - 1:
                reason = "stop"
            out = self._chunk(request_id, piece, token_id, reason, num_prompt, k + 1, params)
            out.stop_reason = hit  # the stop string that matched, as the engine reports it
            yield out
            if reason is not None:
                return

    def _chunk(self, request_id: str, piece: str, token_id: int, reason: str | None,
               num_prompt: int, num_done: int, params: SamplingParams) -> RequestOutput:
        logprobs = None
        if params.logprobs is not None:
            top = [{"token_id": token_id, "token": piece, "logprob": -0.25}] * params.logprobs
            logprobs = [{"token_id": token_id, "token": piece, "logprob": -0.25,
                         "top_logprobs": top}]
        return RequestOutput(request_id, piece, [token_id], reason is not None, reason,
                             num_prompt, num_done, logprobs)
