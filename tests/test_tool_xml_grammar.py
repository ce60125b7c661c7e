"""The grammar that forces XML tool calls: llguidance accepts exactly the calls it should, and
a random-weight model forced by it writes calls that parse and validate against the schema."""

from __future__ import annotations

import json

import jsonschema
import llguidance as llg
import pytest
from hypothesis import HealthCheck, given, settings

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.structured import ToolSpec, tool_call_grammar
from nano_qwen3_mlx.tokenizer import Tokenizer
from nano_qwen3_mlx.tool_xml import parse_xml_tool_calls, render_xml_tool_call
from nano_qwen3_mlx.tool_xml_grammar import xml_tool_call_grammar, xml_tool_call_rules
from tests.qwen35_template import write_qwen35_checkpoint
from tests.test_tool_xml import _calls

WEATHER = {"type": "object", "required": ["city", "days"], "additionalProperties": False,
           "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                          "unit": {"enum": ["c", "f"]}, "code": {"type": "string", "pattern": "^[A-Z]{2}$"},
                          "opts": {"type": "object", "properties": {"x": {"type": "boolean"}},
                                   "required": ["x"], "additionalProperties": False}}}
TOOLS = [ToolSpec("get_weather", WEATHER, strict=True), ToolSpec("now", None)]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def lltokenizer(tokenizer) -> llg.LLTokenizer:
    return llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                           eos_token=list(tokenizer.eos_token_ids))


def _accepts(lltokenizer, tokenizer, grammar: str, text: str) -> bool:
    matcher = llg.LLMatcher(lltokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


def _weather(**args) -> str:
    return render_xml_tool_call("get_weather", {"city": "Paris", "days": 3, **args})


@pytest.mark.parametrize(("text", "ok"), [
    (_weather(), True),
    (_weather(city="Paris\nFrance", unit="f", code="FR", opts={"x": True}), True),
    (_weather(city=""), True),
    (render_xml_tool_call("now", {}), True),
    (_weather() + "\n" + render_xml_tool_call("now", {}), True),  # parallel calls
    (_weather(days="three"), False),  # not an integer
    (_weather(city="a</parameter>b"), False),  # the parser would end the value early
    (_weather(unit="k"), False),  # not in the enum
    (_weather(code="fr"), False),  # does not match the pattern
    (_weather(opts={"y": 1}), False),  # object fails its schema
    (render_xml_tool_call("get_weather", {"days": 3}), False),  # required city missing
    (_weather(extra=1), False),  # unknown parameter
    (render_xml_tool_call("nope", {}), False),  # unknown tool
    ("Sure! " + _weather(), False),  # nothing before the call
    (_weather().replace("</parameter>\n</function>", "</function>"), False),
])
def test_grammar_accepts_exactly_valid_calls(lltokenizer, tokenizer, text, ok):
    assert _accepts(lltokenizer, tokenizer, xml_tool_call_grammar(tokenizer, TOOLS), text) is ok


def test_single_call_and_embeddable_rules(lltokenizer, tokenizer):
    two = _weather() + "\n" + render_xml_tool_call("now", {})
    single = xml_tool_call_grammar(tokenizer, TOOLS, parallel=False)
    assert _accepts(lltokenizer, tokenizer, single, _weather())
    assert not _accepts(lltokenizer, tokenizer, single, two)
    # The rules embed under another start, e.g. after an optional thinking block.
    wrapped = ('start: think? tool_calls\nthink: <[151667]> /(?s:.*)/ <[151668]> "\\n\\n"\n'
               + xml_tool_call_rules(tokenizer, TOOLS))
    assert _accepts(lltokenizer, tokenizer, wrapped, "<think>\nhm\n</think>\n\n" + two)
    assert _accepts(lltokenizer, tokenizer, wrapped, two)
    with pytest.raises(ValueError):
        xml_tool_call_rules(tokenizer, [])


@pytest.fixture(scope="module")
def llm(tmp_path_factory, qwen_tokenizer_dir):
    path = write_qwen35_checkpoint(tmp_path_factory.mktemp("tiny-qwen35"), qwen_tokenizer_dir)
    with LLM(str(path), num_kv_blocks=512, block_size=16, max_num_seqs=64) as llm:
        yield llm


def test_forced_generation_writes_calls_that_validate(llm):
    """A random model only writes valid calls because the grammar leaves it nothing else."""
    assert llm.tokenizer.tool_call_format == "xml"
    add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "sure": {"type": "boolean"}},
           "required": ["a", "sure"], "additionalProperties": False}
    city = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                             "tags": {"type": "array", "items": {"enum": [1, 2]},
                                                      "maxItems": 2}},
            "required": ["city"], "additionalProperties": False}
    tools = [ToolSpec("add", add, strict=True), ToolSpec("city", city, strict=True)]
    grammar = tool_call_grammar(llm.tokenizer, tools, parallel=False)  # picks the XML format
    assert "<function=add>" in grammar
    params = [SamplingParams(temperature=0, max_tokens=60, grammar=grammar) for _ in range(32)]
    results = llm.generate([f"Call a tool {i}." for i in range(32)], params)
    schemas = {"add": add, "city": city}
    for r in results:
        assert r["finish_reason"] == "stop", r["generated_text"]
        content, calls = parse_xml_tool_calls(r["generated_text"], schemas)
        assert content == "" and len(calls) == 1
        name = calls[0]["function"]["name"]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_calls())
def test_grammar_accepts_every_rendered_call(lltokenizer, tokenizer, drawn):
    """Whatever the parameter types, a call Qwen3.5's template would render (every parameter
    given, in schema order) is in the grammar, and reads back as the same arguments."""
    calls, schemas = drawn
    tools = [ToolSpec(name, schema) for name, schema in schemas.items()]
    text = "\n".join(render_xml_tool_call(name, args) for name, args in calls)
    assert _accepts(lltokenizer, tokenizer, xml_tool_call_grammar(tokenizer, tools), text)
    parsed = parse_xml_tool_calls(text, schemas)[1]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == calls
