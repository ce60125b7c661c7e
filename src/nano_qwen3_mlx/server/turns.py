"""One assistant turn for the agent APIs (Anthropic Messages, OpenAI Responses).

Both APIs describe a turn the same way: optional reasoning, then text, then tool calls, and
why it stopped. :func:`run_turn` drives the engine (with a cap on reasoning tokens) and
:class:`TurnParser` splits the engine's text into those parts, incrementally, so each
endpoint only formats them.

The reasoning cap (Anthropic ``thinking.budget_tokens``) is budget forcing: the turn first
runs with at most ``budget`` tokens and ``</think>`` as a stop string; if the model is still
thinking then, ``\\n</think>\\n\\n`` is appended and a second engine request continues from
prompt + reasoning (the prefix cache makes its prefill nearly free). Both requests go
through the same scheduler, KV pool, priority, deadline and abort-on-disconnect.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..parsers import (
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningStreamParser,
    ToolCallStreamParser,
    prompt_thinking,
)
from ..sampling_params import SamplingParams
from .errors import bad_request
from .generation import Event, Generation, GenerationRun
from .state import STATE_KEY

# Text appended when the reasoning budget runs out while the model is still thinking.
FORCED_CLOSE = f"\n{THINK_CLOSE}\n\n"


@dataclass(slots=True)
class TurnPrompt:
    """A rendered chat prompt: ids, whether thinking is on, whether it opened ``<think>``."""

    token_ids: list[int]
    thinking: bool
    starts_in_reasoning: bool


@dataclass(slots=True)
class Finish:
    """How a turn ended, in engine terms (each API maps it to its own stop reason)."""

    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None  # the user stop string (or token id) that matched
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0


async def run_turn(request: web.Request, prompt: TurnPrompt, params: SamplingParams, rid: str,
                   *, priority: int = 0, timeout: float | None = None,
                   think_budget: int | None = None) -> AsyncIterator[Event]:
    """Engine chunks of one turn (``(0, chunk)``, or None on idle ticks); the last chunk is
    ``finished`` and its ``usage`` covers the whole turn. Leaving early aborts the request."""
    capped = think_budget is not None and prompt.thinking and think_budget < params.max_tokens
    deadline = time.monotonic() + timeout if timeout else None
    if not capped:
        events = _one_run(request, prompt.token_ids, params, rid, priority, deadline)
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
        return
    first = params.clone(max_tokens=think_budget,
                        stop_sequences=[*params.stop_sequences, THINK_CLOSE])
    phase = _Phase()
    events = _one_run(request, prompt.token_ids, first, f"{rid}-think", priority, deadline)
    async with contextlib.aclosing(events):
        async for event in events:
            phase.see(event)
            if event is not None and event[1].get("finished"):
                if not phase.continues(event[1]):
                    yield event  # ended while thinking (EOS, a user stop string, an abort)
                    return
                event = 0, {**event[1], "finished": False, "finish_reason": None}
            yield event
    events = _second_phase(request, prompt, params, rid, priority, deadline, phase)
    async with contextlib.aclosing(events):
        async for event in events:
            yield event


@dataclass(slots=True)
class _Phase:
    """What the reasoning phase produced: its token ids and how it ended."""

    token_ids: list[int] = field(default_factory=list)
    closed: bool = False  # the model wrote </think> itself

    def see(self, event: Event) -> None:
        if event is not None:
            self.token_ids += event[1].get("token_ids") or []

    def continues(self, last: dict[str, Any]) -> bool:
        """Whether an answer phase follows (the model stopped thinking, or ran out of budget)."""
        self.closed = last.get("stop_reason") == THINK_CLOSE
        return self.closed or last.get("finish_reason") == "length"


async def _second_phase(request: web.Request, prompt: TurnPrompt, params: SamplingParams,
                        rid: str, priority: int, deadline: float | None,
                        phase: _Phase) -> AsyncIterator[Event]:
    tokenizer = request.app[STATE_KEY].ready_engine().tokenizer
    forced_text = THINK_CLOSE if phase.closed else FORCED_CLOSE
    forced = [] if phase.closed else tokenizer.encode(FORCED_CLOSE, add_special_tokens=False)
    # A natural close left </think> in the ids already (the stop string only hides the text).
    spent = len(phase.token_ids) + len(forced)
    yield 0, {"text": forced_text, "token_ids": forced, "finished": False}
    room = params.max_tokens - spent
    usage = {"prompt_tokens": len(prompt.token_ids)}
    if room < 1:
        yield 0, _final("length", None, usage, spent)
        return
    ids = prompt.token_ids + phase.token_ids + forced
    events = _one_run(request, ids, params.clone(max_tokens=room), f"{rid}-answer", priority,
                      deadline)
    async with contextlib.aclosing(events):
        async for event in events:
            if event is not None and event[1].get("finished"):
                last = event[1]
                done = last.get("usage", {}).get("completion_tokens", 0)
                event = 0, {**last, **_final(last.get("finish_reason"), last.get("stop_reason"),
                                             usage, spent + done), "text": last.get("text", "")}
            yield event


def _final(finish: str | None, stop: Any, usage: dict[str, int], completion: int) -> dict:
    prompt_tokens = usage["prompt_tokens"]
    return {"text": "", "token_ids": [], "finished": True, "finish_reason": finish,
            "stop_reason": stop,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


async def _one_run(request: web.Request, ids: list[int], params: SamplingParams, rid: str,
                   priority: int, deadline: float | None) -> AsyncIterator[Event]:
    left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
    run = GenerationRun(request, [Generation(0, ids, params, rid)], priority=priority,
                        timeout=left)
    async with run:
        async for event in run.events():
            yield event


class TurnParser:
    """Engine text of one turn -> ``("reasoning" | "text", delta)`` pieces, then tool calls.

    Content after the first ``<tool_call>`` is held until :meth:`finish` parses it.
    """

    def __init__(self, prompt: TurnPrompt, use_tools: bool) -> None:
        self.reasoning = ReasoningStreamParser(prompt.starts_in_reasoning,
                                               enabled=prompt.thinking)
        self.tools = ToolCallStreamParser() if use_tools else None
        self.reasoning_tokens = 0

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, str]]:
        """The reasoning/text pieces a chunk adds (empty pieces dropped)."""
        reasoning, content = self.reasoning.feed(chunk.get("text", ""))
        if reasoning and not content:
            self.reasoning_tokens += len(chunk.get("token_ids") or [])
        if self.tools is not None:
            content = self.tools.feed(content)
        return _pieces(reasoning, content)

    def finish(self) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """End of the turn: the held-back pieces and the parsed tool calls (OpenAI shape)."""
        reasoning, content = self.reasoning.flush()
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content = self.tools.feed(content)
            rest, calls = self.tools.flush()
            content += rest
        return _pieces(reasoning, content), calls


def _pieces(reasoning: str, content: str) -> list[tuple[str, str]]:
    return [(kind, text) for kind, text in (("reasoning", reasoning), ("text", content)) if text]


def finish_of(last: dict[str, Any], parser: TurnParser) -> Finish:
    """The :class:`Finish` of a turn from its last engine chunk."""
    usage = last.get("usage") or {}
    return Finish(last.get("finish_reason"), last.get("stop_reason"),
                  usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                  parser.reasoning_tokens)


def render_turn(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None, **template_kwargs: Any) -> list[int]:
    """Apply the chat template with a generation prompt (400 when it rejects the messages)."""
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                            tokenize=True, **template_kwargs)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"the chat template rejected the messages: {str(exc)[:200]}",
                          "messages") from None
    return list(ids)


def turn_prompt(tokenizer: Any, ids: list[int], *, open_thinking: bool = False) -> TurnPrompt:
    """A :class:`TurnPrompt`; ``open_thinking`` appends ``<think>\\n`` so the reply starts
    inside the thinking block (how a thinking turn is made to reason first)."""
    if open_thinking:
        ids = ids + tokenizer.encode(f"{THINK_OPEN}\n", add_special_tokens=False)
        return TurnPrompt(ids, True, True)
    return TurnPrompt(ids, *prompt_thinking(tokenizer, ids))
