"""Paged attention over the block pool == dense SDPA, for decode rows and prefill chunks,
both read paths, fp32 and bf16, GQA, shared prefix blocks; writes touch only their slots."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.engine import paged_attention
from nano_qwen3_mlx.engine.kv_cache import PagedKVCache, gather_mm_supports
from nano_qwen3_mlx.engine.model_runner import ModelRunner, packed_order
from nano_qwen3_mlx.engine.scheduler import ScheduledBatch
from nano_qwen3_mlx.engine.sequence import Sequence
from nano_qwen3_mlx.sampling_params import SamplingParams

BS, D, NUM_BLOCKS = 4, 16, 40
PATHS = [(mx.float32, "gather_mm"), (mx.float32, "gather"), (mx.bfloat16, "gather")]
if gather_mm_supports(mx.bfloat16):  # Metal / CUDA
    PATHS.append((mx.bfloat16, "gather_mm"))


@st.composite
def steps(draw):
    """Sequences of 1..3 blocks + 1 tokens, each running its last ``n`` tokens this step;
    later sequences may share the first full blocks of the first one (a prefix hit)."""
    num_seqs = draw(st.integers(1, 4))
    lengths = [draw(st.integers(1, 3 * BS + 1)) for _ in range(num_seqs)]
    news = [draw(st.integers(1, n)) for n in lengths]
    shares = [0] + [draw(st.integers(0, min(lengths[0] - news[0], n - m) // BS))
                    for n, m in zip(lengths[1:], news[1:])]
    order = draw(st.permutations(range(NUM_BLOCKS)))
    unsampled = [draw(st.booleans()) for _ in lengths]  # mid-prompt chunk: nothing to sample
    return (lengths, news, shares, list(order), draw(st.sampled_from([1, 2])),
            draw(st.sampled_from([1, 2, 4])), unsampled, draw(st.booleans()))


def build_tables(lengths, shares, order):
    free, tables = iter(order), []
    for i, n in enumerate(lengths):
        own = [next(free) for _ in range(-(-n // BS) - shares[i])]
        tables.append(tables[0][:shares[i]] + own if shares[i] else own)
    return tables


def random_kv(lengths, shares, n_kv, dtype=mx.float32, head_dim=D):
    """Dense K/V per sequence (1, n_kv, S, head_dim); shared blocks hold the first sequence's
    values."""
    ks, vs = [], []
    for i, n in enumerate(lengths):
        k, v = mx.random.normal((2, 1, n_kv, n, head_dim)).astype(dtype)
        if shares[i]:
            cut = shares[i] * BS
            k = mx.concatenate([ks[0][:, :, :cut], k[:, :, cut:]], axis=2)
            v = mx.concatenate([vs[0][:, :, :cut], v[:, :, cut:]], axis=2)
        ks.append(k)
        vs.append(v)
    return ks, vs


def write_history(cache, tables, lengths, news, ks, vs):
    """What earlier steps wrote: every position before each sequence's new tokens."""
    for table, n, m, k, v in zip(tables, lengths, news, ks, vs):
        pos = np.arange(n - m)
        if len(pos):
            blocks = mx.array(np.array(table)[pos // BS])
            cache.write(0, blocks, mx.array(pos % BS), k[0, :, :n - m].swapaxes(0, 1),
                        v[0, :, :n - m].swapaxes(0, 1))


def make_batch(tables, lengths, news, unsampled):
    params = SamplingParams(temperature=0)
    batch = ScheduledBatch()
    for i, (table, n, m) in enumerate(zip(tables, lengths, news)):
        seq = Sequence(i, str(i), [0] * (n + unsampled[i]), params)
        seq.block_table, seq.num_computed_tokens = table, n - m
        batch.add(seq, m)
    return batch


def dense_reference(q, k, v, scale):
    """SDPA over the whole sequence; the queries are its last positions."""
    L, S = q.shape[2], k.shape[2]
    mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    f32 = [a.astype(mx.float32) for a in (q, k, v)]
    return mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask=mask)


@pytest.mark.parametrize("parts", [1, 3], ids=["one-stream", "3-streams"])
@pytest.mark.parametrize("max_scores", [paged_attention.MAX_SCORES, 40], ids=["whole", "split"])
@pytest.mark.parametrize(("dtype", "read_path"), PATHS, ids=lambda p: str(p))
@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=steps())
def test_paged_attention_equals_dense(dtype, read_path, max_scores, parts, case, monkeypatch):
    """``split``: a prefill chunk's queries attend in pieces (the long-context score cap);
    ``prune``: the layer asks for the sampled rows only, as the engine's last layer does;
    ``parts``: decode rows split over that many streams (by sequence, or by kv head for one), prefill chunks by kv head."""
    monkeypatch.setattr(paged_attention, "MAX_SCORES", max_scores)
    monkeypatch.setattr(paged_attention, "attention_parts", lambda *_: parts)
    lengths, news, shares, order, n_kv, group, unsampled, prune = case
    H, scale = n_kv * group, D**-0.5
    cache = PagedKVCache(1, NUM_BLOCKS, BS, n_kv, D, dtype, read_path=read_path)
    cache.k_pools[0] = mx.random.normal(cache.k_pools[0].shape).astype(dtype)  # stale data
    cache.v_pools[0] = mx.random.normal(cache.v_pools[0].shape).astype(dtype)
    tables = build_tables(lengths, shares, order)
    ks, vs = random_kv(lengths, shares, n_kv, dtype)
    qs = [mx.random.normal((1, H, m, D)).astype(dtype) for m in news]
    write_history(cache, tables, lengths, news, ks, vs)
    before_k, before_v = np.array(cache.k_pools[0].astype(mx.float32)), np.array(cache.v_pools[0].astype(mx.float32))

    batch = make_batch(tables, lengths, news, unsampled)
    rows = packed_order(batch)
    ctx = ModelRunner(SimpleNamespace(kv_layers=[None]), cache, None).attention_context(batch, rows)
    kept = ctx.output_rows(0) if prune else None
    packed = [lambda a, i=i: a[i][0].transpose(1, 0, 2)[:, :, None] for i in rows]  # (m, H, 1, D)
    new_k = [k[:, :, n - m:] for k, n, m in zip(ks, lengths, news)]
    new_v = [v[:, :, n - m:] for v, n, m in zip(vs, lengths, news)]
    out = ctx.attend(0, *(mx.concatenate([f(a) for f in packed]) for a in (qs, new_k, new_v)), scale)

    tol = 1e-5 if dtype == mx.float32 else 3e-2
    start = 0
    for i in rows:
        want = dense_reference(qs[i], ks[i], vs[i], scale)
        if kept is None:
            got = out[start:start + news[i]]
            start += news[i]
        elif unsampled[i]:
            continue
        else:
            got, want, start = out[start:start + 1], want[:, :, -1:], start + 1
        np.testing.assert_allclose(np.array(got.transpose(2, 1, 0, 3).astype(mx.float32)),
                                   np.array(want), atol=tol, rtol=tol)
    assert start == out.shape[0]
    assert_only_new_slots_written(cache, tables, lengths, news, before_k, before_v)


def assert_only_new_slots_written(cache, tables, lengths, news, before_k, before_v):
    """Every pool position outside the step's own new tokens is unchanged (scratch included)."""
    touched = np.zeros((NUM_BLOCKS + 1, BS), bool)
    for table, n, m in zip(tables, lengths, news):
        pos = np.arange(n - m, n)
        touched[np.array(table)[pos // BS], pos % BS] = True
    for before, pool in ((before_k, cache.k_pools[0]), (before_v, cache.v_pools[0])):
        after = np.array(pool.astype(mx.float32)).transpose(0, 2, 1, 3)  # (blocks, bs, n_kv, D)
        np.testing.assert_array_equal(after[~touched], before.transpose(0, 2, 1, 3)[~touched])


def test_grow_keeps_contents_and_moves_the_scratch_block():
    cache = PagedKVCache(2, 3, BS, 2, D, mx.float32)
    k = mx.random.normal((5, 2, D))
    blocks, offsets = mx.array([0, 0, 1, 2, 2]), mx.array([0, 3, 1, 2, 3])
    cache.write(1, blocks, offsets, k, -k)
    old_k, old_v = np.array(cache.k_pools[1][:3]), np.array(cache.v_pools[1][:3])
    cache.grow(4)
    assert cache.num_blocks == 7 and cache.scratch_block == 7
    assert cache.k_pools[1].shape[0] == cache.v_pools[1].shape[0] == 8
    np.testing.assert_array_equal(np.array(cache.k_pools[1][:3]), old_k)
    np.testing.assert_array_equal(np.array(cache.v_pools[1][:3]), old_v)
    assert not np.array(cache.k_pools[1][3:]).any()
    cache.write(1, mx.array([6]), mx.array([1]), k[:1], k[:1])  # a new block is writable
    np.testing.assert_array_equal(np.array(cache.v_pools[1][6, :, 1]), np.array(k[0]))


def test_read_path_is_chosen_by_what_gather_mm_supports():
    assert PagedKVCache(1, 2, BS, 1, D, mx.float32).read_path == "gather_mm"
    expected = "gather_mm" if gather_mm_supports(mx.bfloat16) else "gather"
    assert PagedKVCache(1, 2, BS, 1, D, mx.bfloat16).read_path == expected
    with pytest.raises(ValueError, match="read_path"):
        PagedKVCache(1, 2, BS, 1, D, mx.float32, read_path="dense")


def test_copy_blocks_copies_every_layer_and_is_ordered_before_later_writes():
    """Copy-on-write of a reused prefix: whole blocks in all layers' K and V pools, and a
    write queued after the copy (this step's tokens in the copy) lands on top of it."""
    cache = PagedKVCache(2, 6, BS, 2, D, mx.float32)
    for layer in range(2):
        k = mx.random.normal((6 * BS, 2, D))
        cache.write(layer, mx.arange(6 * BS) // BS, mx.arange(6 * BS) % BS, k, k + 1)
    mx.eval(cache.k_pools, cache.v_pools)
    before_k = [np.array(p) for p in cache.k_pools]
    before_v = [np.array(p) for p in cache.v_pools]
    cache.copy_blocks([0, 3], [5, 1])
    new = mx.full((1, 2, D), 7.0)
    cache.write(1, mx.array([5]), mx.array([2]), new, new)  # lazily, after the copy
    for layer in range(2):
        for pools, before in ((cache.k_pools, before_k), (cache.v_pools, before_v)):
            after, old = np.array(pools[layer]), before[layer]
            expected = old.copy()
            expected[5], expected[1] = old[0], old[3]
            if layer == 1:
                expected[5, :, 2] = 7.0
            np.testing.assert_array_equal(after, expected)
    cache.copy_blocks([], [])  # nothing to copy: nothing queued


def test_copy_blocks_updates_the_pools_in_place():
    """Copy-on-write moves the copied rows, not the pools: a lazy gather of the source rows
    held each pool's buffer, so every update used to copy its whole pool."""
    cache = PagedKVCache(2, 255, BS, 2, 64, mx.float32)  # 4 pools of 512 KiB
    mx.eval(cache.k_pools, cache.v_pools)
    pool_bytes = cache.k_pools[0].nbytes
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    cache.copy_blocks([0, 3], [5, 1])
    mx.eval(cache.k_pools, cache.v_pools)
    assert mx.get_peak_memory() - before < pool_bytes / 4


def test_pieces_run_on_whichever_thread_attends(monkeypatch):
    """MLX streams belong to the thread that made them: an engine that moves to another
    thread (the server's engine thread) must still attend, with the same result."""
    monkeypatch.setattr(paged_attention, "attention_parts", lambda *_: 2)
    cache = PagedKVCache(1, 8, BS, 2, D, mx.float32)
    slots = mx.arange(8 * BS)
    kv = mx.random.normal((2, 8 * BS, 2, D))
    cache.write(0, slots // BS, slots % BS, kv[0], kv[1])
    tables = np.arange(8, dtype=np.int32).reshape(2, 4)
    group = paged_attention.DecodeGroup.build(tables, np.array([13, 16], np.int32), cache)
    q = mx.random.normal((2, 4, 1, D))

    def attend() -> np.ndarray:
        return np.array(paged_attention.decode_attention(cache, 0, q, group, D**-0.5))

    here = attend()
    there = []
    thread = threading.Thread(target=lambda: there.append(attend()))
    thread.start()
    thread.join()
    assert len(there) == 1 and np.allclose(here, there[0])


def test_only_enough_work_is_split_over_the_streams(monkeypatch):
    """A decode group splits over the cores once its K/V bytes per layer reach
    MIN_SPLIT_BYTES (below, the streams' hand-offs cost what the cores save); a GPU never
    splits (its ops use every core already)."""
    monkeypatch.setattr(paged_attention, "_CORES", 2)
    cache = PagedKVCache(1, 8, BS, 2, D, mx.float32)
    tables = np.arange(8, dtype=np.int32).reshape(2, 4)
    lengths = np.array([13, 16], np.int32)
    group_bytes = 2 * 4 * BS * cache.bytes_per_token  # 2 sequences x 4 blocks, one layer
    monkeypatch.setattr(paged_attention, "MIN_SPLIT_BYTES", group_bytes + 1)
    assert len(paged_attention.DecodeGroup.build(tables, lengths, cache).parts) == 1
    monkeypatch.setattr(paged_attention, "MIN_SPLIT_BYTES", group_bytes)
    on_cpu = mx.default_device() == mx.cpu
    assert len(paged_attention.DecodeGroup.build(tables, lengths, cache).parts) == (2 if on_cpu else 1)
