"""Quantized KV cache (``--kv-cache-dtype int8|int4``): paged attention over the packed pool
equals dequantize-then-attend, for decode rows (in place: ``cpu_kernel`` on the CPU,
``gather_qmm``) and prefill chunks;
writes touch only their slots; copy-on-write copies scales and biases; the byte accounting."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from nano_qwen3_mlx.engine import cpu_attention, paged_attention
from nano_qwen3_mlx.engine.kv_cache import KVLayout, PagedKVCache, kv_bytes_per_token
from nano_qwen3_mlx.engine.model_runner import ModelRunner, packed_order
from tests.test_paged_attention import (
    BS,
    NUM_BLOCKS,
    build_tables,
    dense_reference,
    make_batch,
    random_kv,
    steps,
    write_history,
)

D = 64  # two groups of 32 or one of 64 along head_dim


def stored_kv(cache, table, n):
    """The first ``n`` positions of a sequence as the cache holds them, dequantized:
    ``(1, n_kv, n, D)`` each."""
    k_pool, v_pool = cache.dequantized(0)
    pos = np.arange(n)
    blocks, rows = mx.array(np.array(table)[pos // BS]), mx.array(pos % BS)
    return tuple(p[blocks, :, rows].swapaxes(0, 1)[None] for p in (k_pool, v_pool))


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("read_path", ["cpu_kernel", "gather_qmm", "gather"])
@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (8, 32), (4, 32)])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=steps())
def test_quantized_attention_equals_dequantize_then_attend(bits, group_size, read_path, parts, case,
                                                           monkeypatch):
    """``parts``: decode rows split over that many streams (by sequence, or kv head for one)."""
    monkeypatch.setattr(paged_attention, "attention_parts", lambda *_: parts)
    lengths, news, shares, order, n_kv, group, unsampled, prune = case
    H, scale = n_kv * group, D**-0.5
    cache = PagedKVCache(1, NUM_BLOCKS, BS, n_kv, D, mx.float32, read_path, bits, group_size)
    stale = mx.random.normal((NUM_BLOCKS + 1, BS, n_kv, D))  # every slot holds old values
    slots = mx.arange((NUM_BLOCKS + 1) * BS)
    cache.write(0, slots // BS, slots % BS,
                stale.reshape(-1, n_kv, D), -stale.reshape(-1, n_kv, D))
    tables = build_tables(lengths, shares, order)
    ks, vs = random_kv(lengths, shares, n_kv, head_dim=D)
    qs = [mx.random.normal((1, H, m, D)) for m in news]
    write_history(cache, tables, lengths, news, ks, vs)
    before = [np.array(pools[0]) for pools in (*cache.k_parts, *cache.v_parts)]

    batch = make_batch(tables, lengths, news, unsampled)
    rows = packed_order(batch)
    ctx = ModelRunner(SimpleNamespace(kv_layers=[None]), cache, None).attention_context(batch, rows)
    kept = ctx.output_rows(0) if prune else None
    packed = [lambda a, i=i: a[i][0].transpose(1, 0, 2)[:, :, None] for i in rows]
    new_k = [k[:, :, n - m:] for k, n, m in zip(ks, lengths, news)]
    new_v = [v[:, :, n - m:] for v, n, m in zip(vs, lengths, news)]
    out = ctx.attend(0, *(mx.concatenate([f(a) for f in packed]) for a in (qs, new_k, new_v)), scale)

    start = 0
    for i in rows:
        k, v = stored_kv(cache, tables[i], lengths[i])
        want = dense_reference(qs[i], k, v, scale)
        if kept is None:
            got = out[start:start + news[i]]
            start += news[i]
        elif unsampled[i]:
            continue
        else:
            got, want, start = out[start:start + 1], want[:, :, -1:], start + 1
        np.testing.assert_allclose(np.array(got.transpose(2, 1, 0, 3)), np.array(want),
                                   atol=1e-4, rtol=1e-4)
        # ... and what was stored is the original K/V, each value within one quantization
        # step of its group ((max - min) / (2^bits - 1)).
        orig = np.array(ks[i]).reshape(*ks[i].shape[:-1], D // group_size, group_size)
        step = (orig.max(-1, keepdims=True) - orig.min(-1, keepdims=True)) / (2**bits - 1)
        err = np.abs(np.array(k).reshape(orig.shape) - orig)
        assert (err <= step + 1e-5).all()
    assert start == out.shape[0]
    assert_only_new_slots_written(cache, tables, lengths, news, before)


def assert_only_new_slots_written(cache, tables, lengths, news, before):
    """Outside the step's own new tokens, every packed word, scale and bias is unchanged."""
    touched = np.zeros((NUM_BLOCKS + 1, BS), bool)
    for table, n, m in zip(tables, lengths, news):
        pos = np.arange(n - m, n)
        touched[np.array(table)[pos // BS], pos % BS] = True
    for old, pools in zip(before, (*cache.k_parts, *cache.v_parts)):
        after = np.array(pools[0]).transpose(0, 2, 1, 3)  # (blocks, bs, n_kv, width)
        np.testing.assert_array_equal(after[~touched], old.transpose(0, 2, 1, 3)[~touched])


def test_copy_blocks_copies_packed_values_scales_and_biases():
    """Copy-on-write keeps a block quantized: all three parts in every layer, bit for bit,
    and a write queued after the copy lands on top of it."""
    cache = PagedKVCache(2, 6, BS, 2, D, mx.float32, bits=8, group_size=32)
    for layer in range(2):
        k = mx.random.normal((6 * BS, 2, D)) * (layer + 1)
        cache.write(layer, mx.arange(6 * BS) // BS, mx.arange(6 * BS) % BS, k, k + 1)
    mx.eval(cache.k_parts, cache.v_parts)
    parts = [*cache.k_parts, *cache.v_parts]
    assert len(parts) == 6  # K and V: packed words, scales, biases
    before = [[np.array(p) for p in pools] for pools in parts]
    cache.copy_blocks([0, 3], [5, 1])
    new = mx.full((1, 2, D), 7.0)
    cache.write(1, mx.array([5]), mx.array([2]), new, new)
    written = [np.array(a) for a in mx.quantize(new, group_size=32, bits=8)]
    for j, pools in enumerate(parts):
        for layer in range(2):
            old = before[j][layer]
            expected = old.copy()
            expected[5], expected[1] = old[0], old[3]
            if layer == 1:
                expected[5, :, 2] = written[j % 3][0]
            np.testing.assert_array_equal(np.array(pools[layer]), expected)
    k_pool, _ = cache.dequantized(1)
    np.testing.assert_allclose(np.array(k_pool[5, :, 2]), 7.0, atol=1e-5)


def test_grow_keeps_quantized_contents():
    cache = PagedKVCache(1, 3, BS, 2, D, mx.float32, bits=4, group_size=64)
    k = mx.random.normal((3 * BS, 2, D))
    cache.write(0, mx.arange(3 * BS) // BS, mx.arange(3 * BS) % BS, k, k)
    old = cache.dequantized(0)
    cache.grow(5)
    assert cache.num_blocks == 8 and all(p[0].shape[0] == 9 for p in (*cache.k_parts, *cache.v_parts))
    new = cache.dequantized(0)
    for a, b in zip(old, new):
        np.testing.assert_array_equal(np.array(b[:3]), np.array(a[:3]))


@pytest.mark.parametrize(("name", "head_dim", "expected"), [
    # Qwen3 (head_dim 128, float32 model): int8 = 128 B + 2 groups x (scale + bias) x 4 B.
    ("int8", 128, 128 + 2 * 2 * 4),
    ("int4", 128, 64 + 4 * 2 * 4),  # int4: groups of 32
    ("float16", 128, 256),
    (None, 128, 512),
    # A head_dim of 32: one group of 32.
    ("int8", 32, 32 + 2 * 4),
])
def test_bytes_per_token_follow_the_quantized_layout(name, head_dim, expected):
    layout = KVLayout.parse(name, mx.float32, head_dim)
    assert layout.row_bytes(head_dim) == expected
    assert kv_bytes_per_token(layout, 3, 2, head_dim) == 2 * 3 * 2 * expected
    cache = PagedKVCache(3, 4, BS, 2, head_dim, layout.dtype, bits=layout.bits,
                         group_size=layout.group_size)
    assert cache.bytes_per_token == 2 * 3 * 2 * expected
    stored = sum(p.nbytes for pools in (*cache.k_parts, *cache.v_parts) for p in pools)
    assert cache.nbytes == stored  # the accounting is what the arrays hold
    assert cache.kv_dtype == (name or "float32")


def test_int8_meets_the_issue_target_of_at_most_0_3x_float32():
    f32 = KVLayout.parse("float32", mx.float32, 128).row_bytes(128)
    assert KVLayout.parse("int8", mx.float32, 128).row_bytes(128) / f32 <= 0.3
    assert KVLayout.parse("int8", mx.float32, 64).row_bytes(64) / 256 <= 0.3


def test_bad_kv_cache_dtype_and_head_dim_are_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        KVLayout.parse("int3", mx.float32, 128)
    with pytest.raises(ValueError, match="head_dim divisible by 32"):
        KVLayout.parse("int8", mx.float32, 48)
    with pytest.raises(ValueError, match="read_path"):
        PagedKVCache(1, 2, BS, 1, D, mx.float32, read_path="gather_mm", bits=8)
    with pytest.raises(ValueError, match="read_path"):
        PagedKVCache(1, 2, BS, 1, D, mx.float32, read_path="cpu_kernel")


def test_cpu_kernel_is_the_default_where_it_can_read_the_pool():
    """On the CPU with numba (a Linux dependency): int8/int4 pools with float32 scales are
    read by the kernel; bfloat16 scales (NumPy cannot view them) by ``gather_qmm``."""
    on_cpu = mx.default_device() == mx.cpu
    for bits in (8, 4):
        cache = PagedKVCache(1, 2, BS, 1, D, mx.float32, bits=bits, group_size=32)
        assert cache.read_path == ("cpu_kernel" if on_cpu else "gather_qmm")
    assert PagedKVCache(1, 2, BS, 1, D, mx.bfloat16, bits=8, group_size=32).read_path == "gather_qmm"


@pytest.mark.parametrize(("lengths", "n_kv", "pieces", "expected"), [
    ([100, 100], 2, 2, [0, 2, 4]),  # equal sequences: a sequence each
    ([300, 100, 100, 100], 1, 2, [0, 1, 4]),  # the long one alone
    ([50], 8, 2, [0, 4, 8]),  # one sequence: its kv heads split
    ([10], 1, 4, [0, 1]),  # fewer pairs than pieces
    ([0, 0, 5], 1, 3, [0, 2, 3]),  # empty rows count a key's worth; no empty piece
])
def test_split_pairs_balances_keys_read(lengths, n_kv, pieces, expected):
    assert cpu_attention.split_pairs(np.array(lengths, np.int32), n_kv, pieces) == expected


def test_a_kernel_that_cannot_compile_leaves_pools_to_gather_qmm(monkeypatch, caplog):
    """numba's compiler or cache failing (a read-only cache directory, say) costs speed, not
    the request: the pool is read by ``gather_qmm`` and the log says why."""
    def broken(*_):
        raise RuntimeError("cannot cache function 'attend': no locator available")

    monkeypatch.setattr(cpu_attention, "_run", broken)
    cpu_attention.warm_up.cache_clear()
    try:
        cache = PagedKVCache(1, 2, BS, 1, D, mx.float32, bits=8, group_size=32)
        assert cache.read_path == "gather_qmm"
        if mx.default_device() == mx.cpu:
            assert "CPU decode kernel is unavailable (cannot cache function" in caplog.text
        with pytest.raises(ValueError, match="did not compile"):
            PagedKVCache(1, 2, BS, 1, D, mx.float32, read_path="cpu_kernel", bits=8, group_size=32)
    finally:
        cpu_attention.warm_up.cache_clear()
