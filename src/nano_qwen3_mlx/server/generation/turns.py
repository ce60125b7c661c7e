"""One assistant turn for the agent APIs (Anthropic Messages, OpenAI Responses).

Both APIs describe a turn the same way: optional reasoning, then text, then tool calls, and
why it stopped. :class:`TurnRun` drives the engine through the server's runner (with a cap
on reasoning tokens) and :class:`TurnParser` splits the engine's text into those parts,
incrementally, so each endpoint's formatter only formats them.

The reasoning cap (Anthropic ``thinking.budget_tokens``, Responses ``reasoning.effort``) is
``SamplingParams.thinking_budget``: the engine forces ``</think>`` once the budget is spent,
and the answer follows in the same request, within ``max_tokens``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ...outputs import GenerationResult, RequestOutput
from ...parsers import (
    THINK_OPEN,
    ReasoningStreamParser,
    prompt_opens_thinking,
    prompt_thinking,
)
from ...sampling_params import SamplingParams
from ...tool_xml import ToolFormat, tool_format
from ..errors import bad_request
from ..openai.constraints import with_tools_in_system
from .call import RUN_KEY, ApiCall, RunRecord
from .request import Choice, GenerationRequest
from .runner import Event, GenerationRun, RunResult, Usage


@dataclass(slots=True)
class TurnPrompt:
    """A rendered chat prompt: ids, whether thinking is on, whether it opened ``<think>``,
    and how it asked for tool calls."""

    token_ids: list[int]
    thinking: bool
    starts_in_reasoning: bool
    tools: ToolFormat = field(default_factory=ToolFormat)


class TurnRun:
    """A :class:`~.runner.GenerationRun` look-alike for one turn (``stream_run`` and
    ``collect`` drive it): one engine request, presented as one choice (index 0)."""

    def __init__(self, call: ApiCall, request: GenerationRequest, prompt: TurnPrompt,
                 think_budget: int | None = None) -> None:
        self.call, self.request, self.prompt = call, request, prompt
        max_tokens = request.choices(call.engine.max_model_len)[0].params.max_tokens
        budget = think_budget if prompt.thinking else None
        self.params = request.params.clone(max_tokens=max_tokens, thinking_budget=budget)
        limits = [t for t in (request.timeout, call.state.config.request_timeout) if t]
        self.timeout = min(limits) if limits else None
        self.deadline = time.monotonic() + self.timeout if self.timeout else None
        self.merged = GenerationResult(f"{request.response_id}-0")
        # The access log's record of the whole turn (``stream_run`` marks a client that left).
        self.record = RunRecord(self.params.summary())
        call.http[RUN_KEY] = self.record
        self.outputs: list[RequestOutput] = []  # every output of the turn, in order
        self._run: GenerationRun | None = None

    @classmethod
    def for_call(cls, call: ApiCall, prompt: TurnPrompt, params: SamplingParams, prefix: str,
                 think_budget: int | None = None,
                 fields: tuple[str, str] = ("messages", "max_tokens")) -> TurnRun:
        """The turn of an API call whose body has ``stream``, ``priority`` and ``timeout``;
        its response id is ``{prefix}_<hex>``; ``fields``: the API's names of the prompt and
        of max_tokens (what a context-length 400 names)."""
        body = call.body
        request = GenerationRequest(f"{prefix}_{uuid.uuid4().hex}", [prompt.token_ids], params,
                                    stream=body.stream, priority=body.priority,
                                    timeout=body.timeout, prompt_field=fields[0],
                                    max_tokens_field=fields[1])
        return cls(call, request, prompt, think_budget)

    async def __aenter__(self) -> TurnRun:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._run is not None:  # aborts the phase in flight, if any
            await self._run.__aexit__(*exc_info)

    def _phase(self, suffix: str, ids: list[int], params: Any) -> GenerationRun:
        left = None if self.deadline is None else max(self.deadline - time.monotonic(), 1e-3)
        request = replace(self.request, response_id=f"{self.request.response_id}-{suffix}",
                          prompts=[ids], params=params, n=1, timeout=left)
        self._run = GenerationRun(self.call, request, self.record)
        return self._run

    async def _events(self, run: GenerationRun) -> AsyncIterator[Event]:
        await run.__aenter__()
        async for event in run.events():
            yield event
        await run.__aexit__(None, None, None)
        self._run = None

    async def events(self) -> AsyncIterator[Event]:
        """``(0, output)`` per engine output of the turn; None on idle ticks."""
        run = self._phase("0", self.prompt.token_ids, self.params)
        async for event in self._events(run):
            yield self._add(event)

    def _add(self, event: Event) -> Event:
        if event is None:
            return None
        out = replace(event[1], request_id=self.merged.request_id)
        self.merged.add(out)
        self.outputs.append(out)
        return 0, out

    def result(self) -> RunResult:
        choice = Choice(0, 0, self.prompt.token_ids, self.params, self.merged.request_id)
        last = self.merged.last
        usage = Usage(len(self.prompt.token_ids), self.merged.num_completion_tokens,
                      last.num_cached_tokens if last else 0)
        return RunResult([choice], {0: self.merged}, usage)

    async def collect(self) -> RunResult:
        """Run to the end (non-streaming responses)."""
        async with self:
            async for _ in self.events():
                pass
        return self.result()


@dataclass(slots=True)
class Finish:
    """How a turn ended, in engine terms (each API maps it to its own stop reason)."""

    finish_reason: str | None  # "stop", "length", "abort"
    stop_reason: str | int | None  # the user stop string (or token id) that matched
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those reused from the prefix cache


def finish_of(result: RunResult, parser: TurnParser) -> Finish:
    """The :class:`Finish` of a finished turn."""
    last = result.results[0].last
    return Finish(last.finish_reason if last else None, last.stop_reason if last else None,
                  result.usage.prompt_tokens, result.usage.completion_tokens,
                  parser.reasoning_tokens, result.usage.cached_tokens)


class TurnParser:
    """Engine text of one turn -> ``("reasoning" | "text", delta)`` pieces, then tool calls.

    Content after the first ``<tool_call>`` is held until :meth:`finish` parses it.
    """

    def __init__(self, prompt: TurnPrompt, use_tools: bool) -> None:
        self.reasoning = ReasoningStreamParser(prompt.starts_in_reasoning,
                                               enabled=prompt.thinking)
        self.tools = prompt.tools.stream_parser() if use_tools else None
        self.reasoning_tokens = 0

    def feed(self, out: RequestOutput | str) -> list[tuple[str, str]]:
        """The reasoning/text pieces an engine output (or a whole text) adds."""
        text = out if isinstance(out, str) else out.text
        reasoning, content = self.reasoning.feed(text)
        if reasoning and not content and not isinstance(out, str):
            self.reasoning_tokens += len(out.token_ids)
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


def render_turn(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None, **template_kwargs: Any) -> list[int]:
    """Apply the chat template with a generation prompt (400 when it rejects the messages);
    tools go into the system message, as Qwen3 writes them, when the template has no place
    for them."""
    ids = _render(tokenizer, messages, tools, template_kwargs)
    if tools and ids == _render(tokenizer, messages, None, template_kwargs):
        ids = _render(tokenizer, with_tools_in_system(messages, tools), None, template_kwargs)
    return ids


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            template_kwargs: dict[str, Any]) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                            tokenize=True, **template_kwargs)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"the chat template rejected the messages: {str(exc)[:200]}",
                          "messages") from None
    return list(ids)


def turn_prompt(tokenizer: Any, ids: list[int], *, open_thinking: bool = False,
                tools: list[dict[str, Any]] | None = None) -> TurnPrompt:
    """A :class:`TurnPrompt` for a prompt rendered with ``tools``; ``open_thinking`` appends
    ``<think>\\n`` (unless the template opened it, as Qwen3.5's does) so the reply starts
    inside the thinking block (how a thinking turn is made to reason first)."""
    calls = tool_format(tokenizer, tools)
    if open_thinking:
        if not prompt_opens_thinking(tokenizer, ids):
            ids = ids + tokenizer.encode(f"{THINK_OPEN}\n", add_special_tokens=False)
        return TurnPrompt(ids, True, True, calls)
    return TurnPrompt(ids, *prompt_thinking(tokenizer, ids), calls)
