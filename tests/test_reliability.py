"""Faults, timeouts and security through HTTP on the REAL engine (tiny checkpoint).

- a step that raises fails only its requests (500-class error, or an error event once the
  stream began), the server keeps serving and frees their blocks;
- an engine thread that dies makes /health 503 and new requests fail fast with 503;
- per-request ``timeout`` and the server-wide deadline end a request with 408 and free it;
- a reader slower than the engine is aborted once its bounded buffer is full;
- the API key is compared with ``hmac.compare_digest``; the default bind is loopback, a
  non-loopback bind without a key warns; CORS is off unless origins are configured;
- error bodies never carry tracebacks or file paths; logs never carry prompt text unless
  ``log_prompts`` is on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.cli import app as cli_app
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app, launch, middlewares
from nano_qwen3_mlx.server.generation import streaming

USER = [{"role": "user", "content": "Say hi"}]
LONG = {"prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True,
        "temperature": 0}
SECRET = "/work/secret/module.py"


def engine_config(model_dir) -> EngineConfig:
    return EngineConfig(model=str(model_dir), num_kv_blocks=128, max_num_seqs=8,
                        max_model_len=512, max_queue_size=64)


@pytest_asyncio.fixture
async def llm(tiny_qwen3_dir):
    async with AsyncLLM(config=engine_config(tiny_qwen3_dir)) as llm:
        yield llm


async def make_client(llm, **config) -> TestClient:
    options = {k: config.pop(k) for k in ("keepalive_s", "max_buffered_chunks") if k in config}
    app = create_app(server_config=ServerConfig(served_model_name="tiny", **config), engine=llm,
                     **{"keepalive_s": 0.5, **options})
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest_asyncio.fixture
async def client(llm):
    client = await make_client(llm)
    yield client
    await client.close()


def assert_clean_error(body: dict) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    text = json.dumps(body)
    assert "Traceback" not in text and "/work" not in text and ".py" not in text
    return err


async def sse(resp) -> list:
    raw = await resp.text()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw
    return [json.loads(e) for e in events[:-1]]


async def wait_idle(client) -> dict:
    for _ in range(200):
        stats = await (await client.get("/stats")).json()
        if (stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
                and stats["kv_cache"]["num_used_blocks"] == 0):
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


async def works(client) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert resp.status == 200, await resp.text()


def fail_runs(llm, exc: BaseException, times: int = 1) -> list[int]:
    """Make the engine's next ``times`` model runs raise ``exc`` (in the engine thread)."""
    runner, original, count = llm.engine.runner, llm.engine.runner.run, [0]

    def run(*args, **kwargs):
        if count[0] < times:
            count[0] += 1
            raise exc
        return original(*args, **kwargs)

    runner.run = run
    return count


# ---- engine faults ------------------------------------------------------------------------
async def test_step_exception_fails_its_requests_and_server_keeps_serving(llm, client):
    await works(client)
    fail_runs(llm, RuntimeError(f"injected fault in {SECRET}"))
    resp = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    assert resp.status == 500
    err = assert_clean_error(await resp.json())
    assert err["type"] == "server_error" and "injected" not in err["message"]
    await works(client)
    stats = await wait_idle(client)
    assert stats["requests"]["errors"] >= 1


async def test_step_exception_mid_stream_is_an_error_event(llm, client):
    resp = await client.post("/v1/completions", json={**LONG, "stream": True})
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"data: ")  # the stream began
    assert await resp.content.readline() == b"\n"  # the end of that event: sse() reads whole ones
    fail_runs(llm, RuntimeError(f"injected fault in {SECRET}"))
    chunks = await sse(resp)
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "engine_error"
    assert_clean_error(errors[0])
    await works(client)
    await wait_idle(client)


async def test_fault_in_one_step_spares_later_requests(llm, client):
    fail_runs(llm, ValueError("bad batch"), times=1)
    bodies = [{"prompt": f"p{i}", "max_tokens": 4} for i in range(4)]
    statuses = [r.status for r in await asyncio.gather(
        *(client.post("/v1/completions", json=b) for b in bodies))]
    assert set(statuses) <= {200, 500} and 500 in statuses
    again = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status for r in again] == [200] * 4
    await wait_idle(client)


async def test_dead_engine_thread_means_503_fast(llm, client):
    fail_runs(llm, SystemExit("engine killed"), times=10**9)  # BaseException: the thread dies
    resp = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    assert resp.status == 503
    assert assert_clean_error(await resp.json())["code"] == "engine_dead"
    health = await client.get("/health")
    body = await health.json()
    assert health.status == 503 and body["status"] == "error" and "killed" not in str(body)
    for stream in (False, True):
        start = time.monotonic()
        resp = await asyncio.wait_for(client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream}), 5)
        assert resp.status == 503 and time.monotonic() - start < 1.0
        assert_clean_error(await resp.json())
    assert (await client.get("/v1/models")).status == 503
    assert (await client.get("/stats")).status == 200  # the last snapshot stays readable


# ---- timeouts and slow readers ------------------------------------------------------------
async def test_per_request_timeout_is_408_and_frees_blocks(client):
    resp = await client.post("/v1/completions", json={**LONG, "timeout": 0.2})
    assert resp.status == 408
    assert assert_clean_error(await resp.json())["code"] == "timeout"
    resp = await client.post("/v1/completions", json={**LONG, "timeout": 0.2, "stream": True})
    chunks = await sse(resp)
    assert chunks[-1]["error"]["code"] == "timeout"
    await wait_idle(client)
    await works(client)


async def test_server_deadline_is_408(llm):
    client = await make_client(llm, request_timeout=0.2)
    try:
        start = time.monotonic()
        resp = await client.post("/v1/chat/completions",
                                 json={"messages": USER, "max_tokens": 400, "ignore_eos": True,
                                       "timeout": 60})  # the server's deadline is shorter
        assert resp.status == 408 and time.monotonic() - start < 5
        assert assert_clean_error(await resp.json())["code"] == "timeout"
        await wait_idle(client)
    finally:
        await client.close()


async def test_slow_reader_is_aborted_after_bounded_buffer(llm, monkeypatch):
    client = await make_client(llm, max_buffered_chunks=4)
    real_send = streaming.SSEWriter.send

    async def slow_send(self, payload):  # a client that drains its socket slowly
        await asyncio.sleep(0.1)
        await real_send(self, payload)

    monkeypatch.setattr(streaming.SSEWriter, "send", slow_send)
    try:
        aborted = (await wait_idle(client))["requests"]["aborted"]
        resp = await client.post("/v1/completions", json={**LONG, "stream": True})
        chunks = await sse(resp)
        assert chunks[-1]["error"]["code"] == "slow_reader"
        assert len(chunks) < 20  # stopped long before the 400 tokens
        stats = await wait_idle(client)
        assert stats["requests"]["aborted"] == aborted + 1
    finally:
        await client.close()


# ---- security -----------------------------------------------------------------------------
async def test_api_key_uses_constant_time_compare(llm, monkeypatch):
    calls = []
    real = middlewares.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middlewares.hmac, "compare_digest", spy)
    client = await make_client(llm, api_key="s3cret")
    try:
        for header in ("Bearer s3cre", "Bearer s3cret-and-more", "Basic s3cret", "Bearer",
                       "Bearer ключ", "bearer  s3cret  x"):
            resp = await client.get("/v1/models", headers={"Authorization": header})
            assert resp.status == 401, header
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert_clean_error(await resp.json())
        ok = await client.get("/v1/models", headers={"Authorization": "bearer s3cret"})
        assert ok.status == 200
        assert calls and all(b == b"s3cret" for _, b in calls)
    finally:
        await client.close()


class _Captured(Exception):
    pass


@pytest.fixture
def captured_serve(monkeypatch):
    """``nano-qwen3 serve`` up to the point where it would bind: the configs it built."""
    seen = {}

    def fake_run(engine_config, server_config):
        seen["engine"], seen["server"] = engine_config, server_config
        return asyncio.sleep(0, result=0)

    monkeypatch.setattr(launch, "run_server", fake_run)
    for var in ("HOST", "API_KEY", "PORT"):
        monkeypatch.delenv(var, raising=False)
    return seen


def test_default_bind_is_loopback_and_quiet(captured_serve, tmp_path):
    # An existing folder: serve refuses a missing model before anything else.
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert captured_serve["server"].host == "127.0.0.1"
    assert captured_serve["server"].cors_origins == []  # CORS off by default
    assert "warning" not in result.output


def test_public_bind_without_key_warns(captured_serve, tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "without --api-key" in result.output
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(tmp_path), "--host", "0.0.0.0",
                                          "--api-key", "k", "--cors-origin", "http://ui.example"])
    assert result.exit_code == 0 and "warning" not in result.output
    assert captured_serve["server"].cors_origins == ["http://ui.example"]


async def test_unexpected_handler_error_has_no_traceback_or_path(llm, client, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError(f"Traceback (most recent call last): File {SECRET}, line 1")

    monkeypatch.setattr(llm.engine.tokenizer, "encode", boom)
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert resp.status == 500
    err = assert_clean_error(await resp.json())
    assert err["message"] == "internal server error"


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_stay_out_of_logs_unless_asked(llm, caplog, log_prompts):
    caplog.set_level(logging.DEBUG)
    client = await make_client(llm, log_prompts=log_prompts)
    marker = "zebra-marker-7731"
    try:
        await client.post("/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": marker}],
                                "max_tokens": 2})
        await client.post("/v1/completions", json={"prompt": marker, "max_tokens": 2})
        await client.post("/v1/completions", json={"prompt": marker, "max_tokens": 10**6})
        await client.post("/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": marker}],
                                "chat_template_kwargs": {"tools": 5}, "max_tokens": 2})
    finally:
        await client.close()
    assert (marker in caplog.text) == log_prompts
