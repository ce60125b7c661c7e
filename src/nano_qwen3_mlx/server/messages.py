"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages API).

Streams follow Anthropic's event order: ``message_start``, ``ping``, per content block
``content_block_start`` / ``content_block_delta``* / ``content_block_stop`` (thinking, then
text, then ``tool_use`` blocks), ``message_delta`` (stop reason, usage), ``message_stop``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from aiohttp import web

from ..sampling_params import SamplingParams
from .anthropic_protocol import (
    CountTokensRequest,
    MessagesRequest,
    chat_messages,
    chat_tools,
    tool_use_block,
)
from .errors import APIError, anthropic_error_body, bad_request, from_value_error
from .event_stream import NamedEvent, TurnResult, collect_turn, stream_events
from .params import parse_body, resolve_max_tokens
from .state import STATE_KEY
from .turns import Finish, TurnParser, TurnPrompt, finish_of, render_turn, run_turn, turn_prompt

log = logging.getLogger("nano_qwen3_mlx.server")


def render(tokenizer: Any, req: CountTokensRequest) -> TurnPrompt:
    """The prompt: thinking on (``<think>`` opened) only when the request enables it; a last
    assistant turn is a prefill the reply continues."""
    messages, tools = chat_messages(req), chat_tools(req)
    thinking = req.thinking is not None and req.thinking.type != "disabled"
    prefill = None
    if messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        prefill = messages.pop()["content"]
        if thinking:
            raise bad_request("thinking cannot continue a prefilled assistant turn", "thinking")
    ids = render_turn(tokenizer, messages, tools, enable_thinking=thinking)
    if prefill is None:
        return turn_prompt(tokenizer, ids, open_thinking=thinking)
    ids += tokenizer.encode(prefill, add_special_tokens=False)
    return TurnPrompt(ids, False, False)


def _check_forcing(req: CountTokensRequest) -> None:
    choice = req.tool_choice
    if choice is not None and choice.type in ("any", "tool") and req.tools:
        # Forcing a call needs a grammar over the tool-call syntax (constrained decoding).
        raise bad_request(f"tool_choice {choice.type!r} (a forced tool call) is not supported "
                          "yet: use 'auto' and describe the tool to call in the prompt",
                          "tool_choice")


def sampling_params(req: MessagesRequest, max_tokens: int) -> SamplingParams:
    given = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(req, k)) is not None}
    try:
        return SamplingParams(**given, max_tokens=max_tokens,
                              stop_sequences=list(req.stop_sequences or []))
    except ValueError as exc:
        raise from_value_error(exc) from None


def thinking_budget(req: MessagesRequest) -> int | None:
    config = req.thinking
    if config is None or config.type != "enabled":
        return None
    if config.budget_tokens is None:
        raise bad_request("thinking.budget_tokens is required when thinking is enabled",
                          "thinking.budget_tokens")
    if config.budget_tokens >= req.max_tokens:
        raise bad_request("thinking.budget_tokens must be less than max_tokens",
                          "thinking.budget_tokens")
    return config.budget_tokens


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages: one assistant turn, streaming or not."""
    state = request.app[STATE_KEY]
    req = await parse_body(request, MessagesRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    _check_forcing(req)
    budget = thinking_budget(req)
    prompt = render(engine.tokenizer, req)
    max_tokens = resolve_max_tokens(req.max_tokens, len(prompt.token_ids), engine.max_model_len)
    params = sampling_params(req, max_tokens)
    rid = f"msg_{uuid.uuid4().hex}"
    events = run_turn(request, prompt, params, rid, priority=req.priority,
                      timeout=req.timeout or state.config.request_timeout, think_budget=budget)
    use_tools = chat_tools(req) is not None
    single = bool(req.tool_choice and req.tool_choice.disable_parallel_tool_use)
    if req.stream:
        formatter = MessageStream(rid, model, prompt, use_tools, single,
                                  observe=state.metrics.observe_usage)
        return await stream_events(request, events, formatter)
    result = await collect_turn(events, TurnParser(prompt, use_tools))
    state.metrics.observe_usage(_usage_dict(result.finish))
    return web.json_response(message_json(rid, model, result, single))


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's token count as ``/v1/messages`` would render it."""
    state = request.app[STATE_KEY]
    req = await parse_body(request, CountTokensRequest)
    engine = state.ready_engine()
    state.check_model(req.model)
    return web.json_response({"input_tokens": len(render(engine.tokenizer, req).token_ids)})


# ---------------------------------------------------------------- formatting


def stop_reason(finish: Finish, has_tool_use: bool) -> tuple[str, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)``."""
    if has_tool_use:
        return "tool_use", None
    if finish.finish_reason == "length":
        return "max_tokens", None
    if isinstance(finish.stop_reason, str):
        return "stop_sequence", finish.stop_reason
    return "end_turn", None


def _tool_blocks(calls: list[dict[str, Any]], single: bool) -> tuple[list[dict], str]:
    """tool_use blocks, and the text of calls that cannot be blocks (kept, never dropped)."""
    blocks, leftover = [], []
    for call in calls[:1] if single else calls:
        block = tool_use_block(call)
        if block is None:
            leftover.append(json.dumps({"name": call["function"]["name"],
                                        "arguments": call["function"]["arguments"]}))
        else:
            blocks.append(block)
    return blocks, "\n".join(leftover)


def message_json(rid: str, model: str, result: TurnResult, single: bool) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if result.saw_reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": ""})
    tools, leftover = _tool_blocks(result.tool_calls, single)
    text = "\n".join(t for t in (result.text, leftover) if t)
    if text or not tools:
        content.append({"type": "text", "text": text})
    content += tools
    reason, sequence = stop_reason(result.finish, bool(tools))
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(result.finish)}


def _usage(finish: Finish) -> dict[str, int]:
    return {"input_tokens": finish.prompt_tokens, "output_tokens": finish.completion_tokens}


def _usage_dict(finish: Finish) -> dict[str, int]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens}


class MessageStream:
    """Engine chunks -> Anthropic stream events (pure; see :mod:`.event_stream`)."""

    def __init__(self, rid: str, model: str, prompt: TurnPrompt, use_tools: bool,
                 single_tool: bool = False, observe: Any = None) -> None:
        self.rid, self.model, self.single = rid, model, single_tool
        self.parser = TurnParser(prompt, use_tools)
        self.num_prompt_tokens = len(prompt.token_ids)
        self.index = -1
        self.open_kind: str | None = None  # "reasoning" or "text" while a block is open
        self.observe = observe
        self.finish: Finish | None = None

    def start(self) -> list[NamedEvent]:
        message = {"id": self.rid, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.num_prompt_tokens, "output_tokens": 0}}
        return [_event("message_start", message=message), _event("ping")]

    def keepalive(self) -> list[NamedEvent]:
        return [_event("ping")]

    def chunk(self, chunk: dict[str, Any]) -> list[NamedEvent]:
        out = [e for kind, text in self.parser.feed(chunk) for e in self._piece(kind, text)]
        if chunk.get("finished"):
            out += self._end(chunk)
        return out

    def error(self, err: APIError) -> list[NamedEvent]:
        return [("error", anthropic_error_body(err.status, err.message))]

    def _piece(self, kind: str, text: str) -> list[NamedEvent]:
        out = [] if self.open_kind == kind else self._close() + self._open(kind)
        delta = ({"type": "thinking_delta", "thinking": text} if kind == "reasoning"
                 else {"type": "text_delta", "text": text})
        return out + [_event("content_block_delta", index=self.index, delta=delta)]

    def _open(self, kind: str, block: dict[str, Any] | None = None) -> list[NamedEvent]:
        self.index += 1
        self.open_kind = kind
        if block is None:
            block = ({"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning"
                     else {"type": "text", "text": ""})
        return [_event("content_block_start", index=self.index, content_block=block)]

    def _close(self) -> list[NamedEvent]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [_event("content_block_stop", index=self.index)]

    def _end(self, last: dict[str, Any]) -> list[NamedEvent]:
        pieces, calls = self.parser.finish()
        out = [e for kind, text in pieces for e in self._piece(kind, text)]
        tools, leftover = _tool_blocks(calls, self.single)
        if leftover:
            out += self._piece("text", leftover)
        if self.index < 0 and not tools:
            out += self._open("text")  # an empty reply is still one (empty) text block
        for block in tools:
            out += self._close() + self._open("tool_use", {**block, "input": {}})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            out.append(_event("content_block_delta", index=self.index, delta=delta))
        self.finish = finish_of(last, self.parser)
        if self.observe is not None:
            self.observe(_usage_dict(self.finish))
        reason, sequence = stop_reason(self.finish, bool(tools))
        usage = {"output_tokens": self.finish.completion_tokens}
        return out + self._close() + [
            _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                   usage=usage),
            _event("message_stop"),
        ]


def _event(kind: str, **payload: Any) -> NamedEvent:
    return kind, {"type": kind, **payload}
