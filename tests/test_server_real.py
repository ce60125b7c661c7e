"""The server on the real AsyncLLM with the tiny random Qwen3 checkpoint (text is gibberish
but deterministic under temperature 0)."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.blas import blas_info
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.server.openai.protocol import ChatCompletionResponse, CompletionResponse

pytestmark = pytest.mark.asyncio(loop_scope="module")
USER = [{"role": "user", "content": "Say hi"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llm(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=256, max_num_seqs=16,
                          max_model_len=512, max_queue_size=64)
    async with AsyncLLM(config=config) as llm:
        yield llm


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(llm):
    app = create_app(server_config=ServerConfig(served_model_name="tiny"), engine=llm,
                     keepalive_s=0.5)
    async with TestClient(TestServer(app)) as client:
        yield client


async def chat(client, **body) -> dict:
    resp = await client.post("/v1/chat/completions", json={"messages": USER, **GREEDY, **body})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def stream_text(client, path: str, body: dict) -> tuple[str, list[dict]]:
    resp = await client.post(path, json={**body, "stream": True})
    assert resp.status == 200, await resp.text()
    raw = await resp.text()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(
        c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
        for c in chunks if c["choices"]
    )
    return text, chunks


async def wait_idle(client, min_aborted: int = 0) -> dict:
    """Stats refresh lazily (every 0.25 s): poll until nothing runs, no block is used and at
    least ``min_aborted`` requests were aborted (so the snapshot is not an old one)."""
    for _ in range(200):
        stats = await (await client.get("/stats")).json()
        requests = stats["requests"]
        if (requests["running"] == 0 and requests["waiting"] == 0
                and requests["aborted"] >= min_aborted
                and stats["kv_cache"]["num_used_blocks"] == 0):
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


async def test_health_models_stats_metrics(client):
    health = await (await client.get("/health")).json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
    assert (await client.get("/v1/models/tiny")).status == 200
    assert (await client.get("/v1/models/other")).status == 404
    stats = await (await client.get("/stats")).json()
    assert stats["kv_cache"]["num_blocks"] == 256
    assert stats["blas"] == blas_info().as_dict()  # which BLAS MLX's CPU matmuls use
    metrics = await (await client.get("/metrics")).text()
    assert "nano_qwen3_kv_cache_blocks 256.0" in metrics


async def test_chat_greedy_is_deterministic(client):
    first, second = await chat(client), await chat(client)
    ChatCompletionResponse.model_validate(first)
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] in ("length", "stop")
    assert first["usage"]["completion_tokens"] <= 8 and first["model"] == "tiny"


async def test_stream_equals_non_stream(client):
    full = await chat(client)
    text, chunks = await stream_text(client, "/v1/chat/completions",
                                     {"messages": USER, **GREEDY})
    message = full["choices"][0]["message"]
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "")
                        for c in chunks if c["choices"])
    assert text == message["content"] and reasoning == (message["reasoning_content"] or "")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


async def test_completions_and_stream(client):
    body = {"prompt": "The capital of France is", **GREEDY}
    resp = await client.post("/v1/completions", json=body)
    data = await resp.json()
    CompletionResponse.model_validate(data)
    text, _ = await stream_text(client, "/v1/completions", body)
    assert text == data["choices"][0]["text"]
    ids_resp = await client.post("/v1/completions", json={**body, "prompt": [785, 6722]})
    assert ids_resp.status == 200


async def test_n_and_seeds(client):
    data = await chat(client, n=3, temperature=1.0, seed=1, max_tokens=6)
    texts = [c["message"]["content"] for c in data["choices"]]
    assert len(texts) == 3 and len(set(texts)) > 1  # independent samples
    again = await chat(client, n=3, temperature=1.0, seed=1, max_tokens=6)
    assert [c["message"]["content"] for c in again["choices"]] == texts


async def test_stop_and_logprobs(client):
    full = await client.post("/v1/completions", json={"prompt": "Hi", **GREEDY})
    text = (await full.json())["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2] or "x"
    data = await (await client.post("/v1/completions",
                                    json={"prompt": "Hi", **GREEDY, "stop": [stop]})).json()
    assert stop not in data["choices"][0]["text"]
    assert text.startswith(data["choices"][0]["text"])
    lp = await chat(client, logprobs=True, top_logprobs=2, max_tokens=4)
    content = lp["choices"][0]["logprobs"]["content"]
    assert len(content) == lp["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    clp = await (await client.post("/v1/completions",
                                   json={"prompt": "Hi", **GREEDY, "logprobs": 1})).json()
    assert len(clp["choices"][0]["logprobs"]["tokens"]) == clp["usage"]["completion_tokens"]


async def test_thinking_disabled_and_tools(client):
    data = await chat(client, chat_template_kwargs={"enable_thinking": False})
    assert data["choices"][0]["message"]["reasoning_content"] is None
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    data = await chat(client, tools=tools)
    assert data["choices"][0]["finish_reason"] in ("stop", "length")  # gibberish: no call


async def test_errors(client):
    resp = await client.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi " * 600}]})
    assert resp.status == 400 and "512" in (await resp.json())["error"]["message"]
    resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
    assert resp.status == 400
    resp = await client.post("/v1/chat/completions", json={"messages": USER, "top_k": 1.5})
    assert resp.status == 400
    resp = await client.post("/v1/completions", json={"prompt": [10**7]})
    assert resp.status == 400


async def test_concurrent_streams_match_sequential(client):
    prompts = [f"Prompt number {i}" for i in range(16)]
    bodies = [{"prompt": p, **GREEDY} for p in prompts]
    sequential = [(await stream_text(client, "/v1/completions", b))[0] for b in bodies]
    together = await asyncio.gather(*(stream_text(client, "/v1/completions", b) for b in bodies))
    assert [t for t, _ in together] == sequential
    await wait_idle(client)


async def test_disconnects_free_blocks(client):
    body = {"prompt": "Tell me a long story", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    aborted = (await wait_idle(client))["requests"]["aborted"]
    responses = [await client.post("/v1/completions", json=body) for _ in range(4)]
    for resp in responses:
        await resp.content.readline()  # streaming has begun
        resp.close()
    stats = await wait_idle(client, min_aborted=aborted + 4)
    assert stats["requests"]["aborted"] == aborted + 4
    assert stats["kv_cache"]["num_used_blocks"] == 0
