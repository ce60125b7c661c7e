"""Anthropic Messages requests (pydantic) and their conversion to chat-template messages.

Content blocks map onto what Qwen3's chat template knows: ``text`` -> content, ``thinking``
-> ``reasoning_content``, ``tool_use`` -> ``tool_calls``, ``tool_result`` -> a ``tool``
message. Images and documents are a 400 (the served models read text only).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from ..errors import bad_request
from ..openai.protocol import _Request, _Response


class TextBlock(_Request):
    type: Literal["text"]
    text: str


class ImageBlock(_Request):
    type: Literal["image", "document", "search_result", "container_upload"]


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool = False


class ThinkingBlock(_Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Request):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
                  | RedactedThinkingBlock, Field(discriminator="type")]


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDefinition(_Request):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    # Anthropic's server tools (web search, bash, ...) have other types: not served here.
    type: Literal["custom"] | None = None


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    # Anthropic requires >= 1024; any positive cap is honoured here (small models, tests).
    budget_tokens: int | None = Field(None, ge=1)


class Metadata(_Request):
    user_id: str | None = None


class CountTokensRequest(_Request):
    """``POST /v1/messages/count_tokens``."""

    model: str | None = None
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None  # at most MAX_STOP_SEQUENCES (messages.py)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    stream: bool = False
    # Extensions shared with the OpenAI endpoints: lower runs first; seconds before giving up.
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    timeout: float | None = Field(None, gt=0)


class AnthropicUsage(_Response):
    input_tokens: int  # computed; with the two cache counts, the whole prompt
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None  # reused from the prefix cache


class MessageResponse(_Response):
    """A non-streaming ``/v1/messages`` answer."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicStreamEvent(_Response):
    """One ``/v1/messages`` stream event (``message_start``, ``content_block_delta``, ...)."""

    type: str


class CountTokensResponse(_Response):
    input_tokens: int


class AnthropicErrorDetail(_Response):
    type: str
    message: str


class AnthropicError(_Response):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


# ---------------------------------------------------------------- conversion


def system_text(system: str | list[TextBlock] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    return "\n".join(block.text for block in system) or None


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The request as chat-template messages (system first)."""
    system = system_text(req.system)
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant(message.content, i))
        else:
            out.extend(_user(message.content, i))
    return out


def _assistant(blocks: list[Any], i: int) -> dict[str, Any]:
    _reject_media(blocks, i)
    text = "".join(b.text for b in blocks if b.type == "text")
    message: dict[str, Any] = {"role": "assistant", "content": text}
    thinking = "".join(b.thinking for b in blocks if b.type == "thinking")
    if thinking:
        message["reasoning_content"] = thinking
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
             for b in blocks if b.type == "tool_use"]
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[Any], i: int) -> list[dict[str, Any]]:
    """Tool results become ``tool`` messages (Qwen3 wraps them in <tool_response>), then text."""
    _reject_media(blocks, i)
    out = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": _result_text(b, i)}
           for b in blocks if b.type == "tool_result"]
    if any(b.type in ("tool_use", "thinking", "redacted_thinking") for b in blocks):
        raise bad_request(f"messages.{i}: tool_use and thinking blocks belong to assistant turns",
                          f"messages.{i}.content")
    text = "\n".join(b.text for b in blocks if b.type == "text")
    if text or not out:
        out.append({"role": "user", "content": text})
    return out


def _result_text(block: ToolResultBlock, i: int) -> str:
    if isinstance(block.content, str):
        text = block.content
    else:
        _reject_media(block.content, i)
        text = "\n".join(b.text for b in block.content)
    # Qwen3 has no error flag for tool results: say it in the text the model reads.
    return f"Error: {text}" if block.is_error else text


def _reject_media(blocks: list[Any], i: int) -> None:
    for block in blocks:
        if block.type in ("image", "document", "search_result", "container_upload"):
            raise bad_request(f"messages.{i}: {block.type} blocks are not supported: the served "
                              "model reads text only", f"messages.{i}.content")


def chat_tools(req: CountTokensRequest) -> list[dict[str, Any]] | None:
    """Tools in the chat template's (OpenAI) shape; None when none may be called."""
    choice = req.tool_choice
    if not req.tools or (choice is not None and choice.type == "none"):
        return None
    tools = req.tools
    if choice is not None and choice.type == "tool":
        tools = [t for t in tools if t.name == choice.name]
        if not tools:
            raise bad_request(f"tool_choice names no tool in `tools`: {choice.name!r}",
                              "tool_choice.name")
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in tools]


def tool_use_block(call: dict[str, Any]) -> dict[str, Any] | None:
    """A parsed Qwen3 tool call (OpenAI shape) as a ``tool_use`` block; None if its arguments
    are not a JSON object (Anthropic's ``input`` must be one)."""
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(args, dict):
        return None
    call_id = call["id"].removeprefix("call_")
    return {"type": "tool_use", "id": f"toolu_{call_id}", "name": call["function"]["name"],
            "input": args}
