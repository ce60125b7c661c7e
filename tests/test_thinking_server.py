"""Forced structures with thinking on, through the official SDKs against ``nano-qwen3 serve``
(a subprocess; tiny random Qwen3, real tokenizer; effort budgets from a config file): every
endpoint's structure validates after a bounded thinking block, and the prompt that opened
``<think>`` keeps its thinking free."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.test_grammar import SCHEMAS
from tests.test_openai_client import serving

USER = [{"role": "user", "content": "Give me a city."}]
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}
THINK = {"151667": 100}  # logit_bias that pushes the random model into a thinking block
EFFORT_LOW = 6  # the config file's budget for "low"


@pytest.fixture(scope="module")
def server(tiny_qwen3_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "budgets.toml"
    config.write_text(f"[server]\nreasoning_effort_budgets = {{ low = {EFFORT_LOW} }}\n")
    with serving(tiny_qwen3_dir, "--config", str(config)) as url:
        yield url


def thought_tokens(logprobs) -> int:
    """Tokens between ``<think>`` and ``</think>`` in a chat choice's logprobs."""
    tokens = [t.token for t in logprobs.content]
    return tokens.index("</think>") - tokens.index("<think>") - 1


@settings(max_examples=4, deadline=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 1000))
def test_chat_json_schema_with_reasoning_effort(oai, schema, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    out = oai.chat.completions.create(model="tiny", messages=USER, response_format=fmt,
                                      reasoning_effort="low", max_tokens=120, temperature=1.0,
                                      seed=seed, logit_bias=THINK, logprobs=True)
    choice = out.choices[0]
    assert thought_tokens(choice.logprobs) <= EFFORT_LOW
    assert choice.message.model_extra["reasoning_content"] is not None
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)
    else:  # a random model may fill a big array: max_tokens ends it (never a "stop")
        assert choice.finish_reason == "length"


def test_chat_json_object_and_forced_tool_call(oai):
    out = oai.chat.completions.create(model="tiny", messages=USER, max_tokens=60, temperature=0,
                                      response_format={"type": "json_object"}, logit_bias=THINK,
                                      logprobs=True, extra_body={"thinking_budget": 4})
    assert thought_tokens(out.choices[0].logprobs) <= 4
    content = out.choices[0].message.content
    assert out.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = oai.chat.completions.create(
            model="tiny", messages=USER, max_tokens=60, temperature=0, tools=[tool],
            tool_choice=choice, parallel_tool_calls=False, logit_bias=THINK, logprobs=True,
            reasoning_effort="low")
        assert out.choices[0].finish_reason == "tool_calls"
        assert thought_tokens(out.choices[0].logprobs) <= EFFORT_LOW
        (call,) = out.choices[0].message.tool_calls
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_completions_prompt_that_opened_think(oai, tiny_qwen3_dir):
    tok = Tokenizer.from_pretrained(tiny_qwen3_dir)
    ids = tok.apply_chat_template(USER, tokenize=True) + tok.encode("<think>\n")
    free = oai.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    out = oai.completions.create(model="tiny", prompt=ids, max_tokens=40, temperature=0,
                                 extra_body={"response_format": fmt, "thinking_budget": 5})
    thinking, _, answer = out.choices[0].text.partition("</think>")
    assert thinking == free.choices[0].text  # the thinking is the model's own, unconstrained
    assert json.loads(answer)["city"] in ("Paris", "Rome")


@pytest.mark.parametrize("run", range(3))
def test_responses_text_format_and_forced_call_with_effort(oai, run):
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    resp = oai.responses.create(model="tiny", input="A city?", text={"format": fmt},
                                reasoning={"effort": "low"}, max_output_tokens=60,
                                temperature=1.0)
    assert resp.usage.output_tokens_details.reasoning_tokens <= EFFORT_LOW
    assert resp.status == "completed" and json.loads(resp.output_text)["city"] in ("Paris", "Rome")
    fn = {"type": "function", "name": "get_weather", "parameters": CITY}
    resp = oai.responses.create(model="tiny", input="Weather?", tools=[fn], temperature=1.0,
                                tool_choice="required", parallel_tool_calls=False,
                                max_output_tokens=60, extra_body={"thinking_budget": 3})
    assert resp.usage.output_tokens_details.reasoning_tokens <= 3
    (call,) = [item for item in resp.output if item.type == "function_call"]
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")


def test_messages_forced_tool_use_after_budgeted_thinking(claude):
    tool = {"name": "get_weather", "description": "Weather", "input_schema": CITY}
    kwargs = {"model": "tiny", "max_tokens": 60, "messages": USER, "tools": [tool],
              "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
              "thinking": {"type": "enabled", "budget_tokens": 5},
              "extra_body": {"temperature": 1.0}}
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.stop_reason == "tool_use" and msg.content[1].input["city"] in ("Paris", "Rome")
    events = list(claude.messages.create(stream=True, **kwargs))
    blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert blocks == ["thinking", "tool_use"]
    assert [e.delta.stop_reason for e in events if e.type == "message_delta"] == ["tool_use"]


def test_messages_budget_leaves_the_answer_room(claude):
    """budget_tokens ends the thinking; the answer follows within max_tokens (here it runs to
    it, so the stop reason says so), streamed or not, with no empty text block."""
    kwargs = {"model": "tiny", "max_tokens": 20, "messages": USER,
              "thinking": {"type": "enabled", "budget_tokens": 5},
              "extra_body": {"temperature": 0}}
    msg = claude.messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"] and msg.content[1].text
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 20
    events = list(claude.messages.create(stream=True, **kwargs))
    blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert blocks == ["thinking", "text"]


def test_budget_fields_are_checked(oai):
    with pytest.raises(openai.BadRequestError, match="not both"):
        oai.chat.completions.create(model="tiny", messages=USER, max_tokens=20,
                                    reasoning_effort="low", extra_body={"thinking_budget": 3})
    with pytest.raises(openai.BadRequestError, match="must be less than max_tokens"):
        oai.chat.completions.create(model="tiny", messages=USER, max_tokens=20,
                                    extra_body={"thinking_budget": 20})
