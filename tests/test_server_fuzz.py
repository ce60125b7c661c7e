"""Arbitrary JSON at the handlers: never a 5xx, errors are OpenAI error JSON, and the next
valid request still works (scripted engine; the real-engine runs belong to the load tests)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.config import ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.test_server_fakes import FakeEngine

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(
    max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_fields = ["model", "max_tokens", "temperature", "top_p", "top_k", "n",
           "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "stream", "tools",
           "stream_options", "chat_template_kwargs", "timeout", "priority", "echo"]
_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
     "content": st.text(max_size=30) | _json}), max_size=3)
_bodies = st.fixed_dictionaries(
    {"messages": _messages, "prompt": st.text(max_size=20) | _json},
    optional={name: _json | st.integers(-5, 100) for name in _fields},
)
_fuzz = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture
async def client(aiohttp_client, tokenizer):
    engine = FakeEngine(tokenizer, max_model_len=256)
    app = create_app(server_config=ServerConfig(max_body_bytes=64 * 1024), engine=engine,
                     keepalive_s=0.05)
    return await aiohttp_client(app)


async def _check(resp) -> None:
    assert resp.status < 500, await resp.text()
    if resp.status >= 400:
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        await resp.read()


@_fuzz
@given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
async def test_structured_garbage(client, body, path):
    await _check(await client.post(path, json=body))


@_fuzz
@given(raw=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
async def test_raw_garbage(client, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        await _check(await client.post(path, data=raw))


async def test_huge_body_then_valid_request(client):
    resp = await client.post("/v1/completions", data=b"x" * (10 * 1024 * 1024))
    assert resp.status == 413
    ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status == 200
