"""Shutdown (``server/shutdown.py``): requests drain within the grace; what still runs at its
end is ended with each API's own terminal error event (a JSON request with a 503 body);
new requests during the drain get 503; a real ``nano-qwen3 serve`` exits 0 about the grace
after SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest

from nano_qwen3_mlx.bench.servers import free_port
from nano_qwen3_mlx.config import ServerConfig
from nano_qwen3_mlx.server import launch
from nano_qwen3_mlx.server.shutdown import drain
from nano_qwen3_mlx.server.state import STATE_KEY
from tests.server_client import make_client, wait_inactive
from tests.test_server_fakes import FakeEngine

pytest_plugins = ["tests.server_fixtures"]

USER = [{"role": "user", "content": "Tell me a long story"}]
LONG_REPLY = " ".join(f"word{i}" for i in range(300))
BODIES = {
    "/v1/chat/completions": {"messages": USER, "max_tokens": 400},
    "/v1/completions": {"prompt": "Tell me a long story", "max_tokens": 400},
    "/v1/messages": {"messages": USER, "max_tokens": 400},
    "/v1/responses": {"input": "Tell me a long story", "max_output_tokens": 400},
}


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """``(event name, data)`` per SSE event of a whole stream."""
    events = []
    for block in raw.split("\n\n"):
        lines = block.splitlines()
        name = next((ln[len("event: "):] for ln in lines if ln.startswith("event: ")), None)
        data = next((ln[len("data: "):] for ln in lines if ln.startswith("data: ")), None)
        if data is not None:
            events.append((name, data))
    return events


def assert_terminal_shutdown_event(path: str, raw: str) -> None:
    """The stream ends with the API's own way of saying the server cut it short."""
    events = sse_events(raw)
    if path in ("/v1/chat/completions", "/v1/completions"):
        assert events[-1][1] == "[DONE]", raw[-500:]
        last = json.loads(events[-2][1])
        assert last["error"]["code"] == "shutting_down"
        assert last["error"]["type"] == "service_unavailable"
        assert [c["finish_reason"] for c in last["choices"]] == ["abort"]
    elif path == "/v1/messages":
        name, data = events[-1]
        assert name == "error" and json.loads(data)["error"]["type"] == "overloaded_error"
        assert "message_stop" not in [n for n, _ in events]
    else:
        (first, _), (name, data) = events[-2:]
        failed = json.loads(data)["response"]
        assert first == "error" and name == "response.failed"
        assert failed["status"] == "failed" and failed["error"]["code"] == "shutting_down"
        assert all(item["status"] != "in_progress" for item in failed["output"])


async def start_stream(client, path: str):
    resp = await client.post(path, json={**BODIES[path], "stream": True})
    assert resp.status == 200
    await resp.content.readuntil(b"\n\n")  # the stream has begun
    return resp


@pytest.fixture
async def slow(aiohttp_client, tokenizer):
    """A client on a scripted engine whose replies take ~8 s."""
    engine = FakeEngine(tokenizer, lambda prompt, params: LONG_REPLY, token_delay=0.02)
    return engine, await make_client(aiohttp_client, engine)


async def test_streams_end_with_their_terminal_event_at_the_end_of_the_grace(slow):
    engine, client = slow
    streams = {path: await start_stream(client, path) for path in BODIES}
    state = client.app[STATE_KEY]
    start = time.monotonic()
    task = asyncio.create_task(drain(state.drain, 0.5))
    await asyncio.sleep(0.1)
    # During the drain: new requests and /health are 503, in each API's error shape.
    refused = await client.post("/v1/chat/completions", json=BODIES["/v1/chat/completions"])
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert (await refused.json())["error"]["code"] == "shutting_down"
    refused = await client.post("/v1/messages", json=BODIES["/v1/messages"])
    assert refused.status == 503
    assert (await refused.json())["error"]["type"] == "overloaded_error"
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["status"] == "shutting_down"
    for path, resp in streams.items():
        assert_terminal_shutdown_event(path, await resp.text())
    await task
    assert time.monotonic() - start < 1.5  # the grace, not the replies' ~8 s
    await wait_inactive(engine)
    assert not engine.active and len(engine.aborted) == len(BODIES)


@pytest.mark.parametrize("path", list(BODIES))
async def test_a_json_request_in_flight_gets_a_503_body(slow, path):
    engine, client = slow
    pending = asyncio.create_task(client.post(path, json=BODIES[path]))
    while not engine.active:
        await asyncio.sleep(0.01)
    await drain(client.app[STATE_KEY].drain, 0.2)
    resp = await pending
    body = await resp.json()
    assert resp.status == 503
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    else:
        assert body["error"]["code"] == "shutting_down"
    await wait_inactive(engine)
    assert not engine.active


async def test_an_embeddings_request_in_flight_gets_a_503_body(aiohttp_client, tokenizer):
    class SlowEmbedder(FakeEngine):
        async def embed(self, prompt, *, priority=0, request_id=None):
            self.active.add(request_id)
            try:
                await asyncio.sleep(30)
                return {"embedding": [1.0], "prompt_tokens": len(prompt)}
            finally:
                self.active.discard(request_id)

    engine = SlowEmbedder(tokenizer)
    client = await make_client(aiohttp_client, engine)
    pending = asyncio.create_task(client.post("/v1/embeddings", json={"input": ["a", "b"]}))
    while len(engine.active) < 2:
        await asyncio.sleep(0.01)
    await drain(client.app[STATE_KEY].drain, 0.2)
    resp = await pending
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "shutting_down"
    assert not engine.active  # both inputs' waits were cancelled


async def test_requests_that_finish_within_the_grace_are_untouched(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, token_delay=0.02)  # a short reply, about 0.1 s
    client = await make_client(aiohttp_client, engine)
    resp = await client.post("/v1/chat/completions",
                             json={"messages": USER, "max_tokens": 50, "stream": True})
    await resp.content.readuntil(b"\n\n")
    start = time.monotonic()
    await drain(client.app[STATE_KEY].drain, 10.0)
    assert time.monotonic() - start < 2  # returns as soon as nothing runs
    events = sse_events(await resp.text())
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] == "stop"
    assert not engine.aborted


async def test_a_second_signal_ends_the_grace_at_once(slow):
    engine, client = slow
    resp = await start_stream(client, "/v1/responses")
    hurry = asyncio.Event()
    start = time.monotonic()
    task = asyncio.create_task(drain(client.app[STATE_KEY].drain, 30.0, hurry))
    await asyncio.sleep(0.1)
    hurry.set()
    assert_terminal_shutdown_event("/v1/responses", await resp.text())
    await task
    assert time.monotonic() - start < 3


async def test_the_sdks_see_the_shutdown(slow):
    """What a client library makes of the terminal events: openai raises ``APIError``
    (chat), yields ``response.failed`` (Responses); anthropic raises the overloaded error."""
    engine, client = slow
    base = str(client.make_url(""))
    # Closed here: an SDK client left to the garbage collector schedules its `aclose` on
    # whichever loop runs then, and a later test's log check sees it fail.
    async with (openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as oai,
                anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0) as claude):
        chat = await oai.chat.completions.create(model="fake-qwen3", stream=True, **BODIES[
            "/v1/chat/completions"])
        responses = await oai.responses.create(model="fake-qwen3", stream=True,
                                               **BODIES["/v1/responses"])
        messages = await claude.messages.create(model="fake-qwen3", stream=True,
                                                **BODIES["/v1/messages"])
        firsts = [await anext(stream) for stream in (chat, responses, messages)]
        assert len(firsts) == 3
        draining = asyncio.create_task(drain(client.app[STATE_KEY].drain, 0.2))
        with pytest.raises(openai.APIError) as info:
            async for _ in chat:
                pass
        assert info.value.body["code"] == "shutting_down"
        kinds = [event.type async for event in responses]
        assert kinds[-1] == "response.failed"
        with pytest.raises(anthropic.APIStatusError) as refused:
            async for _ in messages:
                pass
        assert "overloaded_error" in str(refused.value)
        await draining


def test_the_first_signal_drains_and_a_second_hurries():
    stop, hurry = asyncio.Event(), asyncio.Event()
    launch._on_signal(stop, hurry)
    assert stop.is_set() and not hurry.is_set()
    launch._on_signal(stop, hurry)
    assert hurry.is_set()


def test_shutdown_grace_setting():
    assert ServerConfig.load(None).shutdown_grace == 30.0
    assert ServerConfig.load(None, shutdown_grace=2.5).shutdown_grace == 2.5
    with pytest.raises(ValueError, match="shutdown_grace"):
        ServerConfig.load(None, shutdown_grace=-1)


# ---- a real `nano-qwen3 serve` process (the demo model) --------------------------------------
GRACE_S = 2.0
LONG_CHAT = {"messages": USER, "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def post(url: str, body: dict, timeout: float = 30):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.25)
    raise AssertionError("the server did not become ready")


def test_sigterm_drains_then_exits_zero_within_the_grace(smollm2_gguf, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--model", "smollm2-135m",
           "--port", str(port), "--shutdown-grace", str(GRACE_S), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_healthy(proc, url)
        completion = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        streams = [post(f"{url}{path}", {**body, "stream": True})
                   for path, body in (("/v1/chat/completions", LONG_CHAT),
                                      ("/v1/completions", completion))]
        for resp in streams:
            assert resp.readline().startswith(b"data: ")  # each stream has begun
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(f"{url}/v1/chat/completions", {**LONG_CHAT, "max_tokens": 5})
        assert refused.value.code == 503
        assert json.loads(refused.value.read())["error"]["code"] == "shutting_down"
        for resp, path in zip(streams, ("/v1/chat/completions", "/v1/completions"), strict=True):
            assert_terminal_shutdown_event(path, resp.read().decode())
        code = proc.wait(timeout=GRACE_S + 20)
        elapsed = time.monotonic() - sent
        stderr = proc.stderr.read()
        assert code == 0, stderr
        assert GRACE_S - 0.5 < elapsed < GRACE_S + 8, (elapsed, stderr)
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
