"""``POST /v1/responses`` (OpenAI Responses API), stateless.

Output items, in order: a ``reasoning`` item (Qwen3 thinking, as ``reasoning_text``), a
``message`` with one ``output_text`` part, then one ``function_call`` item per tool call.
Streams send the typed events (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.reasoning_text.delta``/``response.output_text.delta``, their ``.done``,
``response.function_call_arguments.delta``/``.done``, ``response.output_item.done``, then
``response.completed`` or ``response.incomplete``), each with a ``sequence_number``; an
error after the stream began sends ``error`` and ``response.failed``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from ...errors import NanoQwen3Error, client_message
from ...sampling_params import SamplingParams
from ...structured import ToolSpec, response_format_fields, tool_call_grammar
from ..errors import bad_request
from ..generation.call import open_call
from ..generation.formatter import Payload, SSEEvent
from ..generation.params import stop_list
from ..generation.runner import RunResult
from ..generation.turn_format import TurnFormatter, TurnResult, serve_turn
from ..generation.turns import Finish, TurnPrompt, TurnRun, finish_of, render_turn, turn_prompt
from .constraints import allows_several_calls, check
from .responses_protocol import (
    NamedFunction,
    ResponsesRequest,
    chat_messages,
    chat_tools,
    check_supported,
    offered_tools,
    response_format,
    thinking_enabled,
)
from .thinking import budget_fields


def render(tokenizer: Any, req: ResponsesRequest) -> TurnPrompt:
    thinking = thinking_enabled(req)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    tools = chat_tools(req)
    ids = render_turn(tokenizer, chat_messages(req), tools, **kwargs)
    return turn_prompt(tokenizer, ids, tools=tools)


def constraint(tokenizer: Any, req: ResponsesRequest) -> dict[str, Any]:
    """A forced tool call (``tool_choice`` required / a named function) or ``text.format``
    (json_schema / json_object) as a grammar (the engine lets a thinking block come first)."""
    if req.tool_choice == "required" or isinstance(req.tool_choice, NamedFunction):
        specs = [ToolSpec(t.name, t.parameters, t.strict) for t in offered_tools(req)]
        grammar = tool_call_grammar(tokenizer, specs, parallel=allows_several_calls(req))
        return check({"grammar": grammar}, "tool_choice")
    try:
        fields = response_format_fields(response_format(req))
    except ValueError as exc:
        raise bad_request(str(exc), "text.format") from None
    return check(fields, "text.format")


def think_budget(call: Any, req: ResponsesRequest) -> int | None:
    """``reasoning.effort`` (``none`` turns thinking off instead) or ``thinking_budget``."""
    effort = req.reasoning.effort if req.reasoning is not None else None
    fields = budget_fields(call, req.thinking_budget, req.max_output_tokens,
                           None if effort == "none" else effort, "reasoning.effort")
    return fields.get("thinking_budget")


def sampling_params(req: ResponsesRequest, constrained: dict[str, Any]) -> SamplingParams:
    given = {k: v for k in ("temperature", "top_p") if (v := getattr(req, k)) is not None}
    return SamplingParams(**given, **constrained, max_tokens=req.max_output_tokens,
                          stop_sequences=stop_list(req.stop, "stop"))


async def responses(request: web.Request) -> web.StreamResponse:
    """One model response for ``input``; streaming or not."""
    call = await open_call(request, ResponsesRequest)
    req = call.body
    check_supported(req)
    tokenizer = call.engine.tokenizer
    prompt = render(tokenizer, req)
    params = sampling_params(req, constraint(tokenizer, req))
    run = TurnRun.for_call(call, prompt, params, "resp", think_budget(call, req),
                           fields=("input", "max_output_tokens"))
    head = response_head(run.request.response_id, call.model, req)
    formatter = ResponseFormatter(head, prompt, chat_tools(req) is not None, run.outputs)
    return await serve_turn(call, run, formatter)


def response_head(rid: str, model: str, req: ResponsesRequest) -> dict[str, Any]:
    """The request-echo fields of the response object."""
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and \
        req.text.format else {"type": "text"}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "model": model, "output": [], "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "tool_choice": _dump(req.tool_choice) or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "text": {"format": fmt}, "reasoning": _dump(req.reasoning),
        "previous_response_id": None, "store": False, "truncation": "disabled",
        "metadata": req.metadata or {}, "user": req.user, "usage": None,
    }


def _dump(value: Any) -> Any:
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value


def _item_id(kind: str) -> str:
    prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(finish: Finish) -> dict[str, Any]:
    return {"input_tokens": finish.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finish.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": finish.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def completed(head: dict[str, Any], items: list[dict[str, Any]], finish: Finish) -> dict:
    """The final response object: ``incomplete`` when max_output_tokens cut it off."""
    cut = finish.finish_reason == "length"
    status = "incomplete" if cut else "completed"
    return {**head, "status": status, "output": items, "usage": usage(finish),
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text or status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content,
            "status": status}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    args = call["function"]["arguments"] if status == "completed" else ""
    return {"id": item_id, "type": "function_call", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": args, "status": status}


def output_items(result: TurnResult, new_id_of: Any) -> list[dict[str, Any]]:
    items = []
    if result.saw_reasoning:
        items.append(reasoning_item(new_id_of("reasoning"), result.reasoning))
    if result.text or not result.tool_calls:
        items.append(message_item(new_id_of("message"), result.text))
    items += [call_item(new_id_of("function_call"), call) for call in result.tool_calls]
    return items


class ResponseFormatter(TurnFormatter):
    """A turn as a Responses object or its typed stream events."""

    def __init__(self, head: dict[str, Any], prompt: TurnPrompt, use_tools: bool,
                 outputs: list, new_id_of: Any = _item_id) -> None:
        super().__init__(prompt, use_tools, outputs)
        self.head, self.new_id_of = head, new_id_of
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self.open_kind: str | None = None
        self.open_text: list[str] = []

    def response(self, result: RunResult) -> dict[str, Any]:
        turn = self.collect(result)
        return completed(self.head, output_items(turn, self.new_id_of), turn.finish)

    def _event(self, kind: str, **payload: Any) -> SSEEvent:
        self.seq += 1
        return SSEEvent({"type": kind, "sequence_number": self.seq - 1, **payload}, kind)

    def stream_start(self) -> list[Payload]:
        return [self._event("response.created", response=self.head),
                self._event("response.in_progress", response=self.head)]

    def stream_error(self, err: NanoQwen3Error) -> list[Payload]:
        """The ``error`` event, then ``response.failed`` (the stream's terminal event) with the
        output so far, unfinished items marked ``incomplete``."""
        code, message = err.code or str(err.status), client_message(err)
        items = [{**item, "status": "incomplete"} if item.get("status") == "in_progress"
                 else item for item in self.items]
        failed = {**self.head, "status": "failed", "output": items,
                  "error": {"code": code, "message": message}}
        return [self._event("error", code=code, message=message, param=err.field),
                self._event("response.failed", response=failed)]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def piece(self, kind: str, text: str) -> list[Payload]:
        out = [] if self.open_kind == kind else self._close() + self._open(kind)
        self.open_text.append(text)
        name = "response.reasoning_text.delta" if kind == "reasoning" else \
            "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return out + [self._event(name, **self._where(), content_index=0, delta=text, **extra)]

    def _open(self, kind: str) -> list[Payload]:
        self.open_kind, self.open_text = kind, []
        if kind == "reasoning":
            item = reasoning_item(self.new_id_of("reasoning"), "", "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = message_item(self.new_id_of("message"), None, "in_progress")
            part = _text_part("")
        self.items.append(item)
        return [self._event("response.output_item.added", output_index=len(self.items) - 1,
                            item=item),
                self._event("response.content_part.added", **self._where(), content_index=0,
                            part=part)]

    def _close(self) -> list[Payload]:
        if self.open_kind is None:
            return []
        kind, text = self.open_kind, "".join(self.open_text)
        self.open_kind = None
        index = len(self.items) - 1
        if kind == "reasoning":
            done = self._event("response.reasoning_text.done", **self._where(), content_index=0,
                               text=text)
            part = {"type": "reasoning_text", "text": text}
            self.items[index] = reasoning_item(self.items[index]["id"], text)
        else:
            done = self._event("response.output_text.done", **self._where(), content_index=0,
                               text=text, logprobs=[])
            part = _text_part(text)
            self.items[index] = message_item(self.items[index]["id"], text)
        return [done,
                self._event("response.content_part.done", **self._where(), content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index,
                            item=self.items[index])]

    def stream_end(self, result: RunResult) -> list[Payload]:
        out, calls = self.finish_pieces()
        if not calls and not any(item["type"] == "message" for item in self.items):
            out += self._close() + self._open("text")  # the answer is one (maybe empty) message
        out += self._close()
        for call in calls:
            out += self._call_events(call)
        finish = finish_of(result, self.parser)
        final = completed(self.head, self.items, finish)
        name = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + [self._event(name, response=final)]

    def _call_events(self, call: dict[str, Any]) -> list[Payload]:
        item = call_item(self.new_id_of("function_call"), call, "in_progress")
        self.items.append(item)
        index, args = len(self.items) - 1, call["function"]["arguments"]
        self.items[index] = call_item(item["id"], call)
        return [
            self._event("response.output_item.added", output_index=index, item=item),
            self._event("response.function_call_arguments.delta", **self._where(), delta=args),
            self._event("response.function_call_arguments.done", **self._where(), arguments=args,
                        name=call["function"]["name"]),
            self._event("response.output_item.done", output_index=index, item=self.items[index]),
        ]
