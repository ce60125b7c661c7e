"""Quantized layers on an x86 CPU: prompt chunks multiply through the dequantized weight
(engine/prompt_dequant.py), decode rows keep ``quantized_matmul``, the numbers agree."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nano_qwen3_mlx.engine import prompt_dequant
from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams
from tests.checkpoints import quantize_checkpoint


@pytest.mark.parametrize("bits", [4, 8])
def test_only_affine_quantized_linears_are_swapped_and_products_agree(bits, monkeypatch):
    monkeypatch.setattr(prompt_dequant, "scalar_quantized_matmul", lambda: True)
    quantized = nn.QuantizedLinear(256, 96, bias=True, group_size=64, bits=bits)
    plain = nn.Linear(8, 8)
    model = nn.Sequential(quantized, plain)
    x = mx.random.normal((40, 256), key=mx.random.key(2))
    expected = quantized(x)  # quantized_matmul, before the swap
    assert prompt_dequant.dequantize_prompt_products(model) == 1
    assert type(quantized) is prompt_dequant.PromptDequantLinear and type(plain) is nn.Linear
    calls = []
    real = mx.dequantize
    monkeypatch.setattr(prompt_dequant.mx, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    few = quantized(x[:3])  # decode rows: quantized_matmul still
    assert calls == []
    many = quantized(x)  # a prompt chunk: dequantized, then the BLAS
    assert calls == [1]
    np.testing.assert_allclose(np.array(few), np.array(expected[:3]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(many), np.array(expected), rtol=1e-4, atol=1e-4)


def test_no_swap_where_quantized_matmul_is_not_scalar(monkeypatch):
    monkeypatch.setattr(prompt_dequant, "scalar_quantized_matmul", lambda: False)
    layer = nn.QuantizedLinear(64, 64)
    assert prompt_dequant.dequantize_prompt_products(nn.Sequential(layer)) == 0
    assert type(layer) is nn.QuantizedLinear


def test_engine_greedy_is_the_same_with_and_without(tiny_qwen3_dir, tmp_path, monkeypatch):
    qdir = quantize_checkpoint(tiny_qwen3_dir, tmp_path / "q4", 4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(1000, 1100)), list(range(2000, 2040)), [7, 8, 9]]
    monkeypatch.setattr(prompt_dequant, "scalar_quantized_matmul", lambda: True)
    with LLM(str(qdir), num_kv_blocks=64, block_size=16) as llm:
        layer = llm.engine.model.model.layers[0].mlp.gate_proj
        assert type(layer) is prompt_dequant.PromptDequantLinear
        dequantized = [o["token_ids"] for o in llm.generate(prompts, params)]
    monkeypatch.setattr(prompt_dequant, "MIN_ROWS", 10**9)  # every product quantized_matmul
    with LLM(str(qdir), num_kv_blocks=64, block_size=16) as llm:
        assert [o["token_ids"] for o in llm.generate(prompts, params)] == dequantized
