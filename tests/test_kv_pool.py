"""The KV pool grows on demand up to its hard cap, preempts (never fails) at the cap, and
shrinks back to its start size when idle, giving the memory back."""

from __future__ import annotations

import time

import mlx.core as mx
import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.kv_pool import KVPoolPolicy

# The tiny checkpoint: 2 layers x (K + V) x 2 kv heads x 32 dims x 4 bytes, 16-token blocks
# (given: the default on CPU is 64).
BS = 16
BLOCK_BYTES = 2 * 2 * 2 * 32 * 4 * BS
CAP_BLOCKS = 8


def test_policy_doubles_up_to_the_cap_and_shrinks_only_when_idle():
    policy = KVPoolPolicy(initial_blocks=8, cap_blocks=24, shrink_idle_s=5)
    assert policy.growth(8, 1) == 8  # doubling: few copies of the pool
    assert policy.growth(8, 30) == 16  # never past the cap
    assert policy.growth(24, 1) == 0  # at the cap: the scheduler preempts
    assert not policy.should_shrink(24, busy=True, now=0)
    assert not policy.should_shrink(24, busy=False, now=1)  # idle from now on
    assert not policy.should_shrink(24, busy=False, now=5.9)
    assert policy.should_shrink(24, busy=False, now=6.1)
    assert not policy.should_shrink(8, busy=False, now=100)  # already at its start size
    assert not KVPoolPolicy(16, 16).grows


def _drive(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list, int]:
    """Run all prompts by stepping the engine; check the cap after every step."""
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    texts, reasons, most = {i: [] for i in ids}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        most = max(most, engine.cache.num_blocks)
        assert engine.cache.num_blocks <= engine.pool.cap_blocks
        assert engine.cache.nbytes <= engine.kv_cap_bytes
        assert engine.block_manager.num_blocks == engine.cache.num_blocks
    assert set(reasons.values()) == {"length"}, reasons
    return [texts[i] for i in ids], most


def test_pool_grows_to_the_cap_preempts_and_shrinks_back(tiny_qwen3_dir):
    cap_gb = (CAP_BLOCKS + 1) * BLOCK_BYTES / 1e9
    # 4 x (20 prompt + 20 new) tokens = 12 blocks at once: more than the cap.
    prompts = [[1000 + 37 * i + j for j in range(20)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, max_num_seqs=4) as fixed:
        expected, _ = _drive(fixed, prompts, params)
    with LLM(str(tiny_qwen3_dir), kv_cache_gb=cap_gb, max_num_seqs=4, max_num_batched_tokens=16,
             kv_shrink_idle_s=0.2, block_size=BS) as llm:
        engine = llm.engine
        start = engine.cache.num_blocks
        assert engine.pool.cap_blocks == CAP_BLOCKS and start < CAP_BLOCKS
        mx.clear_cache()
        baseline = mx.get_active_memory()
        for _ in range(2):  # a long-running engine: load, idle, load again
            got, most = _drive(llm, prompts, params)
            assert got == expected  # growing kept every block's contents
            assert most == CAP_BLOCKS
            assert engine.scheduler.num_preemptions > 0
            assert not engine.shrink_if_idle()  # idle, but not for long enough yet
            time.sleep(0.3)
            assert engine.shrink_if_idle()
            assert engine.cache.num_blocks == engine.block_manager.num_blocks == start
            assert engine.block_manager.num_free_blocks == start
            mx.clear_cache()
            assert mx.get_active_memory() <= baseline + BLOCK_BYTES


def test_a_fixed_pool_never_grows(tiny_qwen3_dir):
    # 96 slots for 3 x 40 tokens: it must preempt.
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=6, max_num_seqs=3, block_size=BS) as llm:
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        _drive(llm, [[1000 + j + 50 * i for j in range(20)] for i in range(3)], params)
        assert llm.engine.cache.num_blocks == 6
        assert llm.engine.scheduler.num_preemptions > 0


def test_max_memory_gb_too_small_for_the_weights_is_a_clear_error(tiny_qwen3_dir):
    with pytest.raises(ValueError, match="max-memory-gb .* no room for the KV cache"):
        LLM(str(tiny_qwen3_dir), max_memory_gb=0.001)


@pytest.mark.parametrize(("options", "expected"), [
    ({"device": "cpu"}, 64), ({"device": "gpu"}, 16), ({"device": "cpu", "block_size": 16}, 16),
])
def test_the_block_size_defaults_by_device(options, expected):
    """Unset, the KV block is 64 tokens where MLX runs on the CPU (measured faster decode
    attention), 16 on a GPU; a given size is kept, and the engine builds its pool with it."""
    assert EngineConfig.load(model="m", **options).block_size == expected


def test_the_default_block_size_decodes_as_16_token_blocks_do(tiny_qwen3_dir):
    """Greedy tokens over 64-token blocks (prompts ending inside, at and past a block's end)
    equal those over 16-token blocks."""
    prompts = [[1000 + 7 * i + j for j in range(n)] for i, n in enumerate((50, 64, 100))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = {}
    for bs in (None, BS):
        with LLM(str(tiny_qwen3_dir), num_kv_blocks=40, device="cpu", block_size=bs) as llm:
            got[llm.engine.cache.block_size] = [r["token_ids"] for r in llm.generate(prompts, params)]
    assert got[64] == got[BS]


@pytest.mark.parametrize("kv_cache_dtype", [None, "float16", "int8", "int4"])
def test_pool_for_and_block_bytes_for_agree_with_the_arrays(kv_cache_dtype):
    """One pool builder for the target, a draft model and the MTP head: it stores every
    ``kv_layers`` layer in the layout, and ``block_bytes_for`` is what its arrays take."""
    from types import SimpleNamespace

    from nano_qwen3_mlx.engine.kv_cache import KVLayout, block_bytes_for, pool_for
    from nano_qwen3_mlx.models.contract import LayerKV

    model = SimpleNamespace(kv_layers=[LayerKV(2, 32)] * 2)  # the tiny checkpoint's layers
    layout = KVLayout.parse(kv_cache_dtype, mx.float32, 32)
    cache = pool_for(model, 5, BS, layout)
    assert (len(cache.k_pools), cache.num_blocks, cache.block_size) == (2, 5, BS)
    assert (cache.num_kv_heads, cache.head_dim, cache.layout) == (2, 32, layout)
    arrays = [a for parts in (*cache.k_parts, *cache.v_parts) for a in parts]
    assert sum(a.nbytes for a in arrays) == cache.nbytes == 6 * block_bytes_for(model, BS, layout)
    if kv_cache_dtype is None:
        assert block_bytes_for(model, BS, layout) == BLOCK_BYTES
    mixed = SimpleNamespace(kv_layers=[LayerKV(2, 32), LayerKV(1, 32)])
    with pytest.raises(ValueError, match="identical attention layers"):
        pool_for(mixed, 5, BS, layout)
