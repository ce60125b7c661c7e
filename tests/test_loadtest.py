"""A small, fast run of ``scripts/loadtest.py`` against the real engine on the tiny checkpoint:
no 5xx, every good request completed or dropped by design, no leaked KV blocks, memory back
to its baseline (the longer runs are for the command line)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts import their sibling modules by name
loadtest = importlib.import_module("loadtest")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server_url(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=256, max_num_seqs=8,
                          max_model_len=256, max_queue_size=64)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="tiny"), engine=llm,
                         keepalive_s=0.5)
        async with TestServer(app, host="127.0.0.1") as server:
            yield str(server.make_url("")).rstrip("/")


@pytest.mark.asyncio(loop_scope="module")
async def test_load_leaves_the_server_clean(server_url):
    cfg = loadtest.LoadConfig(requests=40, clients=8, duration=60, max_tokens=16,
                              max_prompt_words=24, disconnect_share=0.2, bad_share=0.2, seed=1)
    report = await loadtest.run_load(server_url, cfg)
    text = loadtest.format_report(report)
    assert report.sent == 40 and report.num_5xx == 0, text
    assert report.ok, text
    assert report.completed > 0 and report.aborted > 0 and report.bad_rejected > 0, text
    assert report.final_used_blocks == 0 and report.completion_tokens > 0, text
    assert report.ttft_p50_s is not None and report.ttft_p50_s <= report.ttft_p99_s


def test_refuses_non_loopback():
    with pytest.raises(SystemExit):
        loadtest.check_loopback("http://10.0.0.1:8000")
    loadtest.check_loopback("http://[::1]:8000")


def test_cli_starts_its_own_server(tiny_qwen3_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NUM_KV_BLOCKS", "128")
    monkeypatch.setenv("MAX_MODEL_LEN", "256")
    out = tmp_path / "report.json"
    code = loadtest.main(["--model", str(tiny_qwen3_dir), "--requests", "12", "--clients", "4",
                          "--max-tokens", "8", "--duration", "60", "--json", str(out),
                          "--serve-args", "--max-num-seqs 8"])
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["sent"] == 12 and report["num_5xx"] == 0 and report["final_used_blocks"] == 0
