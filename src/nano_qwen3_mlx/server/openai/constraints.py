"""Request fields that constrain decoding, as ``SamplingParams`` fields, checked up front.

OpenAI ``response_format`` (chat and completions), vLLM's ``guided_*`` fields, and for chat
``tool_choice`` ``"required"`` / a named function (a grammar that forces a Qwen3 tool call
whose arguments match the tool's ``parameters``). A bad schema or grammar is a 400 naming
the problem before anything runs.
"""

from __future__ import annotations

import json
from typing import Any

from ...engine.grammar import check_grammar
from ...sampling_params import SamplingParams
from ...structured import (
    ToolSpec,
    guided_fields,
    response_format_fields,
    tool_call_grammar,
)
from ..errors import bad_request
from .protocol import ChatCompletionRequest, SamplingFields

_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")

# Qwen3's chat template's tool section, for templates that cannot render tools themselves.
_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
               "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def request_constraint(req: SamplingFields) -> tuple[dict[str, Any], str | None]:
    """``(SamplingParams fields, the request field they came from)`` for response_format
    and the guided_* fields; 400 when they conflict or are malformed."""
    given = [name for name in ("response_format", *_GUIDED) if getattr(req, name, None) is not None]
    if len(given) > 1:
        raise bad_request(f"give only one of {', '.join(given)}", given[1])
    if not given:
        return {}, None
    field = given[0]
    try:
        if field == "response_format":
            return response_format_fields(req.response_format), field
        return guided_fields(json_schema=req.guided_json, regex=req.guided_regex,
                             choice=req.guided_choice, grammar=req.guided_grammar), field
    except ValueError as exc:
        raise bad_request(str(exc), field) from None


def chat_constraint(tokenizer: Any, req: ChatCompletionRequest,
                    tools: list[ToolSpec]) -> dict[str, Any]:
    """The constraint of a chat request: forced tool calls or the response format (the
    engine lets a thinking block come first)."""
    fields, field = request_constraint(req)
    if req.tool_choice == "required" or isinstance(req.tool_choice, dict):
        if not tools:
            raise bad_request("tool_choice requires `tools`", "tool_choice")
        if field is not None:
            raise bad_request(f"{field} cannot be combined with a forced tool_choice", field)
        grammar = tool_call_grammar(tokenizer, tools, parallel=allows_several_calls(req))
        fields, field = {"grammar": grammar}, "tools"
    return check(fields, field)


def allows_several_calls(req: Any) -> bool:
    """May the reply hold several tool calls? Not with ``parallel_tool_calls: false``, nor
    when ``tool_choice`` names a function: OpenAI forces exactly one call of it then (as
    vLLM does), where a grammar allowing more lets a model go on to a second call that
    ``max_tokens`` cuts."""
    return req.parallel_tool_calls is not False and not _names_a_function(req.tool_choice)


def _names_a_function(choice: Any) -> bool:
    return isinstance(choice, dict) or getattr(choice, "name", None) is not None


def check(fields: dict[str, Any], field: str | None) -> dict[str, Any]:
    """``fields``, checked up front: 400 naming ``field`` when the constraint cannot compile."""
    if not fields:
        return fields
    try:
        check_grammar(SamplingParams(**fields))
    except ValueError as exc:
        raise bad_request(f"{field}: {exc}", field) from None
    return fields


def tool_specs(tools: list[Any]) -> list[ToolSpec]:
    """``ToolSpec``s of the request's (pydantic) tools."""
    return [ToolSpec(t.function.name, t.function.parameters, t.function.strict) for t in tools]


def with_tools_in_system(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tools described in the system message, as Qwen3's template
    writes them (for chat templates that have no tools section)."""
    block = _TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_TAIL
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + block}
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
