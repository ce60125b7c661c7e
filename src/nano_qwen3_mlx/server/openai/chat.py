"""``POST /v1/chat/completions``: chat template, reasoning split, tool calls, streaming."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ...errors import NanoQwen3Error
from ...outputs import GenerationResult, RequestOutput
from ...parsers import ReasoningStreamParser, prompt_thinking, split_reasoning
from ...tool_xml import ToolFormat, tool_format
from ..errors import bad_request
from ..generation.call import open_call
from ..generation.formatter import Formatter, Payload, error_chunk
from ..generation.params import new_id, openai_request
from ..generation.request import GenerationRequest
from ..generation.runner import RunResult, serve
from .constraints import allows_several_calls, chat_constraint, tool_specs, with_tools_in_system
from .logprobs import chat_logprobs
from .protocol import ChatCompletionRequest, ChatMessage
from .thinking import budget_fields

log = logging.getLogger("nano_qwen3_mlx.server")

# Template arguments a client must not override through chat_template_kwargs.
_RESERVED = {"messages", "tools", "tokenize", "add_generation_prompt", "conversation"}


@dataclass(slots=True)
class ChatPrompt:
    """A rendered chat prompt and how the model's thinking block will start."""

    token_ids: list[int]
    thinking: bool  # False: the prompt closed an empty <think> block (thinking disabled)
    starts_in_reasoning: bool  # the prompt already opened <think>
    single_tool_call: bool = False  # one call allowed (constraints.allows_several_calls)
    tools: ToolFormat = field(default_factory=ToolFormat)  # how the prompt asked for calls


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    if data["role"] == "developer":
        data["role"] = "system"
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    # Qwen3's template calls string methods on content, also for tool-call-only messages.
    data["content"] = content or ""
    return data


def render_prompt(tokenizer: Any, req: ChatCompletionRequest, use_tools: bool) -> ChatPrompt:
    """Apply the chat template (400 when the template rejects the conversation)."""
    messages = [_message_dict(m) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in _offered_tools(req)] if use_tools else None
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED}
    ids = _render(tokenizer, messages, tools, kwargs)
    if tools and ids == _render(tokenizer, messages, None, kwargs):
        # The template has no tools section: describe them as Qwen3's template would.
        ids = _render(tokenizer, with_tools_in_system(messages, tools), None, kwargs)
    single = use_tools and not allows_several_calls(req)
    return ChatPrompt(ids, *prompt_thinking(tokenizer, ids), single_tool_call=single,
                      tools=tool_format(tokenizer, tools))


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            kwargs: dict[str, Any]) -> list[int]:
    try:
        return list(tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs
        ))
    except Exception as exc:
        log.info("chat template failed: %r", exc)
        raise bad_request(f"the chat template rejected the messages: {_short(exc)}",
                          "messages") from None


def _offered_tools(req: ChatCompletionRequest) -> list:
    """The tools the model may call: all, or only the one a named ``tool_choice`` picks."""
    choice = req.tool_choice
    if not isinstance(choice, dict):
        return list(req.tools or [])
    name = (choice.get("function") or {}).get("name")
    picked = [t for t in req.tools or [] if t.function.name == name]
    if not picked:
        raise bad_request(f"tool_choice names no tool in `tools`: {name!r}", "tool_choice")
    return picked


def _short(exc: Exception) -> str:
    # Template errors carry the template's own message; anything else only its class name.
    module = type(exc).__module__
    if module.startswith("jinja2") or isinstance(exc, (ValueError, TypeError)):
        return str(exc)[:200]
    return type(exc).__name__


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions, streaming or not, ``n`` independent choices."""
    call = await open_call(request, ChatCompletionRequest)
    req, tokenizer = call.body, call.engine.tokenizer
    use_tools = bool(req.tools) and req.tool_choice != "none"
    prompt = render_prompt(tokenizer, req, use_tools)
    if call.state.config.log_prompts:
        log.info("chat prompt: %r", tokenizer.decode(prompt.token_ids))
    requested = req.max_completion_tokens or req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    tools = tool_specs(_offered_tools(req)) if use_tools else []
    constraint = {**chat_constraint(tokenizer, req, tools),
                  **budget_fields(call, req.thinking_budget, requested, req.reasoning_effort)}
    gen = openai_request(req, call.engine, [prompt.token_ids], requested, top, new_id("chatcmpl"),
                         constraint)
    head = {"id": gen.response_id, "created": int(time.time()), "model": call.model}
    return await serve(call, gen, ChatFormatter(head, gen, prompt, use_tools))


def _split(text: str, prompt: ChatPrompt, use_tools: bool) -> tuple[str | None, str, list]:
    reasoning, content = (
        split_reasoning(text, prompt.starts_in_reasoning) if prompt.thinking else (None, text)
    )
    calls: list[dict[str, Any]] = []
    if use_tools:
        content, calls = prompt.tools.parse(content)
    return reasoning, content, calls[:1] if prompt.single_tool_call else calls


class ChatFormatter(Formatter):
    """``chat.completion`` bodies and ``chat.completion.chunk`` events."""

    def __init__(self, head: dict[str, Any], gen: GenerationRequest, prompt: ChatPrompt,
                 use_tools: bool) -> None:
        self.head = head
        self.prompt = prompt
        self.use_tools = use_tools
        self.wants_logprobs = gen.params.logprobs is not None
        self.include_usage = gen.include_usage
        self.choices = [_ChoiceStream(i, prompt, use_tools, self.wants_logprobs)
                        for i in range(gen.n)]
        self.finished: set[int] = set()  # choices whose stream sent its finish_reason

    def response(self, result: RunResult) -> dict[str, Any]:
        choices = [self._choice(index, r) for index, r in sorted(result.results.items())]
        return {**self.head, "object": "chat.completion", "choices": choices,
                "usage": result.usage.as_openai(), "system_fingerprint": None}

    def _choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        reasoning, content, calls = _split(result.text, self.prompt, self.use_tools)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls and not content else content,
            "reasoning_content": reasoning,
        }
        if calls:
            message["tool_calls"] = calls
        lp = chat_logprobs(result.logprobs or []) if self.wants_logprobs else None
        return {"index": index, "message": message, "logprobs": lp,
                "finish_reason": _finish_reason(result.finish_reason, calls)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {"usage": None} if self.include_usage else {}
        return {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}

    def stream_start(self) -> list[Payload]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk([{"index": c.index, "delta": role, "logprobs": None,
                              "finish_reason": None}]) for c in self.choices]

    def stream_output(self, index: int, out: RequestOutput) -> list[Payload]:
        if out.finished:
            self.finished.add(index)
        choice = self.choices[index].on_output(out)
        return [] if choice is None else [self._chunk([choice])]

    def stream_error(self, err: NanoQwen3Error) -> list[Payload]:
        ends = [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": "abort"}
                for c in self.choices if c.index not in self.finished]
        return [error_chunk(self._chunk(ends), err)]

    def stream_end(self, result: RunResult) -> list[Payload]:
        if not self.include_usage:
            return []
        return [{**self.head, "object": "chat.completion.chunk", "choices": [],
                 "usage": result.usage.as_openai()}]


class _ChoiceStream:
    """Turns one choice's engine outputs into chat deltas."""

    def __init__(self, index: int, prompt: ChatPrompt, use_tools: bool, logprobs: bool) -> None:
        self.index = index
        self.reasoning = ReasoningStreamParser(prompt.starts_in_reasoning, enabled=prompt.thinking)
        self.tools = prompt.tools.stream_parser() if use_tools else None
        self.logprobs = logprobs
        self.single_tool_call = prompt.single_tool_call

    def on_output(self, out: RequestOutput) -> dict[str, Any] | None:
        reasoning, content = self.reasoning.feed(out.text)
        if self.tools is not None:
            content = self.tools.feed(content)
        calls: list[dict[str, Any]] = []
        finish = None
        if out.finished:
            more_reasoning, more = self.reasoning.flush()
            reasoning += more_reasoning
            content, calls = self._flush_tools(content + more)
            finish = _finish_reason(out.finish_reason, calls)
        delta = _delta(content, reasoning, calls)
        lp = chat_logprobs(out.logprobs or []) if self.logprobs else None
        if not delta and lp is None and finish is None:
            return None
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _flush_tools(self, content: str) -> tuple[str, list[dict[str, Any]]]:
        if self.tools is None:
            return content, []
        content = self.tools.feed(content)
        rest, calls = self.tools.flush()
        return content + rest, calls[:1] if self.single_tool_call else calls


def _finish_reason(engine_reason: str | None, calls: list[dict[str, Any]]) -> str | None:
    # A reply cut by max_tokens says so even after complete calls: the text after them
    # (often a next call) is unfinished.
    return "tool_calls" if calls and engine_reason != "length" else engine_reason


def _delta(content: str, reasoning: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
    return delta
