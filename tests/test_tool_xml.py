"""Qwen3.5 / Qwen3-Coder XML tool calls: parsing (whole and streamed), values typed by the
schema, the format read from the chat template, a template that opens ``<think>``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.parsers import prompt_opens_thinking, prompt_thinking
from nano_qwen3_mlx.tokenizer import Tokenizer, template_tool_call_format
from nano_qwen3_mlx.tool_xml import (
    ToolFormat,
    convert_value,
    parse_xml_tool_calls,
    render_xml_tool_call,
    tool_format,
)
from tests.qwen35_template import QWEN35_TEMPLATE

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                            "hot": {"type": "boolean"}}}
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


def _args(call: dict) -> dict:
    return json.loads(call["function"]["arguments"])


def _cut(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.fixture(scope="module")
def qwen35(qwen_tokenizer_dir) -> Tokenizer:
    base = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    return Tokenizer(base.backend, chat_template=QWEN35_TEMPLATE, eos_token_ids=base.eos_token_ids,
                     eos_token=base.eos_token)


def test_parse_several_calls_with_typed_values():
    text = f"Let me look.\n\n{CALL}\n{render_xml_tool_call('now', {})}"
    content, calls = parse_xml_tool_calls(text, {"get_weather": WEATHER})
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert _args(calls[0]) == {"city": "Paris", "days": 3} and _args(calls[1]) == {}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]


def test_unwrapped_function_missing_parameter_close_and_json_fallback():
    bare = "<function=get_weather>\n<parameter=city>\nRome\n<parameter=days>\n2\n</function>"
    assert _args(parse_xml_tool_calls(bare, {"get_weather": WEATHER})[1][0]) == \
        {"city": "Rome", "days": 2}
    mixed = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert _args(parse_xml_tool_calls(mixed)[1][0]) == {"a": 1}


@pytest.mark.parametrize("text", ["no calls", "<tool_call>\n<function=f>\nno close",
                                  "<tool_call>\n{not json}\n</tool_call>", "<function=>x</function>"])
def test_malformed_calls_stay_content(text):
    assert parse_xml_tool_calls(text) == (text, [])


@pytest.mark.parametrize(("raw", "schema", "value"), [
    ("3", {"type": "integer"}, 3),
    ("3.0", {"type": "integer"}, 3),
    ("3.5", {"type": "integer"}, "3.5"),  # fails conversion: kept as text
    ("2.5", {"type": "number"}, 2.5),
    ("true", {"type": "boolean"}, True),
    ("False", {"type": "boolean"}, False),  # Python's spelling, as the template writes it
    ("1", {"type": "boolean"}, "1"),
    ("true", {"type": "integer"}, "true"),
    ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("[1, 2]", {"type": "object"}, "[1, 2]"),
    ("null", {"type": ["integer", "null"]}, None),
    ("7", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 7),
    ("7", {"type": "string"}, "7"),
    ("7", {"type": ["string", "integer"]}, "7"),  # a string is allowed: kept verbatim
    ("7", {}, "7"),  # untyped
    ("7", None, "7"),  # unknown parameter
    ("2", {"enum": [1, 2]}, 2),
])
def test_convert_value_by_schema(raw, schema, value):
    assert convert_value(raw, schema) == value
    assert type(convert_value(raw, schema)) is type(value)


_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
_TEXT = st.text(max_size=30).filter(
    lambda s: not any(tag in s for tag in ("</parameter>", "<parameter=", "</function>")))
_VALUES = {
    "string": _TEXT,
    "integer": st.integers(-10**12, 10**12),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "boolean": st.booleans(),
    "array": st.lists(st.integers(), max_size=3),
    # Keys without raw control characters: Qwen3.5's template renders objects with `tojson`,
    # which escapes them (U+007F too), and llguidance's JSON strings do not admit raw DEL.
    "object": st.dictionaries(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=4),
                              st.integers(), max_size=3),
}


@st.composite
def _calls(draw):
    """``(calls as (name, arguments), schemas)``: tools whose parameters have random types."""
    calls, schemas = [], {}
    for name in draw(st.lists(_NAMES, min_size=1, max_size=3, unique=True)):
        params = draw(st.dictionaries(_NAMES, st.sampled_from(sorted(_VALUES)), max_size=4))
        schemas[name] = {"type": "object",
                         "properties": {p: {"type": t} for p, t in params.items()}}
        calls.append((name, {p: draw(_VALUES[t]) for p, t in params.items()}))
    return calls, schemas


@settings(max_examples=200, deadline=None)
@given(drawn=_calls(), prefix=st.text("ab \n.", max_size=12),
       cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_render_parse_round_trip_whole_and_streamed(drawn, prefix, cuts):
    calls, schemas = drawn
    text = prefix + "\n".join(render_xml_tool_call(name, args) for name, args in calls)
    content, parsed = parse_xml_tool_calls(text, schemas)
    assert content == prefix.strip()
    assert [(c["function"]["name"], _args(c)) for c in parsed] == calls
    parser = ToolFormat("xml", schemas).stream_parser()
    sent = "".join(parser.feed(piece) for piece in _cut(text, cuts))
    rest, streamed = parser.flush()
    assert sent == prefix and rest == ""
    assert [(c["function"]["name"], _args(c)) for c in streamed] == calls


def test_stream_parser_holds_only_what_may_open_a_call():
    parser = ToolFormat("xml", {}).stream_parser()
    assert parser.feed("a <func") == "a "
    assert parser.feed("tional>") == "<functional>"
    assert parser.flush() == ("", [])


def test_json_format_parses_qwen3_calls():
    fmt = ToolFormat()
    _, calls = fmt.parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert _args(calls[0]) == {"a": 1}
    assert fmt.parse(CALL)[1] == []  # a Qwen3 model's reply is not read as XML


def test_format_read_from_the_chat_template(qwen35, qwen_tokenizer_dir):
    assert qwen35.tool_call_format == "xml"
    qwen3 = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    assert qwen3.tool_call_format == "json"
    assert Tokenizer(qwen3.backend).tool_call_format == "json"  # ChatML: no tools section
    assert template_tool_call_format(None) == "json"
    # A Llama-style template that wants JSON inside <function=...> is not this format.
    assert template_tool_call_format('<function=example>{"a": 1}</function>') == "json"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    assert tool_format(qwen35, tools) == ToolFormat("xml", {"get_weather": WEATHER})
    assert tool_format(object(), None) == ToolFormat("json", {})


def test_xml_template_renders_client_arguments_strings(qwen35):
    """OpenAI clients send a call's arguments as a JSON string; the template needs a mapping."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = qwen35.apply_chat_template(messages, add_generation_prompt=False)
    assert CALL in text and "<tool_response>\nsunny\n</tool_response>" in text


def test_prompt_opening_think_starts_the_reply_in_reasoning(qwen35, qwen_tokenizer_dir):
    user = [{"role": "user", "content": "hi"}]
    on = qwen35.apply_chat_template(user, tokenize=True)
    off = qwen35.apply_chat_template(user, tokenize=True, enable_thinking=False)
    assert qwen35.decode(on).endswith("<think>\n")
    assert prompt_opens_thinking(qwen35, on) and not prompt_opens_thinking(qwen35, off)
    assert prompt_opens_thinking(qwen35, qwen35.decode(on))
    assert prompt_thinking(qwen35, on) == (True, True)
    assert prompt_thinking(qwen35, off) == (False, False)
    qwen3 = Tokenizer.from_pretrained(qwen_tokenizer_dir)
    assert not prompt_opens_thinking(qwen3, qwen3.apply_chat_template(user, tokenize=True))
