"""Bounded, model-aware defaults and honest numbers, on the real engine.

A request that leaves out max_tokens/temperature runs with the model's defaults (its
generation_config.json, else the server's) and ends by itself; the effective settings come
back in ``X-Sampling-Params``. /stats uptime is the server's, /metrics counts the tokens of
aborted streams, and a stream the client ends is logged as 499 with its token count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.sampling_params import SERVER_SAMPLING_DEFAULTS
from nano_qwen3_mlx.server import create_app

on_module_loop = pytest.mark.asyncio(loop_scope="module")
DEFAULT_MAX = 16
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(smollm2_gguf):
    config = EngineConfig(model=str(smollm2_gguf), max_tokens_default=DEFAULT_MAX, max_num_seqs=4)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="demo"), engine=llm,
                         keepalive_s=0.5)
        async with TestClient(TestServer(app)) as client:
            yield client


def _settings(header: str) -> dict[str, str]:
    return dict(item.split("=") for item in header.split("; "))


@on_module_loop
async def test_left_out_fields_take_the_defaults_and_the_request_ends(client):
    resp = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= DEFAULT_MAX
    ran = _settings(resp.headers["X-Sampling-Params"])
    # The GGUF ships no sampling defaults: the server's apply.
    expected = {**SERVER_SAMPLING_DEFAULTS, "max_tokens": DEFAULT_MAX}
    assert ran == {k: str(v) for k, v in expected.items()}
    card = (await (await client.get("/v1/models")).json())["data"][0]
    assert card["sampling_defaults"] == expected


@on_module_loop
async def test_given_fields_win_over_the_defaults(client):
    resp = await client.post("/v1/completions", json={"prompt": "Paris is", "temperature": 0,
                                                      "max_tokens": 3, "top_k": 5})
    assert resp.status == 200, await resp.text()
    ran = _settings(resp.headers["X-Sampling-Params"])
    assert (float(ran["temperature"]), ran["max_tokens"], ran["top_k"]) == (0, "3", "5")
    assert ran["top_p"] == str(SERVER_SAMPLING_DEFAULTS["top_p"])


@on_module_loop
async def test_image_part_is_a_clear_400(client):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    resp = await client.post("/v1/chat/completions", json={"messages": messages})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "this model accepts text only" in error["message"] and "image_url" in error["message"]


@on_module_loop
async def test_stats_uptime_is_the_servers(client):
    first = (await (await client.get("/stats")).json())["uptime_s"]
    await asyncio.sleep(0.3)
    second = (await (await client.get("/stats")).json())["uptime_s"]
    assert second - first >= 0.25
    health = (await (await client.get("/health")).json())["uptime_s"]
    assert health >= second


async def _generation_tokens(client) -> float:
    text = await (await client.get("/metrics")).text()
    return float(re.search(r"^nano_qwen3_generation_tokens_total (\S+)$", text, re.M).group(1))


@on_module_loop
async def test_a_stream_the_client_ends_counts_its_tokens_and_logs_499(client, caplog):
    caplog.set_level(logging.INFO, logger="nano_qwen3_mlx.server.access")
    before = await _generation_tokens(client)
    body = {"messages": QUESTION, "stream": True, "max_tokens": 400, "ignore_eos": True}
    resp = await client.post("/v1/chat/completions", json=body)
    received = 0
    async for line in resp.content:
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
            received += 1
        if received >= 4:
            break
    resp.close()
    for _ in range(200):
        lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
        if any('" 499 ' in line for line in lines):
            break
        await asyncio.sleep(0.05)
    logged = [line for line in lines if '" 499 ' in line]
    assert logged, lines
    tokens = int(re.search(r"tokens=(\d+)", logged[-1]).group(1))
    assert tokens >= 3  # the role chunk carries no token
    assert await _generation_tokens(client) - before >= tokens


def test_model_generation_config_then_operator_settings(tiny_qwen3_dir, tmp_path):
    model = shutil.copytree(tiny_qwen3_dir, tmp_path / "m")
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 151645, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    with LLM(str(model), num_kv_blocks=16, max_tokens_default=7,
             sampling_defaults={"top_k": 10}) as llm:
        defaults = llm.engine.sampling_defaults
        assert (defaults["temperature"], defaults["top_p"]) == (0.6, 0.95)  # the model's
        assert defaults["top_k"] == 10  # the operator's override
        out = llm.generate_single([1000, 1001, 1002], SamplingParams(ignore_eos=True))
        assert out["usage"]["completion_tokens"] == 7
        # A preset keeps what it sets and takes the rest from the model.
        preset = SamplingParams.factual().with_defaults(defaults)
        assert (preset.temperature, preset.top_k, preset.max_tokens) == (0.3, 20, 7)


def test_an_ignored_quantize_warns(smollm2_gguf, caplog):
    from nano_qwen3_mlx.models.loader import load

    with caplog.at_level(logging.WARNING, logger="nano_qwen3_mlx.models.loader"):
        load(str(smollm2_gguf), quantize=8)
    assert any("--quantize 8 ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("args, expected", [
    (["generate", "hi", "-m", "nope-model"], "`nano-qwen3 models`"),
    (["download", "qwen3-0.6b"], "`nano-qwen3 models`"),
])
def test_not_found_errors_point_to_the_models_command(args, expected, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "nano_qwen3_mlx.cli", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "--model" not in lines[0], result.stderr
