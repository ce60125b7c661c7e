"""Constrained decoding on a random-weight checkpoint: any output is possible, so only the
grammar can make it valid. Masks apply per row; unconstrained neighbours are untouched."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.parsers import parse_tool_calls
from nano_qwen3_mlx.structured import ToolSpec, tool_call_grammar

FREE = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, seed=7, max_tokens=24)]


@pytest.fixture(scope="module")
def llm(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=1024, block_size=16, max_num_seqs=128) as llm:
        yield llm


# ---- a strategy of JSON schemas a random model can finish within max_tokens -------------
_LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-1000, 1000), st.integers(0, 500)),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=4, unique=True)
    .map(lambda vals: {"enum": vals}),
    st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(red|green|blue)$"])
    .map(lambda p: {"type": "string", "pattern": p}),
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
)


def _object(children):
    props = st.dictionaries(st.sampled_from(["id", "name", "tags", "x", "nested"]), children,
                            min_size=1, max_size=3)
    return props.map(lambda p: {"type": "object", "properties": p, "required": sorted(p),
                                "additionalProperties": False})


def _array(children):
    return st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo,
                                              "maxItems": lo + extra},
                     children, st.integers(0, 2), st.integers(0, 2))


SCHEMAS = st.recursive(_LEAVES, lambda c: st.one_of(_object(c), _array(c)), max_leaves=5)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(SCHEMAS, min_size=4, max_size=4), seed=st.integers(0, 1000))
def test_json_schema_outputs_validate_and_neighbours_are_untouched(llm, schemas, seed):
    constrained = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=48, json_schema=s,
                                  logprobs=1) for i, s in enumerate(schemas)]
    results = llm.generate(["Hi"] * 4 + ["Hello", "Hello"], constrained + FREE)
    alone = llm.generate(["Hello", "Hello"], FREE)
    assert [r["token_ids"] for r in results[4:]] == [r["token_ids"] for r in alone]
    for schema, result in zip(schemas, results):
        if result["finish_reason"] == "stop":
            jsonschema.validate(json.loads(result["generated_text"]), schema)
        else:
            assert result["finish_reason"] == "length"
        # logprobs are those of the masked distribution: the chosen token has a finite one.
        assert all(math.isfinite(lp["logprob"]) for lp in result["logprobs"])
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_most_bounded_schemas_finish_and_validate(llm):
    schema = {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                 "maxItems": 2}},
        "required": ["age", "colour", "tags"], "additionalProperties": False}
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=64, json_schema=schema)
              for i in range(8)]
    results = llm.generate(["Describe a person."] * 8, params)
    stopped = [r for r in results if r["finish_reason"] == "stop"]
    assert len(stopped) >= 6
    for r in stopped:
        jsonschema.validate(json.loads(r["generated_text"]), schema)


def test_regex_choice_and_lark_grammars(llm):
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=20, regex=r"[0-9]{3}-[a-c]{2}"),
              SamplingParams(temperature=1.0, seed=2, max_tokens=20, choice=["yes", "no", "maybe"]),
              SamplingParams(temperature=0, max_tokens=20, grammar='start: "(" NUM ")"\nNUM: /[1-9][0-9]?/')]
    texts = [r["generated_text"] for r in llm.generate(["Q"] * 3, params)]
    assert len(texts[0]) == 6 and texts[0][3] == "-"
    assert texts[1] in ("yes", "no", "maybe")
    assert texts[2].startswith("(") and texts[2].endswith(")") and 1 <= int(texts[2][1:-1]) <= 99


def test_grammar_that_cannot_finish_ends_with_length(llm):
    r = llm.generate_single("Q", SamplingParams(temperature=0, max_tokens=5, regex="[0-9]{60}"))
    assert r["finish_reason"] == "length" and r["generated_text"].isdigit()


@pytest.mark.parametrize("params, message", [
    (dict(json_schema={"type": "objectx"}), "invalid json_schema: Invalid type: objectx"),
    (dict(json_schema={"type": "string", "format": "nope"}), "Unknown format"),
    (dict(regex="[a-z"), "unclosed character class"),
    (dict(grammar="start: undefined_rule"), "invalid grammar"),
    (dict(regex="a", grammar_thinking="later"), "grammar_thinking must be one of"),
])
def test_bad_grammars_raise_value_error_and_leave_the_engine_serving(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["Q", "Q"], [SamplingParams(max_tokens=4), SamplingParams(**params)])
    assert llm.generate_single("Q", SamplingParams(max_tokens=3))["finish_reason"] == "length"
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_non_strict_schema_ignores_keywords_it_cannot_enforce(llm):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False, "if": {"type": "object"}}
    with pytest.raises(ValueError, match="if"):
        llm.generate_single("Q", SamplingParams(json_schema=schema))
    r = llm.generate_single("Q", SamplingParams(temperature=0, max_tokens=16, json_schema=schema,
                                                strict=False))
    assert json.loads(r["generated_text"]) in ({"a": True}, {"a": False})


def test_sampling_params_reject_two_constraints_and_bad_types():
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{nope")
    with pytest.raises(ValueError, match="choice must be"):
        SamplingParams(choice=[])
    assert SamplingParams(json_schema='{"type": "integer"}').json_schema == {"type": "integer"}


def test_forced_tool_calls_have_valid_arguments(llm):
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                "unit": {"enum": ["c", "f"]}},
               "required": ["city", "unit"], "additionalProperties": False}
    add = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
           "required": ["a"], "additionalProperties": False}
    tools = [ToolSpec("get_weather", weather, strict=True), ToolSpec("add", add, strict=True)]
    required = tool_call_grammar(llm.tokenizer, tools, parallel=False)
    named = tool_call_grammar(llm.tokenizer, tools[:1], parallel=False)
    # Greedy over 100 different prompts: 100 calls in one batch, no per-row noise to draw.
    params = [SamplingParams(temperature=0, max_tokens=40, grammar=required if i % 2 else named)
              for i in range(100)]
    results = llm.generate([f"Call tool {i}." for i in range(100)], params)
    schemas = {"get_weather": weather, "add": add}
    for i, r in enumerate(results):
        assert r["finish_reason"] == "stop", r["generated_text"]
        content, calls = parse_tool_calls(r["generated_text"])
        assert content == "" and len(calls) == 1
        name = calls[0]["function"]["name"]
        assert name == "get_weather" or i % 2
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])
    assert {parse_tool_calls(r["generated_text"])[1][0]["function"]["name"]
            for r in results[1::2]} == {"get_weather", "add"}
