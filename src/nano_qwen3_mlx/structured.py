"""Structured output for the API surfaces: OpenAI ``response_format``, forced tool calls
(``tool_choice`` required / named) and vLLM's ``guided_*`` fields, as ``SamplingParams``
constraint fields that the engine compiles (``engine/grammar.py``).

Every endpoint (chat, completions, responses, messages) builds its constraint here, so the
same request means the same grammar everywhere. The engine puts each one behind Qwen3's
optional thinking block (``engine/grammar.py``, ``thinking_grammar``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .parsers import TOOL_CLOSE, TOOL_OPEN
from .tool_xml import tool_call_format
from .tool_xml_grammar import xml_tool_call_grammar

# The JSON layout the grammars force (OpenAI's compact style, no free whitespace).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(slots=True)
class ToolSpec:
    """One function the model may be made to call."""

    name: str
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


def response_format_fields(response_format: dict[str, Any] | None) -> dict[str, Any]:
    """``SamplingParams`` fields for an OpenAI ``response_format`` (``{}`` for text/None).

    Raises ``ValueError`` for an unknown type or a ``json_schema`` without a schema.
    """
    if not response_format:
        return {}
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format.json_schema must be an object with a `schema` object")
        schema = spec.get("schema") or {}
        return {"json_schema": schema, "strict": bool(spec.get("strict", True))}
    raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")


def guided_fields(*, json_schema: Any = None, regex: str | None = None,
                  choice: list[str] | None = None, grammar: str | None = None,
                  json_object: bool = False) -> dict[str, Any]:
    """``SamplingParams`` fields for vLLM's ``guided_json``/``guided_regex``/``guided_choice``/
    ``guided_grammar`` (Lark)."""
    fields: dict[str, Any] = {}
    if json_object:
        fields["json_schema"] = {"type": "object"}
    if json_schema is not None:
        fields["json_schema"] = json_schema
    for name, value in (("regex", regex), ("choice", choice), ("grammar", grammar)):
        if value is not None:
            fields[name] = value
    if len(fields) > 1:
        raise ValueError(f"give at most one guided_* field, got {len(fields)}")
    return fields


def tool_call_grammar(tokenizer: Any, tools: list[ToolSpec], parallel: bool = True) -> str:
    """A Lark grammar whose every output is one (or, with ``parallel``, several) Qwen3 tool
    calls ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` to one of
    ``tools``, with arguments that validate against the tool's ``parameters``. A model whose
    template writes calls in the XML format (Qwen3.5) gets :func:`xml_tool_call_grammar`."""
    if tool_call_format(tokenizer) == "xml":
        return xml_tool_call_grammar(tokenizer, tools, parallel)
    if not tools:
        raise ValueError("a forced tool call needs at least one tool")
    open_, close = _literal(tokenizer, TOOL_OPEN), _literal(tokenizer, TOOL_CLOSE)
    rules = ['start: call ("\\n" call)*' if parallel else "start: call"]
    rules.append("call: " + " | ".join(f"call{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        head = '\n{"name": ' + json.dumps(tool.name, ensure_ascii=False) + ', "arguments": '
        tail = _lark_str("}\n")
        rules.append(f"call{i}: {open_} {_lark_str(head)} args{i} {tail} {close}")
        rules.append(f"args{i}: %json {json.dumps(_schema(tool), ensure_ascii=False)}")
    return "\n".join(rules)


def _schema(tool: ToolSpec) -> dict[str, Any]:
    params = tool.parameters if tool.parameters else {"type": "object", "properties": {}}
    style = {**_JSON_STYLE, "lenient": not tool.strict}
    return {**params, "x-guidance": style}


def _literal(tokenizer: Any, text: str) -> str:
    """The Lark terminal for a marker: its token when the vocabulary has one (Qwen3's
    ``<tool_call>``), else its text (llguidance matches added tokens only by id)."""
    backend = getattr(tokenizer, "backend", None)
    token = backend.token_to_id(text) if backend is not None else None
    return f"<[{token}]>" if token is not None else _lark_str(text)


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
