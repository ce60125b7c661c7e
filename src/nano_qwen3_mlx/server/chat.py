"""``POST /v1/chat/completions``: chat template, reasoning split, tool calls, streaming."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..parsers import (
    ReasoningStreamParser,
    ToolCallStreamParser,
    parse_tool_calls,
    prompt_thinking,
    split_reasoning,
)
from .errors import bad_request
from .generation import GenerationRun, collect, merge_usage
from .logprobs import chat_logprobs
from .params import generations, new_id, parse_body
from .protocol import ChatCompletionRequest, ChatMessage
from .state import STATE_KEY
from .streaming import stream_run

log = logging.getLogger("nano_qwen3_mlx.server")

# Template arguments a client must not override through chat_template_kwargs.
_RESERVED = {"messages", "tools", "tokenize", "add_generation_prompt", "conversation"}


@dataclass(slots=True)
class ChatPrompt:
    """A rendered chat prompt and how the model's thinking block will start."""

    token_ids: list[int]
    thinking: bool  # False: the prompt closed an empty <think> block (thinking disabled)
    starts_in_reasoning: bool  # the prompt already opened <think>


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
    try:
        ids = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs
        )
    except Exception as exc:
        log.info("chat template failed: %r", exc)
        raise bad_request(f"the chat template rejected the messages: {_short(exc)}",
                          "messages") from None
    return ChatPrompt(list(ids), *prompt_thinking(tokenizer, ids))


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
    state = request.app[STATE_KEY]
    req = await parse_body(request, ChatCompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    use_tools = bool(req.tools) and req.tool_choice != "none"
    prompt = render_prompt(engine.tokenizer, req, use_tools)
    if state.config.log_prompts:
        log.info("chat prompt: %r", engine.tokenizer.decode(prompt.token_ids))
    requested = req.max_completion_tokens or req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    rid = new_id("chatcmpl")
    gens = generations(req, engine, [prompt.token_ids], requested, top, rid)
    run = GenerationRun(request, gens, priority=req.priority, timeout=req.timeout)
    head = {"id": rid, "created": int(time.time()), "model": model}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(request, run, head, prompt, use_tools, include_usage)
    return await _complete(run, head, prompt, use_tools)


def _split(text: str, prompt: ChatPrompt, use_tools: bool) -> tuple[str | None, str, list]:
    reasoning, content = (
        split_reasoning(text, prompt.starts_in_reasoning) if prompt.thinking else (None, text)
    )
    calls: list[dict[str, Any]] = []
    if use_tools:
        content, calls = parse_tool_calls(content)
    return reasoning, content, calls


async def _complete(run: GenerationRun, head: dict[str, Any], prompt: ChatPrompt,
                    use_tools: bool) -> web.Response:
    out = await collect(run)
    choices = []
    for index in sorted(out.finals):
        reasoning, content, calls = _split(out.texts[index], prompt, use_tools)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls and not content else content,
            "reasoning_content": reasoning,
        }
        if calls:
            message["tool_calls"] = calls
        wants_lp = run.gens[index].params.logprobs is not None
        lp = chat_logprobs(out.logprobs[index]) if wants_lp else None
        finish = "tool_calls" if calls else out.finals[index].get("finish_reason")
        choices.append({"index": index, "message": message, "logprobs": lp,
                        "finish_reason": finish})
    usage = merge_usage(len(prompt.token_ids), out.finals)
    return web.json_response({**head, "object": "chat.completion", "choices": choices,
                              "usage": usage, "system_fingerprint": None})


class _ChoiceStream:
    """Turns one choice's engine chunks into chat deltas."""

    def __init__(self, index: int, prompt: ChatPrompt, use_tools: bool, logprobs: bool) -> None:
        self.index = index
        self.reasoning = ReasoningStreamParser(prompt.starts_in_reasoning, enabled=prompt.thinking)
        self.tools = ToolCallStreamParser() if use_tools else None
        self.logprobs = logprobs

    def on_chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        reasoning, content = self.reasoning.feed(chunk.get("text", ""))
        if self.tools is not None:
            content = self.tools.feed(content)
        calls: list[dict[str, Any]] = []
        finish = None
        if chunk.get("finished"):
            more_reasoning, more = self.reasoning.flush()
            reasoning += more_reasoning
            content, calls = self._flush_tools(content + more)
            finish = "tool_calls" if calls else chunk.get("finish_reason")
        delta = _delta(content, reasoning, calls)
        lp = chat_logprobs(chunk.get("logprobs") or []) if self.logprobs else None
        if not delta and lp is None and finish is None:
            return None
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _flush_tools(self, content: str) -> tuple[str, list[dict[str, Any]]]:
        if self.tools is None:
            return content, []
        content = self.tools.feed(content)
        rest, calls = self.tools.flush()
        return content + rest, calls


def _delta(content: str, reasoning: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
    return delta


async def _stream(request: web.Request, run: GenerationRun, head: dict[str, Any],
                  prompt: ChatPrompt, use_tools: bool, include_usage: bool) -> web.StreamResponse:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}
    choices = {
        g.index: _ChoiceStream(g.index, prompt, use_tools, g.params.logprobs is not None)
        for g in run.gens
    }
    finals: dict[int, dict[str, Any]] = {}

    def on_start() -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [{**head, "choices": [{"index": i, "delta": role, "logprobs": None,
                                      "finish_reason": None}], **extra} for i in choices]

    def on_chunk(index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if chunk.get("finished"):
            finals[index] = chunk
        choice = choices[index].on_chunk(chunk)
        return [] if choice is None else [{**head, "choices": [choice], **extra}]

    def on_end() -> list[dict[str, Any]]:
        usage = merge_usage(len(prompt.token_ids), finals)
        return [{**head, "choices": [], "usage": usage}] if include_usage else []

    return await stream_run(request, run, on_start, on_chunk, on_end)
