"""/v1/messages and /v1/responses against a scripted engine: wire formats (validated with the
SDKs' own types), tool calls out, thinking and its budget, error shapes, auth, aborts."""

from __future__ import annotations

import asyncio
import json

import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.server_client import make_client, wait_inactive
from tests.test_server_fakes import FakeEngine, QueueFullError

pytest_plugins = ["tests.server_fixtures"]

TOOL = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"name": "get_weather", "input_schema": {"type": "object"}}
FN = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]
ANTHROPIC_EVENTS = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENTS = TypeAdapter(ResponseStreamEvent)


def scripted(tokenizer, reply: str, **kwargs) -> FakeEngine:
    return FakeEngine(tokenizer, lambda prompt, params: reply, **kwargs)


async def named_events(resp) -> list[tuple[str, dict]]:
    assert resp.status == 200, await resp.text()
    out = []
    for block in (await resp.text()).split("\n\n"):
        if block.startswith("event: "):
            name, data = block.split("\n", 1)
            out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return out


async def test_messages_tool_use_json_and_stream(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, scripted(tokenizer, TOOL))
    body = {"max_tokens": 100, "messages": USER, "tools": [WEATHER]}
    msg = Message.model_validate(await (await client.post("/v1/messages", json=body)).json())
    assert msg.stop_reason == "tool_use" and [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[0].text == "Checking."
    assert (msg.content[1].name, msg.content[1].input) == ("get_weather", {"city": "Paris"})
    assert msg.content[1].id.startswith("toolu_")
    events = await named_events(await client.post("/v1/messages", json={**body, "stream": True}))
    parsed = [ANTHROPIC_EVENTS.validate_python(data) for _, data in events if _ != "ping"]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta",
                          "message_stop"]
    tool_start = [e for e in parsed if e.type == "content_block_start"][-1]
    assert tool_start.content_block.type == "tool_use" and tool_start.index == 1
    partial = [e.delta.partial_json for e in parsed if e.type == "content_block_delta"
               and e.delta.type == "input_json_delta"]
    assert json.loads("".join(partial)) == {"city": "Paris"}
    assert parsed[-2].delta.stop_reason == "tool_use"


async def test_messages_cut_after_a_tool_use_say_max_tokens(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, scripted(tokenizer, TOOL + "\n" + TOOL))
    limit = len(tokenizer.encode(TOOL + "\n" + TOOL[:40], add_special_tokens=False))
    body = {"max_tokens": limit, "messages": USER, "tools": [WEATHER]}
    msg = Message.model_validate(await (await client.post("/v1/messages", json=body)).json())
    assert msg.stop_reason == "max_tokens"
    assert [b.name for b in msg.content if b.type == "tool_use"] == ["get_weather"]
    events = await named_events(await client.post("/v1/messages", json={**body, "stream": True}))
    parsed = [ANTHROPIC_EVENTS.validate_python(data) for _, data in events if _ != "ping"]
    assert parsed[-2].delta.stop_reason == "max_tokens"


async def test_messages_thinking_budget_is_one_engine_request(aiohttp_client, tokenizer):
    """The budget goes to the engine (which forces </think>: tests/test_thinking_server.py);
    the turn is one request, its reasoning and answer split from one text."""
    engine = FakeEngine(tokenizer, lambda prompt, params: "I should check the sky first."
                        "</think>\n\nIt is sunny.")
    client = await make_client(aiohttp_client, engine)
    body = {"max_tokens": 100, "messages": USER,
            "thinking": {"type": "enabled", "budget_tokens": 50}}
    msg = Message.model_validate(await (await client.post("/v1/messages", json=body)).json())
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in msg.content] == [
        ("thinking", "I should check the sky first."), ("text", "It is sunny.")]
    (only,) = engine.calls
    assert (only["params"].max_tokens, only["params"].thinking_budget) == (100, 50)
    assert tokenizer.decode(only["prompt"][-2:]) == "<think>\n"  # the reply starts thinking
    body["thinking"]["budget_tokens"] = 100  # not below max_tokens
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_responses_function_call_json_and_stream(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, scripted(tokenizer, TOOL))
    body = {"input": "Weather in Paris?", "tools": [FN], "reasoning": {"effort": "none"}}
    resp = Response.model_validate(await (await client.post("/v1/responses", json=body)).json())
    assert [item.type for item in resp.output] == ["message", "function_call"]
    assert resp.output_text == "Checking." and resp.status == "completed"
    call = resp.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    events = await named_events(await client.post("/v1/responses", json={**body, "stream": True}))
    parsed = [RESPONSES_EVENTS.validate_python(data) for _, data in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    names = [e.type for e in parsed]
    assert names[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    final = parsed[-1].response
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == parsed[-2].item.call_id


async def test_responses_reasoning_item(aiohttp_client, tokenizer):
    think = "<think>\nLet me think.\n</think>\n\nThe answer is 4."
    client = await make_client(aiohttp_client, scripted(tokenizer, think))
    body = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "2+2?"}]}]}
    resp = Response.model_validate(await (await client.post("/v1/responses", json=body)).json())
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert resp.output[0].content[0].text == "Let me think." and resp.output_text == "The answer is 4."
    assert resp.usage.output_tokens_details.reasoning_tokens > 0
    events = await named_events(await client.post("/v1/responses", json={**body, "stream": True}))
    deltas = "".join(d["delta"] for n, d in events if n == "response.reasoning_text.delta")
    assert deltas == "Let me think."
    done = events[-1][1]["response"]
    assert done["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize("body, fragment", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]},
     "image blocks are not supported"),
    ({"max_tokens": 5, "messages": USER, "model": "claude-x"}, "claude-x"),
    ({"max_tokens": 5, "messages": USER, "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "nope"}}, "names no tool"),
    ({"messages": USER}, "max_tokens"),
])
async def test_messages_errors_in_anthropic_shape(client, body, fragment):
    resp = await client.post("/v1/messages", json=body)
    error = await resp.json()
    assert resp.status in (400, 404) and error["type"] == "error"
    assert fragment in error["error"]["message"]
    assert error["error"]["type"] == ("not_found_error" if resp.status == 404
                                      else "invalid_request_error")


@pytest.mark.parametrize("body, fragment", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tool_choice": "required"}, "requires `tools`"),
    ({"input": "x", "tools": [FN], "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "cannot be combined"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input_image"),
    ({"input": []}, "input"),
])
async def test_responses_errors(client, body, fragment):
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 400 and fragment in (await resp.json())["error"]["message"]


async def test_auth_queue_full_and_count_tokens(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, FakeEngine(tokenizer, max_queue_size=0),
                               api_key="sekrit")
    body = {"max_tokens": 5, "messages": USER}
    for headers, status in (({"x-api-key": "nope"}, 401), ({}, 401),
                            ({"x-api-key": "sekrit"}, 429),
                            ({"Authorization": "Bearer sekrit"}, 429)):
        resp = await client.post("/v1/messages", json=body, headers=headers)
        error = await resp.json()
        assert resp.status == status and error["type"] == "error"
    assert error["error"]["type"] == "rate_limit_error" and resp.headers["Retry-After"]
    counted = await client.post("/v1/messages/count_tokens", json={"messages": USER},
                                headers={"x-api-key": "sekrit"})
    expected = len(tokenizer.apply_chat_template(USER, tokenize=True, enable_thinking=False))
    assert (await counted.json())["input_tokens"] == expected
    resp = await client.post("/v1/responses", json={"input": "x"}, headers={"x-api-key": "no"})
    assert resp.status == 401 and "error" in await resp.json()  # OpenAI shape there


@pytest.mark.parametrize("path, body", [
    ("/v1/messages", {"max_tokens": 50, "messages": USER, "stream": True}),
    ("/v1/responses", {"input": "hi", "stream": True}),
])
async def test_disconnect_aborts_and_metrics_per_route(aiohttp_client, tokenizer, path, body):
    engine = FakeEngine(tokenizer, token_delay=0.05)
    client = await make_client(aiohttp_client, engine)
    resp = await client.post(path, json=body)
    await resp.content.readline()  # the stream has begun
    resp.close()
    await wait_inactive(engine)
    assert not engine.active and len(engine.aborted) == 1
    metrics = await (await client.get("/metrics")).text()
    assert f'route="{path}"' in metrics


async def test_embeddings_many_inputs_do_not_fill_the_queue(aiohttp_client, tokenizer):
    class Embedder(FakeEngine):
        async def embed(self, prompt, *, priority=0, request_id=None):
            if len(self.active) >= self.max_queue_size:
                raise QueueFullError("queue full")
            self.active.add(request_id)
            try:
                await asyncio.sleep(0.001)
                return {"embedding": [float(len(prompt)), 1.0], "prompt_tokens": len(prompt)}
            finally:
                self.active.discard(request_id)

    client = await make_client(aiohttp_client, Embedder(tokenizer, max_queue_size=100))
    resp = await client.post("/v1/embeddings", json={"input": [[1] * (i % 5 + 1)
                                                               for i in range(300)]})
    body = await resp.json()
    assert resp.status == 200 and len(body["data"]) == 300
    assert [d["index"] for d in body["data"]] == list(range(300))
    assert body["data"][3]["embedding"] == [4.0, 1.0]  # input 3 had 4 tokens


@pytest.mark.parametrize("path, choice, several", [
    ("/v1/responses", {"type": "function", "name": "get_weather"}, False),
    ("/v1/responses", "required", True),
    ("/v1/chat/completions", {"type": "function", "function": {"name": "get_weather"}}, False),
    ("/v1/chat/completions", "required", True)])
async def test_a_named_tool_choice_forces_exactly_one_call(aiohttp_client, tokenizer, path,
                                                           choice, several):
    """The grammar the engine gets: one call for a named function (OpenAI: "exactly one"),
    several allowed for ``required``."""
    from nano_qwen3_mlx.structured import ToolSpec, tool_call_grammar

    engine = scripted(tokenizer, TOOL)
    client = await make_client(aiohttp_client, engine)
    if path == "/v1/responses":
        body = {"input": "Weather in Paris?", "tools": [FN], "tool_choice": choice}
    else:
        body = {"messages": USER, "tool_choice": choice,
                "tools": [{"type": "function", "function": {k: FN[k] for k in ("name", "parameters")}}]}
    assert (await client.post(path, json=body)).status == 200
    spec = ToolSpec("get_weather", FN["parameters"], None)
    expected = tool_call_grammar(tokenizer, [spec], parallel=several)
    assert engine.calls[0]["params"].grammar == expected
