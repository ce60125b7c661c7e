"""Hostile input against the app on the REAL engine (tiny checkpoint): arbitrary JSON, huge
numbers, NaN/negative temperatures, giant max_tokens, empty messages, invalid UTF-8, control
characters, lone surrogates and 10 MB bodies each get a 4xx with OpenAI error JSON (never a
5xx), and a valid request right after still works; nothing is left running."""

from __future__ import annotations

import asyncio
import json

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats() | st.text(st.characters(codec="utf-8"), max_size=12))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
# Small ints too, so some bodies are valid and really generate (kept short: n, max_tokens <= 6).
_small = st.integers(-3, 6)
_fields = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
           "logprobs", "top_logprobs", "logit_bias", "stream", "stream_options",
           "chat_template_kwargs", "timeout", "priority", "echo", "min_p",
           "presence_penalty", "repetition_penalty", "stop_token_ids", "tools", "tool_choice"]
_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
     "content": st.text(max_size=20) | _json}), max_size=3)
_bodies = st.fixed_dictionaries(
    {"messages": _messages, "prompt": st.text(max_size=20) | _json | st.lists(_small)},
    optional={name: _json | _small for name in _fields},
)
_fuzz = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=128, max_num_seqs=16,
                          max_model_len=64, max_queue_size=256)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="tiny", request_timeout=20),
                         engine=llm, keepalive_s=0.5)
        async with TestClient(TestServer(app)) as client:
            yield client


async def _check(resp, expect_4xx: bool = False) -> None:
    text = await resp.text()
    assert resp.status < 500, text
    if expect_4xx:
        assert 400 <= resp.status < 500, text
    if resp.status >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert "Traceback" not in err["message"] and "/work" not in err["message"]


async def _still_works(client) -> None:
    resp = await client.post(COMP, json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["completion_tokens"] >= 1


def _bounded(body: dict) -> dict:
    # Valid bodies without max_tokens generate up to the context: keep the fuzz quick.
    body.setdefault("max_tokens", 4)
    return body


@_fuzz
@given(body=_bodies, path=st.sampled_from([CHAT, COMP]))
async def test_structured_garbage(client, body, path):
    await _check(await client.post(path, json=_bounded(body)))


@_fuzz
@given(raw=st.binary(max_size=120) | _json.map(lambda v: json.dumps(v).encode()))
async def test_raw_garbage(client, raw):
    for path in (CHAT, COMP):
        await _check(await client.post(path, data=raw))


BAD = [
    (CHAT, {"messages": USER, "max_tokens": 10**30}),
    (CHAT, {"messages": USER, "max_tokens": 10**9}),
    (CHAT, {"messages": USER, "max_completion_tokens": 2**63}),
    (CHAT, {"messages": USER, "temperature": 1e308}),
    (CHAT, {"messages": USER, "temperature": -0.5}),
    (CHAT, {"messages": USER, "seed": 2**64}),
    (CHAT, {"messages": USER, "seed": -1}),
    (CHAT, {"messages": USER, "n": 10**20}),
    (CHAT, {"messages": USER, "top_p": 1e-400}),
    (CHAT, {"messages": USER, "logit_bias": {"1": 1e308}}),
    (CHAT, {"messages": USER, "timeout": 1e400}),
    (CHAT, {"messages": []}),
    (CHAT, {"messages": [{}]}),
    (CHAT, {"messages": [{"role": "user"}], "max_tokens": 0}),
    (CHAT, {"messages": None}),
    (COMP, {"prompt": "", "max_tokens": 1}),
    (COMP, {"prompt": [], "max_tokens": 1}),
    (COMP, {"prompt": [[]], "max_tokens": 1}),
    (COMP, {"prompt": [2**63], "max_tokens": 1}),
    (COMP, {"prompt": "x", "max_tokens": -1}),
    (COMP, {"prompt": "x " * 200, "max_tokens": 1}),  # longer than the context
]


@pytest.mark.parametrize(("path", "body"), BAD, ids=[str(b)[:40] for _, b in BAD])
async def test_hostile_values_get_4xx(client, path, body):
    await _check(await client.post(path, json=body), expect_4xx=True)
    await _still_works(client)


# Accepted or rejected, but never a 5xx (a huge top_k means "no top-k"; token ids outside
# the vocabulary in logit_bias / stop_token_ids are ignored by the sampler).
ODD = [
    (CHAT, {"messages": USER, "logit_bias": {str(10**30): 1}, "max_tokens": 2}),
    (CHAT, {"messages": USER, "stop_token_ids": [2**70], "max_tokens": 2}),
    (CHAT, {"messages": USER, "top_k": 2**70, "max_tokens": 2}),
    (CHAT, {"messages": USER, "priority": 2**70, "max_tokens": 2}),
    (CHAT, {"messages": USER, "priority": -(2**70), "max_tokens": 2}),
    (COMP, {"prompt": "x", "stop": [""] * 64, "max_tokens": 2}),
    (COMP, {"prompt": "x", "min_tokens": 10**9, "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "user", "content": ""}], "max_tokens": 2}),
    (CHAT, {"messages": [{"role": "assistant", "content": None}], "max_tokens": 2}),
]


@pytest.mark.parametrize(("path", "body"), ODD, ids=[str(b)[:40] for _, b in ODD])
async def test_odd_values_never_5xx(client, path, body):
    await _check(await client.post(path, json=body))
    await _check(await client.post(path, json={**body, "stream": True}))
    await _still_works(client)


RAW = [
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
    b'{"prompt": "x", "max_tokens": 1e999}',
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # a 5000-digit integer
    b'{"prompt": "\xff\xfe bad utf-8"}',
    b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
    b'{"prompt": "raw \x00\x01\x1f control characters"}',
    b'{"messages": [{"role": "user", "content": "tab\tand\nnewline raw"}]}',
    b"[" * 100_000,  # deep nesting
    b'{"prompt": "x"}' + b"garbage",
    b"\x00" * 64,
]


@pytest.mark.parametrize("raw", RAW, ids=[repr(r[:30]) for r in RAW])
async def test_hostile_bytes_get_4xx(client, raw):
    for path in (CHAT, COMP):
        await _check(await client.post(path, data=raw, headers={"Content-Type":
                                                                "application/json"}),
                     expect_4xx=True)
    await _still_works(client)


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\x00\x01\x7f\u200b\ufeff"])
async def test_surrogates_and_escaped_controls_never_5xx(client, text):
    """Escaped controls are valid text (200 or 4xx); lone surrogates cannot be encoded (4xx)."""
    for path, body in ((COMP, {"prompt": text}), (CHAT, {"messages": [{"role": "user",
                                                                       "content": text}]})):
        await _check(await client.post(path, json={**body, "max_tokens": 2}))
        body = {**body, "max_tokens": 2, "stop": [text], "stream": True}
        await _check(await client.post(path, json=body))
    await _still_works(client)


async def test_ten_megabyte_body(client):
    resp = await client.post(COMP, data=b"x" * (10 * 1024 * 1024))
    await _check(resp, expect_4xx=True)
    assert resp.status == 413
    big = {"prompt": "word " * (3 * 1024 * 1024)}  # valid JSON, over the 4 MiB cap
    resp = await client.post(COMP, json=big)
    assert resp.status == 413
    await _still_works(client)


async def test_nothing_left_running(client):
    for _ in range(100):
        stats = await (await client.get("/stats")).json()
        if stats["requests"]["running"] == 0 and stats["kv_cache"]["num_used_blocks"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
    assert stats["kv_cache"]["num_used_blocks"] == 0
