"""The ``openai`` and ``anthropic`` SDKs against ``nano-qwen3 serve`` on a tiny random Qwen3
checkpoint whose chat template is Qwen3.5-style: tools in the XML call format, ``<think>``
opened by the generation prompt. Forced calls come back typed on all three APIs, a reply that
starts inside thinking is split into reasoning and content, a call history renders."""

from __future__ import annotations

import json

import jsonschema
import pytest

from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.qwen35_template import write_qwen35_checkpoint
from tests.test_openai_client import serving

pytestmark = pytest.mark.slow
USER = [{"role": "user", "content": "Weather in Paris?"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "metric"],
          "properties": {"city": {"enum": ["Paris", "Rome"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7},
                         "metric": {"type": "boolean"}}}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                              "parameters": SCHEMA}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen_tokenizer_dir):
    return write_qwen35_checkpoint(tmp_path_factory.mktemp("tiny-qwen35"), qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with serving(model_dir) as url:
        yield url


def _typed(args: dict) -> dict:
    """The arguments validate, and their values have the schema's types (not strings)."""
    jsonschema.validate(args, SCHEMA)
    assert type(args["days"]) is int and type(args["metric"]) is bool
    return args


def test_forced_call_on_chat_messages_and_responses(oai, claude):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        resp = oai.chat.completions.create(
            model="tiny", messages=USER, tools=[CHAT_TOOL], tool_choice=choice, max_tokens=80,
            temperature=0, parallel_tool_calls=False, extra_body=NO_THINK)
        assert resp.choices[0].finish_reason == "tool_calls"
        (call,) = resp.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        args = _typed(json.loads(call.function.arguments))
    stream = oai.chat.completions.create(
        model="tiny", messages=USER, tools=[CHAT_TOOL], tool_choice="required", max_tokens=80,
        temperature=0, parallel_tool_calls=False, extra_body=NO_THINK, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed = [tc for d in deltas for tc in d.tool_calls or []]
    assert json.loads(streamed[0].function.arguments) == args  # same greedy call
    assert not "".join(d.content or "" for d in deltas)

    tool = {"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}
    msg = claude.messages.create(model="tiny", max_tokens=80, messages=USER, tools=[tool],
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                 extra_body={"temperature": 0})
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["tool_use"]
    assert _typed(msg.content[0].input) == args  # the same prompt, the same greedy call

    fn = {"type": "function", "name": "get_weather", "parameters": SCHEMA}
    resp = oai.responses.create(model="tiny", input=USER[0]["content"], tools=[fn],
                                tool_choice="required", parallel_tool_calls=False,
                                max_output_tokens=80, temperature=0, reasoning={"effort": "none"})
    assert [item.type for item in resp.output] == ["function_call"]
    assert _typed(json.loads(resp.output[0].arguments)) == args


def test_reply_that_starts_inside_thinking_is_split(oai, claude, model_dir):
    """The template opened ``<think>``: the reply is reasoning until the model's ``</think>``."""
    whole = oai.chat.completions.create(model="tiny", messages=USER, max_tokens=12, temperature=0)
    reasoning = whole.choices[0].message.reasoning_content
    assert reasoning and whole.choices[0].message.content == ""  # never closed: all reasoning
    stream = oai.chat.completions.create(model="tiny", messages=USER, max_tokens=12,
                                         temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == reasoning
    assert not "".join(d.content or "" for d in deltas)
    # The reasoning is what the model writes right after the template's "<think>\n".
    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(USER, tokenize=True, enable_thinking=True)
    assert tokenizer.decode(ids).endswith("<think>\n")
    first = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert reasoning == first.choices[0].text.strip("\n")

    # Anthropic with a thinking budget: <think> is not opened a second time; the forced close
    # ends the thinking block and the answer is a text block, streamed as such.
    kwargs = {"model": "tiny", "max_tokens": 20, "messages": USER,
              "thinking": {"type": "enabled", "budget_tokens": 6}, "extra_body": {"temperature": 0}}
    assert claude.messages.count_tokens(model="tiny", messages=USER,
                                        thinking=kwargs["thinking"]).input_tokens == len(ids)
    events = list(claude.messages.create(**kwargs, stream=True))
    blocks = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert blocks == ["thinking", "text"]
    thinking = "".join(e.delta.thinking for e in events
                       if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
    # The model's own first tokens after the template's "<think>\n" (none of ours before them).
    assert thinking and reasoning.startswith(thinking.strip("\n"))

    events = list(oai.responses.create(model="tiny", input=USER[0]["content"],
                                       max_output_tokens=12, temperature=0, stream=True))
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added[0] == "reasoning"
    text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == reasoning


def test_call_history_with_client_argument_strings_renders(oai, model_dir):
    """The XML template walks a call's arguments as a mapping; clients send a JSON string."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    resp = oai.chat.completions.create(model="tiny", messages=history, tools=[CHAT_TOOL],
                                       max_tokens=4, temperature=0, extra_body=NO_THINK)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([*history[:1], {**history[1], "content": ""},
                                          history[2]], tools=[CHAT_TOOL], enable_thinking=False)
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in text
    assert resp.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
