"""Several models behind one server (server/management/pool.py) on real engines: routing, greedy
parity with a one-model server, load on demand while another model streams, TTL unload,
eviction under a budget, pinning, 404, the admin routes, one load for concurrent requests."""

from __future__ import annotations

import asyncio
import json

import mlx.core as mx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.server.management.pool import ModelPool, ModelSpec
from tests.checkpoints import write_checkpoint

USER = [{"role": "user", "content": "Say hi"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, qwen_tokenizer_dir, smollm2_gguf) -> dict[str, str]:
    """Two tiny random Qwen3 checkpoints (different seeds) and the SmolLM2 demo GGUF."""
    root = tmp_path_factory.mktemp("multi")
    return {"a": str(write_checkpoint(root / "a", qwen_tokenizer_dir, seed=1)),
            "b": str(write_checkpoint(root / "b", qwen_tokenizer_dir, seed=2)),
            "smol": str(smollm2_gguf)}


def config(path: str) -> EngineConfig:
    return EngineConfig(model=path, num_kv_blocks=64, max_num_seqs=4, max_model_len=256)


def pool(checkpoints, names=("a", "b"), **options) -> ModelPool:
    ttl, pinned = options.pop("ttl", {}), options.pop("pinned", ())
    return ModelPool([ModelSpec(n, config(checkpoints[n]), ttl_s=ttl.get(n, 0.0), pinned=n in pinned)
                      for n in names], **options)


async def serve(models: ModelPool) -> TestClient:
    client = TestClient(TestServer(create_app(server_config=ServerConfig(), models=models,
                                              keepalive_s=0.5)))
    await client.start_server()
    for _ in range(500):  # the pinned models load in the background
        if (await client.get("/health")).status == 200:
            return client
        await asyncio.sleep(0.02)
    raise AssertionError("the server did not become ready")


async def chat(client, model: str, **body) -> dict:
    resp = await client.post("/v1/chat/completions",
                             json={"model": model, "messages": USER, **GREEDY, **body})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def single_model_text(path: str) -> str:
    """The greedy reply of a one-model server (today's path) on the same checkpoint."""
    async with AsyncLLM(config=config(path)) as llm:
        app = create_app(server_config=ServerConfig(), engine=llm)
        async with TestClient(TestServer(app)) as client:
            return (await chat(client, path))["choices"][0]["message"]["content"]


async def test_routing_and_greedy_parity_three_models(checkpoints):
    expected = {n: await single_model_text(checkpoints[n]) for n in ("a", "b", "smol")}
    assert expected["a"] != expected["b"]  # the seeds differ, so routing is visible
    client = await serve(pool(checkpoints, ("a", "b", "smol")))
    try:
        models = (await (await client.get("/v1/models")).json())["data"]
        assert [(m["id"], m["loaded"]) for m in models] == [("a", False), ("b", False),
                                                             ("smol", False)]
        replies = await asyncio.gather(*(chat(client, n) for n in ("a", "b", "smol", "a")))
        for name, reply in zip(("a", "b", "smol", "a"), replies, strict=True):
            assert reply["model"] == name
            assert reply["choices"][0]["message"]["content"] == expected[name]
        models = (await (await client.get("/v1/models")).json())["data"]
        assert all(m["loaded"] and m["memory_bytes"] > 0 for m in models)
        stats = await (await client.get("/stats")).json()
        assert stats["loads"] == {"a": 1, "b": 1, "smol": 1}  # "a" twice at once: one load
        assert stats["models"]["b"]["requests"]["finished"] == 1
        one = await (await client.get("/stats", params={"model": "a"})).json()
        assert one["model"] == "a" and one["requests"]["finished"] == 2
        metrics = await (await client.get("/metrics")).text()
        assert 'nano_qwen3_model_loaded{model="smol"} 1.0' in metrics
    finally:
        await client.close()


async def test_unknown_model_is_404_listing_the_models(checkpoints):
    client = await serve(pool(checkpoints))
    try:
        resp = await client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["code"] == "model_not_found" and "Available models: a, b" in error["message"]
        assert (await client.post("/v1/models/nope/load")).status == 404
        assert (await client.get("/v1/models/nope")).status == 404
    finally:
        await client.close()


async def test_load_on_demand_while_another_model_streams(checkpoints):
    client = await serve(pool(checkpoints, pinned=("a",)))
    try:
        assert (await (await client.get("/v1/models/a")).json())["loaded"] is True
        resp = await client.post("/v1/chat/completions", json={
            "model": "a", "messages": USER, "temperature": 0, "max_tokens": 120,
            "ignore_eos": True, "stream": True})
        assert resp.status == 200
        first = await resp.content.readline()  # "a" is streaming
        assert first.startswith(b"data: ")
        reply = await chat(client, "b")  # "b" loads and answers meanwhile
        assert reply["model"] == "b"
        rest = (await resp.text()).split("\n\n")
        chunks = [json.loads(e[6:]) for e in rest if e.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        await client.close()


async def test_ttl_unloads_an_idle_model_and_its_memory_goes_back(checkpoints):
    models = pool(checkpoints, ttl={"a": 0.3, "b": 0.3}, pinned=("b",))
    client = await serve(models)
    try:
        await chat(client, "a")
        used = models.memory_used()
        active = await models._thread.run(mx.get_active_memory)
        card = await (await client.get("/v1/models/a")).json()
        assert card["loaded"] and 0 < card["memory_bytes"] < used  # "b" (pinned) holds the rest
        for _ in range(100):
            await asyncio.sleep(0.05)
            if "a" not in models.loaded:
                break
        assert "a" not in models.loaded and "b" in models.loaded  # pinned stays
        assert models.memory_used() == used - card["memory_bytes"]
        # MLX's own count: the weights at least went back (the KV pool too, not asserted).
        weights = card["memory_bytes"] - card["kv_bytes"]
        assert active - await models._thread.run(mx.get_active_memory) >= weights
        assert (await (await client.get("/v1/models/a")).json())["memory_bytes"] == 0
        assert (await chat(client, "a"))["model"] == "a"  # loads again on demand
        assert models.load_counts["a"] == 2
    finally:
        await client.close()


async def test_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit(checkpoints):
    models = pool(checkpoints)
    client = await serve(models)
    try:
        await chat(client, "a")
        models.budget_bytes = int(models.memory_used() * 1.5)  # one tiny model, not two
        await chat(client, "b")  # "a" is idle and the least recently used: unloaded
        assert set(models.loaded) == {"b"}
        assert (await chat(client, "a"))["model"] == "a"  # and back: "b" goes
        assert set(models.loaded) == {"a"}
        models.specs["a"].pinned = True
        resp = await client.post("/v1/chat/completions", json={"model": "b", "messages": USER})
        assert resp.status == 503
        error = (await resp.json())["error"]
        assert error["code"] == "insufficient_memory" and "--max-memory-gb" in error["message"]
        assert set(models.loaded) == {"a"}  # the pinned model stays
        models.specs["a"].pinned, models.budget_bytes = False, 1000
        resp = await client.post("/v1/chat/completions", json={"model": "b", "messages": USER})
        assert resp.status == 503 and "more than the memory budget" in await resp.text()
        assert set(models.loaded) == {"a"}  # nothing unloaded for a model that cannot fit
    finally:
        await client.close()


async def test_admin_load_and_unload(checkpoints):
    models = pool(checkpoints)
    client = await serve(models)
    try:
        resp = await client.post("/v1/models/b/load")
        assert resp.status == 200 and (await resp.json())["loaded"] is True
        assert set(models.loaded) == {"b"}
        resp = await client.post("/v1/models/b/unload")
        body = await resp.json()
        assert body["unloaded"] is True and body["loaded"] is False
        assert (await (await client.post("/v1/models/b/unload")).json())["unloaded"] is False
        assert models.loaded == {}
    finally:
        await client.close()


async def stream_times(client, model: str, tokens: int) -> list[float]:
    """Arrival times of a greedy stream's chunks."""
    resp = await client.post("/v1/chat/completions", json={
        "model": model, "messages": USER, "temperature": 0, "max_tokens": tokens,
        "ignore_eos": True, "stream": True})
    assert resp.status == 200
    loop, times = asyncio.get_running_loop(), []
    async for line in resp.content:
        if line.startswith(b"data: {"):
            times.append(loop.time())
    return times


async def test_two_models_stream_at_once_their_steps_interleaved(checkpoints):
    client = await serve(pool(checkpoints, pinned=("a", "b")))
    try:
        a, b = await asyncio.gather(stream_times(client, "a", 150), stream_times(client, "b", 150))
        # Neither waits for the other to finish: each one's tokens arrive during the other's.
        assert a[0] < b[-1] and b[0] < a[-1]
        during = [t for t in a if b[0] < t < b[-1]]
        assert len(during) > 50
    finally:
        await client.close()
