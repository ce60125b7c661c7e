"""``--kv-cache-dtype`` through the engine: greedy tokens against the float cache, prefix
reuse that copies quantized blocks, the memory cap and ``/stats``, option validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nano_qwen3_mlx.engine.kv_cache import KVLayout
from nano_qwen3_mlx.errors import InvalidRequestError
from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams
from tests.test_prefix_reuse import run

BS = 16
PROMPTS = [[(31 * i + 17 * k) % 5000 + 300 for i in range(n)] for k, n in enumerate((5, 23, 40, 70))]
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def greedy(model_dir, **options) -> list[list[int]]:
    with LLM(str(model_dir), num_kv_blocks=128, block_size=BS, **options) as llm:
        return [out["token_ids"] for out in llm.generate(PROMPTS, PARAMS)]


def test_int8_greedy_tokens_agree_with_the_float_cache(tiny_qwen3_dir):
    """Batched greedy decoding with int8 K/V (tiny fp32 Qwen3, head_dim 32: one group per
    row): the tokens before the first disagreement are at least 90% of all tokens."""
    ref = greedy(tiny_qwen3_dir)
    got = greedy(tiny_qwen3_dir, kv_cache_dtype="int8")
    agreed = sum(next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
                 for r, g in zip(ref, got))
    total = sum(map(len, ref))
    print(f"int8 KV: {agreed}/{total} greedy tokens agree before the first difference")
    assert agreed >= 0.9 * total


def test_float16_cache_for_a_float32_model(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=32, block_size=BS, kv_cache_dtype="float16") as llm:
        kv = llm.get_stats()["kv_cache"]
        assert kv["dtype"] == "float16" and kv["bytes_per_token"] == 2 * 2 * 2 * 32 * 2
        assert llm.engine.cache.read_path in ("gather_mm", "gather")
        assert len(llm.generate_single(PROMPTS[1], PARAMS)["token_ids"]) == 24


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_prefix_reuse_copies_quantized_blocks(tiny_qwen3_dir, kv_cache_dtype):
    """A match ending inside a block is copied (packed words, scales, biases): the reused
    request's greedy tokens equal a run of the same quantized cache without prefix caching."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = [(7 * i) % 1500 + 200 for i in range(2 * BS + 3)]
    shared = BS + 9
    second = first[:shared] + list(range(3000, 3000 + BS + 4))
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, block_size=BS,
             kv_cache_dtype=kv_cache_dtype) as llm:
        run(llm, first, params)
        hits = llm.engine.block_manager.num_partial_hits
        tokens, computed, cached = run(llm, second, params)
        assert computed == len(second) - shared and cached == shared
        assert llm.engine.block_manager.num_partial_hits == hits + 1
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, block_size=BS, kv_cache_dtype=kv_cache_dtype,
             enable_prefix_caching=False) as plain:
        expected, _, _ = run(plain, second, params)
    assert tokens == expected


def test_memory_cap_counts_quantized_bytes(tiny_qwen3_dir):
    """The same ``kv_cache_gb`` holds ~3.6x the blocks in int8 (tiny model: head_dim 32,
    fp32: 32 + 8 bytes a row against 128), and ``/stats`` reports the quantized layout."""
    caps, stats = {}, {}
    for name in (None, "int8", "int4"):
        with LLM(str(tiny_qwen3_dir), kv_cache_gb=0.001, block_size=BS, kv_cache_dtype=name) as llm:
            caps[name], stats[name] = llm.engine.pool.cap_blocks, llm.get_stats()["kv_cache"]
    per_token = {name: 2 * 2 * 2 * KVLayout.parse(name, _f32(), 32).row_bytes(32) for name in caps}
    assert per_token == {None: 1024, "int8": 320, "int4": 192}
    for name, cap in caps.items():
        assert stats[name]["bytes_per_token"] == per_token[name]
        assert stats[name]["dtype"] == (name or "float32")
        assert cap == int(1e6 // (per_token[name] * BS)) - 1  # the scratch block counts too
        assert stats[name]["cap_bytes"] == (cap + 1) * BS * per_token[name] <= 1e6


def _f32():
    import mlx.core as mx

    return mx.float32


@pytest.mark.parametrize("value", ["int3", "fp8", "INT8x"])
def test_llm_refuses_a_bad_kv_cache_dtype(tiny_qwen3_dir, value):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        LLM(str(tiny_qwen3_dir), kv_cache_dtype=value)


@pytest.mark.parametrize("command", [["generate", "hi", "--model", "{tiny}"],
                                     ["serve", "--model", "{tiny}"],
                                     ["bench", "--shape", "tiny"]])
def test_cli_bad_kv_cache_dtype_is_one_line_and_exit_2(tiny_qwen3_dir, command):
    args = [a.format(tiny=tiny_qwen3_dir) for a in command] + ["--kv-cache-dtype", "int3"]
    result = subprocess.run([sys.executable, "-m", "nano_qwen3_mlx.cli", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "kv_cache_dtype" in lines[0]


def test_cli_generate_with_int8_kv(tiny_qwen3_dir):
    result = subprocess.run([sys.executable, "-m", "nano_qwen3_mlx.cli", "generate", "Hello",
                             "--model", str(tiny_qwen3_dir), "-n", "5", "-t", "0", "--no-chat",
                             "--kv-cache-dtype", "int8"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "5 tokens" in result.stderr.strip().splitlines()[-1]


def test_hybrid_model_with_int8_kv(qwen_tokenizer_dir):
    """A hybrid model's attention layers on an int8 pool (head_dim 32), its recurrent states
    beside it in the same budget: greedy tokens as with the float pool, for most tokens, and
    a shared prompt reuses its snapshot and quantized blocks."""
    from tests.toy_hybrid import ToyHybridLM, toy_engine

    model = ToyHybridLM(dim=128)
    prompts = [list(range(10, 19)), list(range(30, 53)), list(range(30, 53)) + [7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for name in (None, "int8"):
        engine = toy_engine(model, qwen_tokenizer_dir, block_size=4, state_snapshot_interval=8,
                            num_kv_blocks=128, max_num_seqs=4, device="cpu", kv_cache_dtype=name)
        got = []
        for prompt in prompts:  # one after another: the third reuses the second's prefix
            request_id = engine.add_request(prompt, params)
            out = []
            while engine.has_unfinished_requests():
                out += [t for o in engine.step() if o.request_id == request_id for t in o.token_ids]
            got.append(out)
        tokens[name] = got
        assert engine.get_stats()["kv_cache"]["dtype"] == (name or "float32")
        assert engine.stats.num_computed_prompt_tokens < sum(map(len, prompts))  # reused
    same = sum(a == b for r, g in zip(tokens[None], tokens["int8"]) for a, b in zip(r, g))
    assert same >= 0.8 * sum(map(len, tokens[None]))
