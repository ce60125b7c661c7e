"""Steps of few rows: the BLAS on one thread, skinny products split over the CPU streams
(engine/split_linear.py), the same numbers, and the threads given back when idle."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nano_qwen3_mlx import blas
from nano_qwen3_mlx.engine import split_linear
from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams


def test_only_plain_linears_are_swapped_and_their_products_are_unchanged():
    big = nn.Linear(1024, 1024)  # 4 MiB: split while single-threaded
    small = nn.Linear(64, 32, bias=False)  # below MIN_SPLIT_BYTES: multiplied whole
    quantized = nn.QuantizedLinear(64, 64)
    embed = nn.Embedding(2048, 1024)  # a tied output layer: as_linear splits too
    model = nn.Sequential(big, small, quantized, embed)
    x = mx.random.normal((3, 1024), key=mx.random.key(1))
    expected, expected_logits = big(x), embed.as_linear(x)
    swapped = split_linear.split_linears(model)
    if not blas.threads_switchable():  # no OpenBLAS loaded here: nothing to switch, no swap
        assert swapped == 0 and type(big) is nn.Linear
        return
    assert swapped == 3 and type(big) is split_linear.StreamSplitLinear
    assert type(embed) is split_linear.StreamSplitEmbedding
    assert type(quantized) is nn.QuantizedLinear
    calls = []
    real = split_linear.split_matmul
    split_linear.split_matmul = lambda a, w: calls.append(w.shape) or real(a, w)
    try:
        blas.set_single_threaded(True)
        got = big(x)
        small(x[:, :64])
        many_rows = big(mx.concatenate([x] * 30))  # > MAX_ROWS: multiplied whole
        logits = embed.as_linear(x)
        rows = embed(mx.array([1, 2]))  # a lookup stays a lookup
    finally:
        blas.set_single_threaded(False)
        split_linear.split_matmul = real
    assert calls == [(1024, 1024), (2048, 1024)]  # the big layers only, only for few rows
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(many_rows[:3]), np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(logits), np.array(expected_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(rows), np.array(embed.weight[1:3]))


def test_few_row_steps_run_single_threaded_and_the_idle_engine_gives_the_threads_back(
        tiny_qwen3_dir, monkeypatch):
    calls = []
    real = blas.set_single_threaded
    monkeypatch.setattr(blas, "set_single_threaded", lambda on: calls.append(on) or real(on))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(1000, 1100)), list(range(2000, 2090))]  # chunks of > MAX_ROWS rows
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, block_size=16) as llm:
        out = llm.generate(prompts, params)
        assert [len(o["token_ids"]) for o in out] == [4, 4]
        prompt_step = calls.index(False)  # the chunks keep the threads
        assert True in calls[prompt_step:]  # the two rows' decode steps run single-threaded
        assert calls[-1] is False and not blas.single_threaded()  # idle: given back
        with_split = [o["token_ids"] for o in llm.generate(prompts, params)]
        calls.clear()
        llm.generate(prompts[:1], params)  # one row: batch-1 decode keeps the threads
        assert True not in calls
        calls.clear()
        llm.generate([list(range(3000, 3020)), list(range(4000, 4025))], params)
        assert calls[0] is False  # 45 prompt tokens (<= MAX_ROWS) still keep the threads
        assert True in calls  # then the two rows decode single-threaded
    monkeypatch.setattr(split_linear, "MAX_ROWS", 0)  # never single-threaded
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, block_size=16) as llm:
        assert [o["token_ids"] for o in llm.generate(prompts, params)] == with_split
