"""Shaping engine outputs into the result and chunk dicts of the public API."""

from __future__ import annotations

from typing import Any

from .engine.llm_engine import RequestOutput


class ResultBuilder:
    """Accumulates one request's ``RequestOutput``s into the final result dict."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[str, Any]] | None = None
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.pieces.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.last = out

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def result(self) -> dict[str, Any]:
        out = self.last
        return {
            "request_id": self.request_id,
            "generated_text": "".join(self.pieces),
            "token_ids": list(self.token_ids),
            "finish_reason": out.finish_reason if out else None,
            "usage": out.usage if out else {},
            "logprobs": self.logprobs,
            "prompt_token_ids": out.prompt_token_ids if out else None,
            "error": out.error if out else None,
        }


def chunk_dict(out: RequestOutput) -> dict[str, Any]:
    """A stream chunk: the new piece of text and ids, plus whether the request ended."""
    return {
        "request_id": out.request_id,
        "text": out.text,
        "token_ids": list(out.token_ids),
        "finished": out.finished,
        "finish_reason": out.finish_reason,
        "logprobs": out.logprobs,
        "usage": out.usage,
        "prompt_tokens": out.num_prompt_tokens,
        "error": out.error,
        "stop_reason": out.stop_reason,
    }


def add_reasoning(result: dict[str, Any], tokenizer: Any, prompt_ids: list[int]) -> dict[str, Any]:
    """Chat results: split Qwen3 ``<think>`` text into ``reasoning_content``."""
    from .parsers import prompt_thinking, split_reasoning

    thinking, starts_in_reasoning = prompt_thinking(tokenizer, prompt_ids)
    text = result["generated_text"]
    reasoning, content = split_reasoning(text, starts_in_reasoning) if thinking else (None, text)
    result["reasoning_content"] = reasoning
    result["content"] = content
    result["generated_text"] = content
    return result
