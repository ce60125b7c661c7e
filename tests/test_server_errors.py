"""Server error paths and limits: every failure is OpenAI error JSON with the right status."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from tests.server_client import USER, make_client, wait_inactive
from tests.test_server_fakes import FakeEngine

pytest_plugins = ["tests.server_fixtures"]  # the tokenizer, engine and client fixtures


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"] and "/work" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER, "temperature": "0.5"}, "temperature"),
        ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         None),
        ({"messages": USER, "temperature": -1}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"5": 1000}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"5": -100.5}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"999999999": 1}}, "logit_bias"),  # past the vocab
        ({"messages": USER, "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # isdigit(), not int
        ({"messages": USER, "stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"messages": USER, "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"messages": USER, "priority": 2**31}, "priority"),
        ({"messages": USER, "priority": -(2**31) - 1}, "priority"),
        ({"messages": USER, "timeout": -1}, "timeout"),
        ({}, "messages"),
    ],
)
async def test_bad_chat_requests(client, body, param):
    err = await error_of(await client.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


async def test_token_id_params_in_range(client, engine):
    vocab = engine.tokenizer.vocab_size
    body = {"messages": USER, "logit_bias": {str(vocab - 1): -100, "0": 100},
            "stop_token_ids": [0, vocab - 1], "top_k": 10**9, "priority": -(2**31)}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    params = engine.calls[-1]["params"]
    assert params.logit_bias == {vocab - 1: -100, 0: 100} and params.stop_token_ids == [0, vocab - 1]
    assert params.top_k == 10**9  # the sampler keeps every token past the vocabulary size
    resp = await client.post("/v1/completions", json={"prompt": "x", "stop_token_ids": [vocab]})
    assert (await error_of(resp, 400))["param"] == "stop_token_ids"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'{"messages": NaN}', b"\xff\xfe", b'{"messages": [{"role": "user", '
     b'"content": "hi"}], "temperature": Infinity}', b""],
)
async def test_bad_json(client, raw):
    await error_of(await client.post("/v1/chat/completions", data=raw), 400)


@pytest.mark.parametrize(
    "body",
    [{"prompt": []}, {"prompt": ""}, {"prompt": [10**9]}, {"prompt": [-1]}, {"prompt": 5},
     {"prompt": "x", "logprobs": 50}, {"prompt": "x", "echo": 1}],
)
async def test_bad_completion_requests(client, body):
    await error_of(await client.post("/v1/completions", json=body), 400)


async def test_unknown_model_404(client):
    err = await error_of(await client.post("/v1/chat/completions",
                                           json={"model": "gpt-4", "messages": USER}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    await error_of(await client.get("/v1/models/gpt-4"), 404)


async def test_unknown_route_and_method(client):
    await error_of(await client.get("/v1/nothing"), 404)
    resp = await client.get("/v1/chat/completions")
    await error_of(resp, 405)
    assert "POST" in resp.headers["Allow"]


async def test_prompt_too_long(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, FakeEngine(tokenizer, max_model_len=32))
    long_msg = [{"role": "user", "content": "word " * 100}]
    err = await error_of(await client.post("/v1/chat/completions", json={"messages": long_msg}),
                         400)
    assert "maximum context length is 32" in err["message"]
    err = await error_of(await client.post("/v1/completions",
                                           json={"prompt": "hi", "max_tokens": 100}), 400)
    assert "32" in err["message"] and "100" in err["message"]


async def test_queue_full_is_429(aiohttp_client, tokenizer):
    client = await make_client(aiohttp_client, FakeEngine(tokenizer, max_queue_size=0))
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json={"messages": USER, "stream": stream})
        err = await error_of(resp, 429)
        assert resp.headers["Retry-After"] == "1" and err["type"] == "rate_limit_error"


async def test_api_key(aiohttp_client, engine):
    client = await make_client(aiohttp_client, engine, api_key="sekrit")
    await error_of(await client.get("/v1/models"), 401)
    await error_of(await client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    await error_of(await client.post("/v1/chat/completions", json={"messages": USER}), 401)
    ok = await client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status == 200
    assert (await client.get("/health")).status == 200  # probes need no key
    doc = await (await client.get("/openapi.json")).json()
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]  # Bearer or x-api-key


async def test_body_too_large(aiohttp_client, engine):
    client = await make_client(aiohttp_client, engine, max_body_bytes=2048)
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    err = await error_of(await client.post("/v1/chat/completions", json=big), 413)
    assert "too large" in err["message"]


async def test_engine_loading_and_dead(aiohttp_client, engine):
    client = await make_client(aiohttp_client, engine)
    engine.is_ready = False
    assert (await client.get("/health")).status == 503
    err = await error_of(await client.post("/v1/chat/completions", json={"messages": USER}), 503)
    assert err["code"] == "model_loading"
    engine.is_ready, engine.error = True, RuntimeError("boom at /secret/path")
    resp = await client.get("/health")
    assert resp.status == 503 and "/secret" not in await resp.text()
    err = await error_of(await client.post("/v1/completions", json={"prompt": "x"}), 503)
    assert "/secret" not in err["message"]


async def test_engine_exception_is_generic_500(client, engine):
    engine.reply = lambda prompt, params: RuntimeError("kaboom in /work/main/secret.py")
    err = await error_of(await client.post("/v1/chat/completions", json={"messages": USER}), 500)
    assert "kaboom" not in err["message"]
    engine.reply = lambda prompt, params: ValueError("prompt has bad tokens")
    await error_of(await client.post("/v1/completions", json={"prompt": "x"}), 400)


async def test_timeout(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, token_delay=0.05)
    client = await make_client(aiohttp_client, engine)
    err = await error_of(await client.post("/v1/chat/completions",
                                           json={"messages": USER, "timeout": 0.12}), 408)
    assert err["code"] == "timeout"
    resp = await client.post("/v1/chat/completions",
                             json={"messages": USER, "timeout": 0.12, "stream": True})
    body = await resp.text()
    assert resp.status == 200 and '"code": "timeout"' in body and body.endswith("[DONE]\n\n")
    await asyncio.sleep(0.05)
    assert not engine.active and len(engine.aborted) == 2


async def test_slow_reader_is_aborted(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer)  # no awaits between chunks: the buffer fills at once
    client = await make_client(aiohttp_client, engine, max_buffered_chunks=2)
    resp = await client.post("/v1/chat/completions", json={"messages": USER})
    err = await error_of(resp, 408)
    assert err["code"] == "slow_reader" and not engine.active


@pytest.mark.parametrize(
    "options", [{"write_timeout_s": 0.2}, {"request_timeout": 0.3}],  # deadline: + 1 s grace
)
async def test_stuck_reader_is_cut_off(aiohttp_client, tokenizer, monkeypatch, options):
    # A client that stops reading at the TCP level: once the socket buffers fill, a write
    # blocks until the peer reads; here every write blocks.
    engine = FakeEngine(tokenizer, lambda prompt, params: "word " * 200, token_delay=0.01)
    client = await make_client(aiohttp_client, engine, **options)

    async def stuck_write(self, data):
        await asyncio.Event().wait()

    monkeypatch.setattr(web.StreamResponse, "write", stuck_write)
    start = time.monotonic()
    with pytest.raises(aiohttp.ClientError):  # the connection is dropped
        resp = await client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
        await resp.read()
    assert time.monotonic() - start < 3
    await wait_inactive(engine)
    assert not engine.active and len(engine.aborted) == 1


async def test_client_disconnect_aborts(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, token_delay=0.05)
    client = await make_client(aiohttp_client, engine)
    resp = await client.post("/v1/chat/completions",
                             json={"messages": USER, "stream": True, "n": 2})
    await resp.content.readline()  # the stream has begun
    resp.close()
    await wait_inactive(engine)
    assert not engine.active and len(engine.aborted) == 2


async def test_non_stream_disconnect_aborts(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, token_delay=0.05)
    client = await make_client(aiohttp_client, engine)
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/chat/completions", json={"messages": USER}, timeout=0.1)
    await wait_inactive(engine)
    assert not engine.active and engine.aborted


async def test_cors(aiohttp_client, engine):
    client = await make_client(aiohttp_client, engine)
    resp = await client.options("/v1/models", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in resp.headers  # off by default
    client = await make_client(aiohttp_client, engine, cors_origins=["http://ui.example"])
    resp = await client.options("/v1/chat/completions", headers={"Origin": "http://ui.example"})
    assert resp.status == 204 and "POST" in resp.headers["Access-Control-Allow-Methods"]
    resp = await client.get("/v1/models", headers={"Origin": "http://ui.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    resp = await client.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_next_request_still_works_after_errors(client):
    for raw in (b"{", b"null", b'{"messages": 1}'):
        await client.post("/v1/chat/completions", data=raw)
    resp = await client.post("/v1/chat/completions", json={"messages": USER})
    assert resp.status == 200
