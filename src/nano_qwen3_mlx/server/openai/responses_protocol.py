"""OpenAI Responses requests (pydantic) and their conversion to chat-template messages.

Stateless: nothing is stored, so ``previous_response_id`` is a 400 (send the whole
conversation as ``input`` items instead) and ``store`` is answered as ``false``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from ..errors import bad_request
from .protocol import _Request, _Response


class TextPart(_Request):
    type: Literal["input_text", "output_text"]
    text: str


class MediaPart(_Request):
    type: Literal["input_image", "input_file", "input_audio", "refusal"]


Part = Annotated[TextPart | MediaPart, Field(discriminator="type")]


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Part]


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Request):
    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None


Item = Annotated[FunctionCallItem | FunctionCallOutputItem | ReasoningItem | MessageItem,
                 Field(union_mode="left_to_right")]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None


class ReasoningConfig(_Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Request):
    """``POST /v1/responses``."""

    model: str | None = None
    input: str | Annotated[list[Item], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # Extension: most tokens of a thinking block (server/thinking.py).
    thinking_budget: int | None = Field(None, ge=0)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Extensions shared with the other endpoints: stop strings (as chat's `stop`, at most
    # MAX_STOP_SEQUENCES); lower runs first; seconds before giving up.
    stop: str | list[str] | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    timeout: float | None = Field(None, gt=0)


class InputTokensDetails(_Response):
    cached_tokens: int = 0  # input tokens whose KV the prefix cache gave
    cache_write_tokens: int = 0


class OutputTokensDetails(_Response):
    reasoning_tokens: int = 0


class ResponsesUsage(_Response):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails | None = None
    output_tokens_details: OutputTokensDetails | None = None


class ResponseObject(_Response):
    """A ``/v1/responses`` answer (also the ``response`` of its stream events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: ResponsesUsage | None = None


class ResponsesStreamEvent(_Response):
    """One ``/v1/responses`` stream event (``response.output_text.delta``, ...)."""

    type: str
    sequence_number: int


# ---------------------------------------------------------------- conversion


def check_supported(req: ResponsesRequest) -> None:
    """400 for what a stateless server without constrained decoding cannot honour."""
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server stores no "
                          "responses; send the conversation as `input` items",
                          "previous_response_id")
    if req.background:
        raise bad_request("background responses are not supported", "background")
    forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedFunction)
    if forced and not req.tools:
        raise bad_request("tool_choice requires `tools`", "tool_choice")
    fmt = req.text.format if req.text else None
    if forced and fmt is not None and fmt.type != "text":
        raise bad_request("text.format cannot be combined with a forced tool_choice",
                          "text.format")


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    for part in content:
        if part.type not in ("input_text", "output_text"):
            raise bad_request(f"{where}: {part.type} content is not supported: the served "
                              "model reads text only", where)
    return "".join(part.text for part in content)


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` + ``input`` as chat-template messages."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return out + [{"role": "user", "content": req.input}]
    reasoning: list[str] = []  # reasoning items wait for the assistant turn they precede
    for i, item in enumerate(req.input):
        where = f"input.{i}"
        if isinstance(item, ReasoningItem):
            reasoning += [part.text for part in item.content or item.summary]
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output, where)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            _assistant(out, reasoning, tool_calls=[call])
        elif item.role == "assistant":
            _assistant(out, reasoning, content=_text(item.content, where))
        else:
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, where)})
    return out


def _assistant(out: list[dict[str, Any]], reasoning: list[str], content: str = "",
               tool_calls: list[dict[str, Any]] | None = None) -> None:
    """Append to the open assistant turn (calls follow its text) or start one."""
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and (tool_calls or not last.get("tool_calls")):
        last["content"] += content
        last.setdefault("tool_calls", []).extend(tool_calls or [])
    else:
        last = {"role": "assistant", "content": content, "tool_calls": list(tool_calls or [])}
        out.append(last)
    if reasoning:
        last["reasoning_content"] = "\n".join(reasoning)
        reasoning.clear()
    if not last["tool_calls"]:
        last.pop("tool_calls")


def offered_tools(req: ResponsesRequest) -> list[FunctionTool]:
    """The tools the model may call: all, none, or only the one a named tool_choice picks."""
    if not req.tools or req.tool_choice == "none":
        return []
    if not isinstance(req.tool_choice, NamedFunction):
        return list(req.tools)
    picked = [t for t in req.tools if t.name == req.tool_choice.name]
    if not picked:
        raise bad_request(f"tool_choice names no tool in `tools`: {req.tool_choice.name!r}",
                          "tool_choice.name")
    return picked


def chat_tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The offered tools in the chat template's shape (None when none)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.parameters or {}}}
            for t in offered_tools(req)] or None


def response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """``text.format`` as the OpenAI chat ``response_format`` it means (None for text)."""
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    spec = {"name": fmt.name, "schema": fmt.json_schema or {},
            "strict": True if fmt.strict is None else fmt.strict}
    return {"type": "json_schema", "json_schema": spec}


def thinking_enabled(req: ResponsesRequest) -> bool | None:
    """``reasoning.effort: none`` turns Qwen3 thinking off; otherwise the template default."""
    if req.reasoning is not None and req.reasoning.effort == "none":
        return False
    return None
