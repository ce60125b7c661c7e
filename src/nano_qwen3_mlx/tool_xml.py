"""Tool calls in the XML format of Qwen3.5 and Qwen3-Coder, and the per-prompt choice of format.

Those models write a call as::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Every value is raw text; its type comes from the tool's JSON schema (:func:`convert_value`).
:class:`ToolFormat` is what a rendered prompt asked for (the tokenizer's ``tool_call_format``
and the offered tools' schemas): it parses a whole reply or makes a streaming parser, for
either format, so the chat, Messages and Responses endpoints need not know which.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .parsers import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolCallStreamParser,
    extract_calls,
    new_tool_call_id,
    parse_tool_calls,
)

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"

# One call: XML functions (with or without their <tool_call> wrapper; several may share one),
# or a <tool_call> block holding Qwen3's JSON, which these models sometimes fall back to.
_CALL = re.compile(
    r"(?:<tool_call>\s*)?((?:<function=[^>\n]*>.*?</function>\s*)+)(?:</tool_call>)?"
    r"|<tool_call>(.*?)</tool_call>",
    re.DOTALL,
)
_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.DOTALL)
# A value ends at </parameter>; a model that forgets it ends it with the next parameter.
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
    "object": (dict,), "array": (list,),
}


def tool_call_format(tokenizer: Any) -> str:
    """``"xml"`` or ``"json"``: how the model behind ``tokenizer`` writes tool calls (its chat
    template decides, see ``Tokenizer.tool_call_format``; ``"json"`` when unknown)."""
    return getattr(tokenizer, "tool_call_format", "json")


def render_xml_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as Qwen3.5's chat template writes an assistant's call: strings verbatim,
    anything else as JSON."""
    params = "".join(f"{PARAMETER_OPEN}{key}>\n{_value_text(value)}\n{PARAMETER_CLOSE}\n"
                     for key, value in arguments.items())
    return f"{TOOL_OPEN}\n{FUNCTION_OPEN}{name}>\n{params}{FUNCTION_CLOSE}\n{TOOL_CLOSE}"


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def schema_types(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types a (sub)schema allows: ``type`` (one or a list), the types of its
    ``anyOf``/``oneOf`` branches, or of its ``enum``/``const`` values; empty when it says none."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    branches = [b for key in ("anyOf", "oneOf") for b in schema.get(key) or []
                if isinstance(b, Mapping)]
    if branches:
        return set().union(*(schema_types(b) for b in branches))
    values = schema.get("enum") or ([schema["const"]] if "const" in schema else [])
    return {_json_type(v) for v in values}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    for name in ("number", "null", "object", "array"):
        if isinstance(value, _JSON_TYPES[name]):
            return name
    return "string"


def convert_value(raw: str, schema: Mapping[str, Any] | None) -> Any:
    """A parameter's text as the value its schema asks for.

    A string (or untyped, or unknown) parameter keeps its text verbatim; otherwise the text is
    read as JSON and kept when it has one of the allowed types (an integral float counts as an
    integer, ``True``/``False`` as booleans); text that does not convert stays a string.
    """
    types = schema_types(schema) if schema is not None else set()
    if not types or "string" in types:
        return raw
    text = raw.strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        value = {"True": True, "False": False, "None": None}.get(text, raw)
    if isinstance(value, float) and value.is_integer() and "integer" in types \
            and "number" not in types:
        value = int(value)
    allowed = tuple(t for name in types for t in _JSON_TYPES.get(name, ()))
    if isinstance(value, bool) and "boolean" not in types:
        return raw
    return value if isinstance(value, allowed) else raw


def parse_xml_tool_calls(text: str, schemas: Mapping[str, Mapping[str, Any]] | None = None
                         ) -> tuple[str, list[dict[str, Any]]]:
    """Extract the calls of an XML-format reply: ``(content, tool_calls)`` as
    :func:`~.parsers.parse_tool_calls` returns them (content stripped, OpenAI shape).

    ``schemas`` maps a tool's name to its ``parameters`` schema, which types the values. A
    ``<tool_call>`` holding Qwen3's JSON is parsed too; a malformed block stays content.
    """
    def parse(match: re.Match) -> list[dict[str, Any]]:
        if match.group(1) is not None:
            return _functions(match.group(1), schemas or {})
        return parse_tool_calls(f"{TOOL_OPEN}{match.group(2)}{TOOL_CLOSE}")[1]

    return extract_calls(text, _CALL, parse)


def _functions(block: str, schemas: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    calls = []
    for match in _FUNCTION.finditer(block):
        name = match.group(1).strip()
        if not name:
            continue
        properties = (schemas.get(name) or {}).get("properties") or {}
        args = {}
        for param in _PARAMETER.finditer(match.group(2)):
            key = param.group(1).strip()
            args[key] = convert_value(_strip_one_newline(param.group(2)), properties.get(key))
        calls.append({"id": new_tool_call_id(), "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


def _strip_one_newline(value: str) -> str:
    """The value between the newline after ``<parameter=P>`` and the one before
    ``</parameter>`` (which the template writes around every value)."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """How a prompt asked the model to write tool calls (``kind``: ``"json"`` or ``"xml"``)
    and the parameter schemas of the tools it offered (name -> ``parameters``)."""

    kind: str = "json"
    schemas: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """``(content, tool_calls)`` of a whole reply."""
        if self.kind == "xml":
            return parse_xml_tool_calls(text, self.schemas)
        return parse_tool_calls(text)

    def stream_parser(self) -> ToolCallStreamParser:
        """A fresh streaming parser for one reply."""
        if self.kind == "xml":
            return ToolCallStreamParser(self.parse, (TOOL_OPEN, FUNCTION_OPEN))
        return ToolCallStreamParser()


def tool_format(tokenizer: Any, tools: list[dict[str, Any]] | None) -> ToolFormat:
    """The :class:`ToolFormat` of a prompt rendered by ``tokenizer`` with ``tools`` (OpenAI's
    ``{"type": "function", "function": {"name", "parameters"}}`` dicts, or None)."""
    schemas = {}
    for tool in tools or []:
        function = tool.get("function") or {}
        if isinstance(function.get("name"), str):
            schemas[function["name"]] = function.get("parameters") or {}
    return ToolFormat(tool_call_format(tokenizer), schemas)
