"""Server routes against a scripted engine: shapes, streaming, reasoning, tools, n, logprobs."""

from __future__ import annotations

import json

from nano_qwen3_mlx.config import ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.server.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelList,
)
from tests.server_client import USER
from tests.test_server_fakes import FakeEngine

pytest_plugins = ["tests.server_fixtures"]  # the tokenizer, engine and client fixtures

THINKING = "<think>\nLet me think.\n</think>\n\nThe answer is 4."
TOOL = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def sse_events(resp) -> list:
    """Parsed ``data:`` payloads of an SSE response ("[DONE]" kept as a string)."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    body = await resp.text()
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


async def test_health_and_models(client):
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ok" and body["model"] == "fake-qwen3"
    models = ModelList.model_validate(await (await client.get("/v1/models")).json())
    assert [m.id for m in models.data] == ["fake-qwen3"]
    one = await client.get("/v1/models/fake-qwen3")
    assert (await one.json())["id"] == "fake-qwen3"


async def test_chat_completion_shape(client, engine):
    resp = await client.post("/v1/chat/completions", json={"model": "fake-qwen3", "messages": USER,
                                                          "max_tokens": 50, "temperature": 0})
    assert resp.status == 200
    data = await resp.json()
    ChatCompletionResponse.model_validate(data)
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there, friend.",
                                 "reasoning_content": None}
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(engine.calls[0]["prompt"])
    assert engine.calls[0]["params"].temperature == 0


async def test_chat_reasoning_split(client, engine):
    engine.reply = lambda prompt, params: THINKING
    data = await (await client.post("/v1/chat/completions", json={"messages": USER})).json()
    message = data["choices"][0]["message"]
    assert message["reasoning_content"] == "Let me think."
    assert message["content"] == "The answer is 4."


async def test_thinking_disabled_leaves_text_alone(client, engine):
    engine.reply = lambda prompt, params: "<think>x</think>y"
    body = {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    assert data["choices"][0]["message"]["content"] == "<think>x</think>y"
    assert engine.tokenizer.decode(engine.calls[0]["prompt"]).endswith("</think>\n\n")


async def test_chat_stream_reasoning_and_usage(client, engine):
    engine.reply = lambda prompt, params: THINKING
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    events = await sse_events(await client.post("/v1/chat/completions", json=body))
    chunks = events[:-1]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_chat_stream_without_usage_has_no_usage_field(client):
    events = await sse_events(await client.post("/v1/chat/completions",
                                                json={"messages": USER, "stream": True}))
    assert all("usage" not in e for e in events[:-1])


async def test_tool_calls(client, engine):
    engine.reply = lambda prompt, params: TOOL
    tools = [{"type": "function", "function": {"name": "get_weather",
                                               "parameters": {"type": "object"}}}]
    data = await (await client.post("/v1/chat/completions",
                                    json={"messages": USER, "tools": tools})).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert "get_weather" in engine.tokenizer.decode(engine.calls[0]["prompt"])


async def test_tool_calls_streamed(client, engine):
    engine.reply = lambda prompt, params: TOOL
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    events = await sse_events(await client.post(
        "/v1/chat/completions", json={"messages": USER, "tools": tools, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("content", "") for d in deltas).strip() == "Checking."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and calls[0]["index"] == 0
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_reply_cut_after_a_call_says_length(client, engine):
    """max_tokens cut the reply inside a second call: the complete call is returned, and
    the finish reason says the reply was cut (not ``tool_calls``), streamed or not."""
    engine.reply = lambda prompt, params: TOOL + TOOL
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    limit = len(engine.tokenizer.encode(TOOL + TOOL[:30], add_special_tokens=False))
    body = {"messages": USER, "tools": tools, "max_tokens": limit}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    events = await sse_events(await client.post("/v1/chat/completions",
                                                json={**body, "stream": True}))
    calls = [c for e in events[:-1] for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_tool_choice_none_skips_parsing(client, engine):
    engine.reply = lambda prompt, params: TOOL
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    body = {"messages": USER, "tools": tools, "tool_choice": "none"}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert "<tool_call>" in data["choices"][0]["message"]["content"]


async def test_named_tool_choice_offers_only_that_tool(client, engine):
    tools = [{"type": "function", "function": {"name": name}} for name in ("get_weather", "get_time")]
    pick = {"type": "function", "function": {"name": "get_time"}}
    resp = await client.post("/v1/chat/completions",
                             json={"messages": USER, "tools": tools, "tool_choice": pick})
    assert resp.status == 200
    prompt = engine.tokenizer.decode(engine.calls[-1]["prompt"])
    assert "get_time" in prompt and "get_weather" not in prompt
    missing = {"type": "function", "function": {"name": "nope"}}
    resp = await client.post("/v1/chat/completions",
                             json={"messages": USER, "tools": tools, "tool_choice": missing})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "tool_choice"


async def test_n_choices_with_seeds(client, engine):
    body = {"messages": USER, "n": 3, "seed": 7, "temperature": 0.8}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert sorted(c["params"].seed for c in engine.calls) == [7, 8, 9]
    per_choice = len(engine.tokenizer.encode("Hello there, friend."))
    assert data["usage"]["completion_tokens"] == 3 * per_choice


async def test_n_stream_indexes(client):
    events = await sse_events(await client.post("/v1/chat/completions",
                                                json={"messages": USER, "n": 2, "stream": True}))
    finished = {e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]}
    assert finished == {0, 1}


async def test_stop_and_length(client, engine):
    data = await (await client.post("/v1/chat/completions",
                                    json={"messages": USER, "stop": ","})).json()
    assert data["choices"][0]["message"]["content"] == "Hello there"
    assert engine.calls[-1]["params"].stop_sequences == [","]
    data = await (await client.post("/v1/chat/completions",
                                    json={"messages": USER, "max_completion_tokens": 2})).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 2


async def test_chat_logprobs(client):
    body = {"messages": USER, "logprobs": True, "top_logprobs": 2, "max_tokens": 3}
    data = await (await client.post("/v1/chat/completions", json=body)).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())


async def test_completions(client, engine):
    resp = await client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 4})
    data = await resp.json()
    CompletionResponse.model_validate(data)
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"][0]["finish_reason"] == "length"
    assert engine.calls[0]["prompt"] == engine.tokenizer.encode("Once upon")


async def test_completions_many_prompts_and_n(client, engine):
    body = {"prompt": ["a", "b"], "n": 2, "max_tokens": 2, "logprobs": 1, "echo": True}
    data = await (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["choices"][2]["text"].startswith("b")
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and lp["text_offset"][0] == 1


async def test_completions_token_prompt_and_stream(client, engine):
    ids = engine.tokenizer.encode("Hello")
    body = {"prompt": ids, "stream": True, "max_tokens": 3,
            "stream_options": {"include_usage": True}}
    events = await sse_events(await client.post("/v1/completions", json=body))
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == "Hello there,"
    assert events[-2]["usage"]["prompt_tokens"] == len(ids)
    assert engine.calls[0]["prompt"] == ids


async def test_stats_metrics_openapi(client):
    await client.post("/v1/chat/completions", json={"messages": USER})
    stats = await (await client.get("/stats")).json()
    assert stats["requests"]["running"] == 0 and stats["model"] == "fake-qwen3"
    text = await (await client.get("/metrics")).text()
    assert 'nano_qwen3_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert "nano_qwen3_time_to_first_token_seconds_count 1.0" in text
    assert "nano_qwen3_kv_cache_usage_ratio" in text
    doc = await (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in doc["paths"]
    assert "ChatCompletionRequest" in doc["components"]["schemas"]


async def test_request_id_header(client):
    resp = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert resp.headers["X-Request-Id"] == "abc-123"
    resp = await client.get("/health", headers={"X-Request-Id": "bad id <script>"})
    assert len(resp.headers["X-Request-Id"]) == 32  # replaced by a fresh id


async def test_content_parts_and_priority(client, engine):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "text", "text": "there"}]}]
    resp = await client.post("/v1/chat/completions", json={"messages": messages, "priority": 3,
                                                          "user": "u1", "unknown_field": 1})
    assert resp.status == 200
    prompt = engine.tokenizer.decode(engine.calls[0]["prompt"])
    assert "hi\nthere" in prompt and "Be brief." in prompt
    assert engine.calls[0]["priority"] == 3


async def test_keepalive_while_waiting(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, first_token_delay=0.3)
    client = await aiohttp_client(create_app(server_config=ServerConfig(), engine=engine,
                                             keepalive_s=0.05))
    resp = await client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    body = await resp.text()
    assert ": keep-alive\n\n" in body and body.endswith("data: [DONE]\n\n")
    assert body.index(": keep-alive") < body.index('"content": "Hello"')
