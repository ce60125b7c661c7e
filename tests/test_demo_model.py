"""End to end on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the pinned wheel)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nano_qwen3_mlx import LLM, SamplingParams

QUESTION = "What is the capital of France?"
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def demo_llm(smollm2_gguf):
    with LLM("smollm2-135m", num_kv_blocks=128) as llm:
        yield llm


def test_llm_chat_answers_paris(demo_llm):
    result = demo_llm.chat([{"role": "user", "content": QUESTION}], GREEDY)
    assert "Paris" in result["generated_text"]
    assert result["finish_reason"] == "stop"


def test_batched_greedy_equals_one_at_a_time(demo_llm):
    questions = [QUESTION, "What is 2 plus 2?", "Name a primary colour.", "Who wrote Hamlet?"]
    prompts = [demo_llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True)
               for q in questions]
    params = SamplingParams(temperature=0, max_tokens=12)
    batched = [r["token_ids"] for r in demo_llm.generate(prompts, params)]
    singles = [demo_llm.generate_single(p, params)["token_ids"] for p in prompts]
    assert batched == singles


def test_cli_demo_answers_paris(smollm2_gguf):
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "generate", QUESTION,
           "--model", "smollm2-135m", "--temperature", "0", "--max-tokens", "24"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_truncated_gguf_is_one_clear_line(smollm2_gguf, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[: 1 << 20])
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "generate", "hi", "--model", str(bad)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "truncated.gguf" in result.stderr


async def test_http_chat_answers_paris(smollm2_gguf):
    from aiohttp.test_utils import TestClient, TestServer

    from nano_qwen3_mlx.async_llm import AsyncLLM
    from nano_qwen3_mlx.config import EngineConfig, ServerConfig
    from nano_qwen3_mlx.server import create_app

    config = EngineConfig(model="smollm2-135m", num_kv_blocks=64, max_num_seqs=4)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(), engine=llm)
        async with TestClient(TestServer(app)) as client:
            body = {"model": "smollm2-135m", "temperature": 0, "max_tokens": 24,
                    "messages": [{"role": "user", "content": QUESTION}]}
            resp = await client.post("/v1/chat/completions", json=body)
            assert resp.status == 200, await resp.text()
            answer = (await resp.json())["choices"][0]["message"]["content"]
    assert "Paris" in answer


def test_serve_without_reachable_default_model_names_the_demo(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    env.pop("MODEL_NAME", None)
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "smollm2-135m" in errors[0], result.stderr
