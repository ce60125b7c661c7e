"""The official ``anthropic`` and ``openai`` SDKs against ``nano-qwen3 serve`` (a subprocess,
tiny random Qwen3): /v1/messages, /v1/responses and /v1/embeddings on the one engine."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import anthropic  # dev dependencies: a missing client must fail, not skip
import numpy as np
import openai
import pytest

from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.test_embeddings import cosine, oracle_embedding
from tests.test_openai_client import serving

KEY = "test-key"
USER = [{"role": "user", "content": "Hi there"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def server(tiny_qwen3_dir):
    with serving(tiny_qwen3_dir, "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def chat(oai, messages, max_tokens=8, **extra):
    return oai.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                       temperature=0, extra_body={**NO_THINK, **extra})


def create(claude, **kwargs):
    # Current anthropic SDKs take temperature/top_p/top_k only through extra_body.
    return claude.messages.create(**{"model": "tiny", "max_tokens": 8, "messages": USER,
                                     "extra_body": {"temperature": 0}, **kwargs})


def anthropic_input(usage) -> int:
    """The whole prompt: Anthropic counts cache reads and writes apart from input_tokens."""
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_messages_create_equals_chat_and_system_counts(claude, oai):
    msg = create(claude)
    same = chat(oai, USER)
    assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "max_tokens"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == same.choices[0].message.content
    assert (anthropic_input(msg.usage), msg.usage.output_tokens) == (same.usage.prompt_tokens, 8)
    system = create(claude, system="You are terse.")
    with_system = chat(oai, [{"role": "system", "content": "You are terse."}, *USER])
    assert system.content[0].text == with_system.choices[0].message.content
    counted = claude.messages.count_tokens(model="tiny", system="You are terse.", messages=USER)
    assert counted.input_tokens == anthropic_input(system.usage) == with_system.usage.prompt_tokens


def test_messages_stream_event_order_and_text(claude):
    full = create(claude, max_tokens=12)
    events = list(create(claude, max_tokens=12, stream=True))
    kinds = [e.type for e in events]
    # (the SDK drops the ping events; test_agent_apis_unit sees them on the wire)
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == full.content[0].text
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 12
    with claude.messages.stream(model="tiny", max_tokens=12, messages=USER,
                                extra_body={"temperature": 0}) as s:
        assert s.get_final_message().content[0].text == full.content[0].text


def test_stop_sequences(claude):
    full = create(claude, max_tokens=12).content[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    msg = create(claude, max_tokens=12, stop_sequences=[stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == full[:full.index(stop)]


def test_tool_round_trip_renders_like_chat_tools(claude, oai):
    """tool_use then tool_result: the prompt is the one the OpenAI tool messages render."""
    history = [*USER,
               {"role": "assistant", "content": [
                   {"type": "text", "text": "Let me check."},
                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                    "input": {"city": "Paris"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": "22 C, sunny"}]}]
    msg = create(claude, messages=history, tools=[WEATHER])
    openai_history = [*USER,
                      {"role": "assistant", "content": "Let me check.", "tool_calls": [
                          {"id": "toolu_1", "type": "function", "function": {
                              "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "toolu_1", "content": "22 C, sunny"}]
    tool = {"type": "function", "function": {"name": "get_weather",
                                             "description": "Weather of a city",
                                             "parameters": WEATHER["input_schema"]}}
    same = chat(oai, openai_history, tools=[tool])
    assert anthropic_input(msg.usage) == same.usage.prompt_tokens
    assert msg.content[0].text == (same.choices[0].message.content or "")


CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}


def test_forced_tool_use_and_json_schema_output(claude, oai):
    """Constrained decoding makes even the random model call the tool / answer the schema."""
    tool = {**WEATHER, "input_schema": CITY}
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        msg = create(claude, max_tokens=40, tools=[tool],
                     tool_choice={**choice, "disable_parallel_tool_use": True})
        assert msg.stop_reason == "tool_use" and msg.content[-1].type == "tool_use"
        assert msg.content[-1].input["city"] in ("Paris", "Rome")
    thought = create(claude, max_tokens=60, tools=[tool], tool_choice={"type": "any"},
                     thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.type for b in thought.content] == ["thinking", "tool_use"]
    fn = {"type": "function", "name": "get_weather", "parameters": CITY}
    resp = oai.responses.create(model="tiny", input="Weather?", tools=[fn], temperature=0,
                                tool_choice="required", parallel_tool_calls=False,
                                max_output_tokens=40, reasoning={"effort": "none"})
    assert [item.type for item in resp.output] == ["function_call"]
    assert json.loads(resp.output[0].arguments)["city"] in ("Paris", "Rome")
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    resp = oai.responses.create(model="tiny", input="A city?", text={"format": fmt},
                                max_output_tokens=40, temperature=0,
                                reasoning={"effort": "none"})
    assert resp.status == "completed" and json.loads(resp.output_text)["city"] in ("Paris", "Rome")


def test_thinking_block_capped_by_budget(claude, oai, tiny_qwen3_dir):
    kwargs = {"max_tokens": 24, "thinking": {"type": "enabled", "budget_tokens": 8}}
    msg = create(claude, **kwargs)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    # The thinking is the model's first 8 tokens after the opened <think>.
    tokenizer = Tokenizer.from_pretrained(tiny_qwen3_dir)
    ids = tokenizer.apply_chat_template(USER, tokenize=True, enable_thinking=True)
    ids += tokenizer.encode("<think>\n", add_special_tokens=False)
    first = oai.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert msg.content[0].thinking == first.choices[0].text.strip("\n")
    assert msg.content[1].text and msg.usage.output_tokens == 24
    streamed = list(create(claude, stream=True, **kwargs))
    blocks = [e.content_block.type for e in streamed if e.type == "content_block_start"]
    assert blocks == ["thinking", "text"]
    thinking = "".join(e.delta.thinking for e in streamed
                       if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
    assert thinking == msg.content[0].thinking


def test_wrong_api_key_is_401_in_anthropic_shape(server):
    bad = anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        create(bad)
    assert info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        create(anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0), max_tokens=0)
    assert info.value.body["type"] == "error"


def test_responses_plain_streamed_and_instructions(oai):
    resp = oai.responses.create(model="tiny", input="Hi there", max_output_tokens=8,
                                temperature=0, reasoning={"effort": "none"})
    same = chat(oai, USER)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == same.choices[0].message.content
    assert resp.usage.input_tokens == same.usage.prompt_tokens
    stream = oai.responses.create(model="tiny", input="Hi there", max_output_tokens=8,
                                  temperature=0, reasoning={"effort": "none"}, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == resp.output_text == events[-1].response.output_text
    instructed = oai.responses.create(model="tiny", input="Hi there", instructions="Be terse.",
                                      max_output_tokens=8, temperature=0,
                                      reasoning={"effort": "none"})
    system = chat(oai, [{"role": "system", "content": "Be terse."}, *USER])
    assert instructed.output_text == system.choices[0].message.content


def test_responses_function_tool_round_trip(oai):
    tool = {"type": "function", "name": "get_weather", "description": "Weather of a city",
            "parameters": WEATHER["input_schema"]}
    items = [{"role": "user", "content": "Hi there"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "22 C, sunny"}]
    resp = oai.responses.create(model="tiny", input=items, tools=[tool], max_output_tokens=8,
                                temperature=0, reasoning={"effort": "none"})
    openai_history = [*USER,
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"id": "call_1", "type": "function", "function": {
                              "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
    chat_tool = {"type": "function", "function": {k: tool[k] for k in
                                                  ("name", "description", "parameters")}}
    same = chat(oai, openai_history, tools=[chat_tool])
    assert resp.usage.input_tokens == same.usage.prompt_tokens
    assert resp.output_text == (same.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        oai.responses.create(model="tiny", input="x", previous_response_id="resp_1")


def test_embeddings_equal_oracle_dimensions_and_errors(oai, tiny_qwen3_dir):
    texts = ["Instruct: answer\nQuery:What is MLX?", "MLX is an array framework."]
    tokenizer = Tokenizer.from_pretrained(tiny_qwen3_dir)
    got = oai.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64
    assert got.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    for text, item in zip(texts, got.data):
        expected = oracle_embedding(tiny_qwen3_dir, tokenizer.encode(text))
        assert cosine(item.embedding, expected) >= 0.9999
    floats = oai.embeddings.create(model="tiny", input=texts[1], encoding_format="float")
    assert cosine(floats.data[0].embedding, got.data[1].embedding) >= 0.9999
    short = oai.embeddings.create(model="tiny", input=[tokenizer.encode(texts[0])], dimensions=16)
    head = np.array(got.data[0].embedding[:16])
    assert len(short.data[0].embedding) == 16
    assert np.allclose(short.data[0].embedding, head / np.linalg.norm(head), atol=1e-5)
    for bad in ([], [""], [[-1]], "x" * 0):
        with pytest.raises(openai.BadRequestError):
            oai.embeddings.create(model="tiny", input=bad)
    assert "embeddings" in oai.models.retrieve("tiny").model_extra["capabilities"]


def _wait_idle(server: str) -> dict:
    request = urllib.request.Request(f"{server}/stats", headers={"x-api-key": KEY})
    for _ in range(100):
        with urllib.request.urlopen(request, timeout=5) as resp:
            stats = json.load(resp)
        if stats["kv_cache"]["num_used_blocks"] == 0 and stats["requests"]["running"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"not idle: {stats}")


def test_sixteen_mixed_requests_at_once(claude, oai, server):
    prompts = [f"Tell me about item {i}" for i in range(4)]

    def run(i: int):
        text = prompts[i % 4]
        kind = i // 4
        if kind == 0:
            return chat(oai, [{"role": "user", "content": text}]).choices[0].message.content
        if kind == 1:
            msg = create(claude, messages=[{"role": "user", "content": text}])
            return msg.content[0].text
        if kind == 2:
            return oai.responses.create(model="tiny", input=text, max_output_tokens=8,
                                        temperature=0, reasoning={"effort": "none"}).output_text
        return oai.embeddings.create(model="tiny", input=text).data[0].embedding

    alone = {i: run(i) for i in (*range(4), *range(12, 16))}  # chat and embeddings alone
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, range(16)))
    for i in range(12):  # chat, messages and responses agree, also when batched together
        assert together[i] == alone[i % 4]
    for i in range(12, 16):
        assert cosine(together[i], alone[i]) >= 0.9999
    assert _wait_idle(server)["requests"]["waiting"] == 0


# ---- cached prompt tokens in each API's usage -------------------------------------------
LONG = "Answer in one short sentence and be precise about units and numbers. " * 8


def shared_tokens(tiny_qwen3_dir, system: str, *questions: str) -> int:
    """Leading prompt tokens the last question's prompt shares with the earlier ones (the
    prefix cache gives exactly these: each earlier prompt's KV was computed in full)."""
    tokenizer = Tokenizer.from_pretrained(tiny_qwen3_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": q}],
                                             tokenize=True, enable_thinking=False)
               for q in questions]
    *earlier, last = prompts
    return max(next(i for i, (x, y) in enumerate(zip(p, last)) if x != y) for p in earlier)


def system_chat(system: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_chat_usage_reports_cached_prompt_tokens(oai, tiny_qwen3_dir):
    system = "Chat. " + LONG
    first = chat(oai, system_chat(system, "Question A?"), max_tokens=4)
    second = chat(oai, system_chat(system, "Question B?"), max_tokens=4)
    shared = shared_tokens(tiny_qwen3_dir, system, "Question A?", "Question B?")
    assert shared > 100 and first.usage.prompt_tokens_details.cached_tokens < shared
    assert second.usage.prompt_tokens_details.cached_tokens == shared
    stream = oai.chat.completions.create(
        model="tiny", messages=system_chat(system, "Question C?"), max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=NO_THINK)
    usage = list(stream)[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == shared_tokens(
        tiny_qwen3_dir, system, "Question A?", "Question B?", "Question C?")


def test_completions_usage_reports_cached_prompt_tokens(oai, tiny_qwen3_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_qwen3_dir)
    prompts = ["Completions. " + LONG + "First", "Completions. " + LONG + "Second"]
    first, second = (oai.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0)
                     for p in prompts)
    a, b = (tokenizer.encode(p) for p in prompts)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert second.usage.prompt_tokens == len(b)
    assert first.usage.prompt_tokens_details.cached_tokens < shared
    assert second.usage.prompt_tokens_details.cached_tokens == shared > 100


def test_messages_usage_reports_cache_read_input_tokens(claude, tiny_qwen3_dir):
    system = "Messages. " + LONG

    def ask(question: str):
        return dict(system=system, messages=[{"role": "user", "content": question}], max_tokens=4)

    create(claude, **ask("Question A?"))
    msg = create(claude, **ask("Question B?"))
    shared = shared_tokens(tiny_qwen3_dir, system, "Question A?", "Question B?")
    counted = claude.messages.count_tokens(model="tiny", **{k: v for k, v in ask("Question B?").items()
                                                           if k != "max_tokens"})
    assert msg.usage.cache_read_input_tokens == shared > 100
    assert msg.usage.input_tokens == counted.input_tokens - shared  # the tokens computed
    with claude.messages.stream(model="tiny", extra_body={"temperature": 0},
                                **ask("Question C?")) as s:
        final = s.get_final_message()
    assert final.usage.cache_read_input_tokens == shared_tokens(
        tiny_qwen3_dir, system, "Question A?", "Question B?", "Question C?")
    assert anthropic_input(final.usage) == counted.input_tokens


def test_responses_usage_reports_cached_input_tokens(oai, tiny_qwen3_dir):
    instructions = "Responses. " + LONG

    def ask(question: str):
        return oai.responses.create(model="tiny", input=question, instructions=instructions,
                                    max_output_tokens=8, temperature=0,
                                    reasoning={"effort": "none"})

    first = ask("Question A?")
    second = ask("Question B?")
    shared = shared_tokens(tiny_qwen3_dir, instructions, "Question A?", "Question B?")
    assert first.usage.input_tokens_details.cached_tokens < shared
    assert second.usage.input_tokens_details.cached_tokens == shared > 100
    assert second.usage.input_tokens == first.usage.input_tokens  # cached ones included
