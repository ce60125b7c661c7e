"""A Lark grammar (llguidance dialect) that forces tool calls in the XML format of Qwen3.5 and
Qwen3-Coder::

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE
    </parameter>
    </function>
    </tool_call>

Parameters come in the schema's ``properties`` order, the required ones always, the others
optionally, no unknown ones. A string value is free text up to the first ``\\n</parameter>\\n``
(or one of its ``enum`` strings); any other value is JSON matching its sub-schema (``%json``),
which is what :func:`~.tool_xml.convert_value` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .parsers import TOOL_CLOSE, TOOL_OPEN
from .tool_xml import FUNCTION_CLOSE, FUNCTION_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, schema_types

# The JSON layout of non-string values (as the JSON tool grammar: compact, no free whitespace).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_VALUE_END = f"\n{PARAMETER_CLOSE}\n"
_DEFS = ("$defs", "definitions")
_NO_CLOSE = PARAMETER_CLOSE.replace("/", "\\/")


def xml_tool_call_rules(tokenizer: Any, tools: list[Any], parallel: bool = True,
                        top: str = "tool_calls") -> str:
    """Lark rules (no ``start``) whose rule ``top`` matches one call, or with ``parallel``
    several separated by a newline, to one of ``tools`` (``ToolSpec``s: ``name``,
    ``parameters``, ``strict``). Rule names other than ``top`` start with ``xml_``, so a
    caller can embed them (say, after an optional thinking block)."""
    if not tools:
        raise ValueError("a forced tool call needs at least one tool")
    open_, close = _marker(tokenizer, TOOL_OPEN), _marker(tokenizer, TOOL_CLOSE)
    rules = [f'{top}: xml_call ("\\n" xml_call)*' if parallel else f"{top}: xml_call",
             f'xml_call: {open_} "\\n" ({" | ".join(f"xml_fn{i}" for i in range(len(tools)))})'
             f' "\\n" {close}']
    for i, tool in enumerate(tools):
        rules += _function_rules(f"xml_fn{i}", tool)
    return "\n".join(rules)


def xml_tool_call_grammar(tokenizer: Any, tools: list[Any], parallel: bool = True) -> str:
    """The whole grammar: every output is XML tool calls (see :func:`xml_tool_call_rules`)."""
    return "start: tool_calls\n" + xml_tool_call_rules(tokenizer, tools, parallel)


def _function_rules(rule: str, tool: Any) -> list[str]:
    schema = tool.parameters if isinstance(tool.parameters, Mapping) else {}
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    head = _lark_str(f"{FUNCTION_OPEN}{tool.name}>\n")
    parts, rules = [head], []
    for j, (name, sub) in enumerate(properties.items()):
        value = f"{rule}_v{j}"
        rules.append(_value_rule(value, sub if isinstance(sub, Mapping) else {}, schema,
                                 bool(tool.strict)))
        param = _lark_str(PARAMETER_OPEN + name + ">\n") + " " + value
        parts.append(param if name in required else f"({param})?")
    parts.append(_lark_str(FUNCTION_CLOSE))
    return [f"{rule}: {' '.join(parts)}", *rules]


def _value_rule(rule: str, schema: Mapping[str, Any], root: Mapping[str, Any],
                strict: bool) -> str:
    """One parameter's value and the ``\\n</parameter>\\n`` after it."""
    types = schema_types(schema)
    if not types or "string" in types:
        values = schema.get("enum")
        if types == {"string"} and isinstance(values, list) and values:
            choices = " | ".join(_lark_str(v) for v in values)
            return f"{rule}: ({choices}) {_lark_str(_VALUE_END)}"
        # Text ended lazily by the first \n</parameter>\n, and without a </parameter> of its
        # own: the parser ends a value at the first one.
        return (f"{rule}[suffix={_lark_str(_VALUE_END)}]: /{_text_regex(schema)}/"
                f" & ~/(?s:.*){_NO_CLOSE}(?s:.*)/")
    sub = {**schema, **{k: root[k] for k in _DEFS if k in root and k not in schema}}
    sub["x-guidance"] = {**_JSON_STYLE, "lenient": not strict}
    return f"{rule}: %json {json.dumps(sub, ensure_ascii=False)} {_lark_str(_VALUE_END)}"


def _text_regex(schema: Mapping[str, Any]) -> str:
    """A string value's regex: its ``pattern`` (JSON Schema patterns are unanchored), else any
    text within ``minLength``/``maxLength``."""
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and pattern:
        anchored = pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$")
        body = pattern[1:-1] if anchored else f"(?s:.*)(?:{pattern})(?s:.*)"
        return body.replace("/", "\\/")
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) or isinstance(high, int):
        return f"(?s:.{{{low if isinstance(low, int) else 0},{high if isinstance(high, int) else ''}}})"
    return "(?s:.*)"


def _marker(tokenizer: Any, text: str) -> str:
    """A marker's token when the vocabulary has one (Qwen's ``<tool_call>``), else its text
    (llguidance matches special tokens only by id)."""
    backend = getattr(tokenizer, "backend", None)
    token = backend.token_to_id(text) if backend is not None else None
    return f"<[{token}]>" if token is not None else _lark_str(text)


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
