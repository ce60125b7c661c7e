"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages API).

Streams follow Anthropic's event order: ``message_start``, ``ping``, per content block
``content_block_start`` / ``content_block_delta``* / ``content_block_stop`` (thinking, then
text, then ``tool_use`` blocks), ``message_delta`` (stop reason, usage), ``message_stop``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ...errors import NanoQwen3Error
from ...sampling_params import SamplingParams
from ...structured import ToolSpec, tool_call_grammar
from ...tool_xml import tool_format
from ..errors import anthropic_error_json, bad_request
from ..generation.call import open_call
from ..generation.formatter import Payload, SSEEvent
from ..generation.params import stop_list
from ..generation.runner import RunResult
from ..generation.turn_format import TurnFormatter, TurnResult, serve_turn
from ..generation.turns import Finish, TurnPrompt, TurnRun, finish_of, render_turn, turn_prompt
from ..openai.constraints import check
from .protocol import (
    CountTokensRequest,
    MessagesRequest,
    chat_messages,
    chat_tools,
    tool_use_block,
)

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
        return turn_prompt(tokenizer, ids, open_thinking=thinking, tools=tools)
    ids += tokenizer.encode(prefill, add_special_tokens=False)
    return TurnPrompt(ids, False, False, tool_format(tokenizer, tools))


def constraint(tokenizer: Any, req: MessagesRequest) -> dict[str, Any]:
    """``tool_choice`` ``any`` / ``tool``: a grammar that forces a Qwen3 tool call (to any
    offered tool, or the named one) whose input matches the tool's ``input_schema``."""
    choice = req.tool_choice
    if choice is None or choice.type not in ("any", "tool") or not req.tools:
        return {}
    specs = [ToolSpec(t["function"]["name"], t["function"]["parameters"])
             for t in chat_tools(req) or []]
    grammar = tool_call_grammar(tokenizer, specs, parallel=not choice.disable_parallel_tool_use)
    return check({"grammar": grammar}, "tool_choice")


def sampling_params(req: MessagesRequest, constrained: dict[str, Any]) -> SamplingParams:
    given = {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(req, k)) is not None}
    return SamplingParams(**given, **constrained, max_tokens=req.max_tokens,
                          stop_sequences=stop_list(req.stop_sequences, "stop_sequences"))


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
    call = await open_call(request, MessagesRequest)
    req = call.body
    budget = thinking_budget(req)
    tokenizer = call.engine.tokenizer
    prompt = render(tokenizer, req)
    params = sampling_params(req, constraint(tokenizer, req))
    run = TurnRun.for_call(call, prompt, params, "msg", budget)
    single = bool(req.tool_choice and req.tool_choice.disable_parallel_tool_use)
    use_tools = chat_tools(req) is not None
    formatter = MessageFormatter(run.request.response_id, call.model, prompt, use_tools,
                                 run.outputs, single)
    return await serve_turn(call, run, formatter)


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's token count as ``/v1/messages`` would render it."""
    call = await open_call(request, CountTokensRequest)
    return web.json_response({"input_tokens": len(render(call.engine.tokenizer,
                                                         call.body).token_ids)})


# ---------------------------------------------------------------- formatting


def stop_reason(finish: Finish, has_tool_use: bool) -> tuple[str, str | None]:
    """Anthropic's ``(stop_reason, stop_sequence)``: a reply cut by ``max_tokens`` says so
    even after complete tool calls (the text after them, often a next call, is unfinished)."""
    if finish.finish_reason == "length":
        return "max_tokens", None
    if has_tool_use:
        return "tool_use", None
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
    if text or not content and not tools:  # as streamed: an empty text block only alone
        content.append({"type": "text", "text": text})
    content += tools
    reason, sequence = stop_reason(result.finish, bool(tools))
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": _usage(result.finish)}


def _usage(finish: Finish) -> dict[str, int]:
    """Anthropic counts cache reads apart: ``input_tokens`` are the prompt tokens computed,
    and the three input counts add up to the prompt. Nothing is billed for writing a cache
    here, so ``cache_creation_input_tokens`` is 0."""
    return {"input_tokens": finish.prompt_tokens - finish.cached_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": finish.cached_tokens,
            "output_tokens": finish.completion_tokens}


class MessageFormatter(TurnFormatter):
    """A turn as Anthropic's message JSON or stream events."""

    def __init__(self, rid: str, model: str, prompt: TurnPrompt, use_tools: bool,
                 outputs: list, single_tool: bool = False) -> None:
        super().__init__(prompt, use_tools, outputs)
        self.rid, self.model, self.single = rid, model, single_tool
        self.num_prompt_tokens = len(prompt.token_ids)
        self.index = -1
        self.open_kind: str | None = None  # "reasoning" or "text" while a block is open

    def response(self, result: RunResult) -> dict[str, Any]:
        return message_json(self.rid, self.model, self.collect(result), self.single)

    def stream_start(self) -> list[Payload]:
        message = {"id": self.rid, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.num_prompt_tokens, "output_tokens": 0}}
        return [_event("message_start", message=message), _event("ping")]

    def stream_error(self, err: NanoQwen3Error) -> list[Payload]:
        return [SSEEvent(anthropic_error_json(err), "error")]

    def piece(self, kind: str, text: str) -> list[Payload]:
        out = [] if self.open_kind == kind else self._close() + self._open(kind)
        delta = ({"type": "thinking_delta", "thinking": text} if kind == "reasoning"
                 else {"type": "text_delta", "text": text})
        return out + [_event("content_block_delta", index=self.index, delta=delta)]

    def _open(self, kind: str, block: dict[str, Any] | None = None) -> list[Payload]:
        self.index += 1
        self.open_kind = kind
        if block is None:
            block = ({"type": "thinking", "thinking": "", "signature": ""} if kind == "reasoning"
                     else {"type": "text", "text": ""})
        return [_event("content_block_start", index=self.index, content_block=block)]

    def _close(self) -> list[Payload]:
        if self.open_kind is None:
            return []
        self.open_kind = None
        return [_event("content_block_stop", index=self.index)]

    def stream_end(self, result: RunResult) -> list[Payload]:
        out, calls = self.finish_pieces()
        tools, leftover = _tool_blocks(calls, self.single)
        if leftover:
            out += self.piece("text", leftover)
        if self.index < 0 and not tools:
            out += self._open("text")  # an empty reply is still one (empty) text block
        for block in tools:
            out += self._close() + self._open("tool_use", {**block, "input": {}})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            out.append(_event("content_block_delta", index=self.index, delta=delta))
        finish = finish_of(result, self.parser)
        reason, sequence = stop_reason(finish, bool(tools))
        return out + self._close() + [
            # message_start said the whole prompt (the cache was not known then); the
            # final counts replace it, as Anthropic's cumulative message_delta usage does.
            _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                   usage=_usage(finish)),
            _event("message_stop"),
        ]


def _event(kind: str, **payload: Any) -> SSEEvent:
    return SSEEvent({"type": kind, **payload}, kind)
