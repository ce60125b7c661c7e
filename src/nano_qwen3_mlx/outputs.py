"""What generation hands back: ``RequestOutput`` per step, ``GenerationResult`` per request.

Both are typed; the Python API's documented dicts (stream chunks, result dicts with
``generated_text``) are views of them (``as_chunk()``, ``as_dict()``). This module imports
nothing heavy, so the server can use the types without loading MLX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# One generated token's log-probability: {"token_id", "token", "logprob", "top_logprobs"}.
TokenLogprob = dict[str, Any]


@dataclass(slots=True)
class Usage:
    """Token counts of a request (or of all choices of an API request)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        """OpenAI-style usage."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}

    def as_openai(self) -> dict[str, Any]:
        """The ``usage`` of OpenAI chat and completions responses, cached tokens included."""
        return {**self.as_dict(), "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(slots=True)
class RequestOutput:
    """The news about one request after a step: the new text/tokens, and whether it ended."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    prompt_token_ids: list[int] | None = None  # on the final output only
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    embedding: list[float] | None = None  # pooling requests: the L2-normalised vector
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def usage(self) -> dict[str, int]:
        return Usage(self.num_prompt_tokens, self.num_completion_tokens).as_dict()

    def as_chunk(self) -> dict[str, Any]:
        """The stream chunk dict of the Python API."""
        return {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "logprobs": self.logprobs,
            "usage": self.usage,
            "prompt_tokens": self.num_prompt_tokens,
            "error": self.error,
            "stop_reason": self.stop_reason,
        }


@dataclass(slots=True)
class GenerationResult:
    """One request from start to end: every ``RequestOutput`` of it, added in order."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    last: RequestOutput | None = None
    _pieces: list[str] = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        self._pieces.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        self.last = out

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    @property
    def finish_reason(self) -> str | None:
        return None if self.last is None else self.last.finish_reason

    @property
    def num_completion_tokens(self) -> int:
        return 0 if self.last is None else self.last.num_completion_tokens

    def as_dict(self) -> dict[str, Any]:
        """The result dict of the Python API (``generated_text``, ``usage``, ...)."""
        out = self.last
        return {
            "request_id": self.request_id,
            "generated_text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": out.usage if out else {},
            "logprobs": self.logprobs,
            "prompt_token_ids": out.prompt_token_ids if out else None,
            "error": out.error if out else None,
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
