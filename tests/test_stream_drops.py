"""A client that drops a stream, on every generating route: the request is aborted, nothing is
logged as a server error (no 500, no traceback), no KV block stays used, the server answers on.

Two ways a drop reaches the server: the connection closes while the handler waits (aiohttp
cancels it), or the next write fails. The second is provoked deterministically on the scripted
engine (``StreamResponse.write`` raises ``ConnectionResetError``) and for real on the engine
with raw sockets that reset the connection (``SO_LINGER`` 0) mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app
from tests.server_client import make_client, wait_inactive
from tests.test_server_fakes import FakeEngine

pytest_plugins = ["tests.server_fixtures"]

USER = [{"role": "user", "content": "Tell me a long story"}]
STREAMS = {
    "/v1/chat/completions": {"messages": USER, "max_tokens": 300, "stream": True},
    "/v1/completions": {"prompt": "Tell me a long story", "max_tokens": 300, "stream": True},
    "/v1/messages": {"messages": USER, "max_tokens": 300, "stream": True},
    "/v1/responses": {"input": "Tell me a long story", "max_output_tokens": 300,
                      "stream": True},
}
LONG_REPLY = " ".join(f"word{i}" for i in range(200))


def short(body: dict) -> dict:
    return {k: 5 if k.startswith("max_") else v for k, v in body.items()}


def server_errors(caplog) -> list[str]:
    """Log records that say the server failed: errors, tracebacks, 5xx access lines."""
    bad = []
    for record in caplog.records:
        text = record.getMessage()
        if record.levelno >= logging.ERROR or record.exc_info or " 500 " in text:
            bad.append(f"{record.name}: {text}")
    return bad


def access_statuses(caplog, path: str) -> list[int]:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "nano_qwen3_mlx.server.access" and f'"POST {path}" ' in r.getMessage()]
    return [int(line.split('" ')[1].split()[0]) for line in lines]


def fail_writes_after(monkeypatch, ok_writes: int) -> None:
    """Every ``StreamResponse.write`` after the first ``ok_writes`` raises as a reset
    connection does (aiohttp surfaces a peer's RST this way when it writes)."""
    original, count = web.StreamResponse.write, [0]

    async def write(self, data):
        count[0] += 1
        if count[0] > ok_writes:
            raise ConnectionResetError("Connection reset by peer")
        return await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", write)


@pytest.mark.parametrize("path", list(STREAMS))
async def test_failed_write_is_a_clean_client_drop(aiohttp_client, tokenizer, monkeypatch,
                                                   caplog, path):
    caplog.set_level(logging.INFO)
    engine = FakeEngine(tokenizer, lambda prompt, params: LONG_REPLY, token_delay=0.01)
    client = await make_client(aiohttp_client, engine)
    fail_writes_after(monkeypatch, 4)  # the stream has begun, then the peer is gone
    resp = await client.post(path, json=STREAMS[path])
    assert resp.status == 200
    await asyncio.wait_for(resp.read(), 5)  # the server ends the response; no hang
    await wait_inactive(engine)
    assert not engine.active and len(engine.aborted) == 1
    assert access_statuses(caplog, path) == [499]
    assert server_errors(caplog) == []
    monkeypatch.undo()
    again = await client.post(path, json={**short(STREAMS[path]), "stream": False})
    assert again.status == 200, await again.text()


async def test_failed_write_in_a_thinking_budget_turn(aiohttp_client, tokenizer, monkeypatch,
                                                      caplog):
    """A turn with a reasoning budget (one engine request: the engine closes the thinking): a
    drop after the budget, in the answer, is clean."""
    caplog.set_level(logging.INFO)
    reply = "<think>" + " ".join(["hmm"] * 40) + "</think>" + LONG_REPLY
    engine = FakeEngine(tokenizer, lambda prompt, params: reply, token_delay=0.005)
    client = await make_client(aiohttp_client, engine)
    body = {**STREAMS["/v1/messages"], "thinking": {"type": "enabled", "budget_tokens": 20}}
    fail_writes_after(monkeypatch, 40)  # past the budget: in the answer phase
    resp = await client.post("/v1/messages", json=body)
    await asyncio.wait_for(resp.read(), 5)
    await wait_inactive(engine)
    assert not engine.active and len(engine.calls) == 1
    assert access_statuses(caplog, "/v1/messages") == [499]
    assert server_errors(caplog) == []


# ---- the real engine, real sockets ---------------------------------------------------------
@pytest_asyncio.fixture
async def real_client(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=128, max_num_seqs=8,
                          max_model_len=512, max_queue_size=64)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="tiny"), engine=llm,
                         keepalive_s=0.5)
        client = TestClient(TestServer(app))
        await client.start_server()
        yield client
        await client.close()


async def wait_idle(client, min_aborted: int) -> dict:
    for _ in range(300):
        stats = await (await client.get("/stats")).json()
        if (stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
                and stats["kv_cache"]["num_used_blocks"] == 0
                and stats["requests"]["aborted"] >= min_aborted):
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


async def drop_mid_stream(port: int, path: str, body: dict, reset: bool) -> None:
    """POST a streaming request on a raw socket, read until the first SSE event, then close:
    with ``reset`` by RST (SO_LINGER 0), so the server's next write fails."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.wait_for(reader.readuntil(b"data: "), 30)  # the stream has begun
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
async def test_raw_socket_drops_on_every_route(real_client, caplog, reset):
    caplog.set_level(logging.INFO)
    port = real_client.server.port
    aborted = (await wait_idle(real_client, 0))["requests"]["aborted"]
    rounds = 3
    for _ in range(rounds):
        for path, body in STREAMS.items():
            await drop_mid_stream(port, path, {**body, "temperature": 0}, reset)
    stats = await wait_idle(real_client, aborted + rounds * len(STREAMS))
    assert stats["kv_cache"]["num_used_blocks"] == 0
    await asyncio.sleep(0.2)  # the last handlers log their access lines
    for path in STREAMS:
        assert access_statuses(caplog, path) == [499] * rounds, path
    assert server_errors(caplog) == []
    for path, body in STREAMS.items():
        resp = await real_client.post(path, json={**short(body), "stream": False})
        assert resp.status == 200, await resp.text()
