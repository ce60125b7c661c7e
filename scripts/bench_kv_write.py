#!/usr/bin/env python3
"""Pool writes stay in place: time per KV write must not grow with the pool size.

    python scripts/bench_kv_write.py

Writes one decode step's K/V (a few slots) into pools of growing size through
``PagedKVCache.write`` and prints the mean time per write. A write that copied the pool
would grow linearly with it.
"""

from __future__ import annotations

import time

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx

from nano_qwen3_mlx.engine.kv_cache import PagedKVCache


def time_writes(num_blocks: int, batch: int = 8, repeats: int = 200) -> float:
    cache = PagedKVCache(1, num_blocks, 16, 8, 128, mx.float32)
    k = mx.random.normal((batch, 8, 128)).astype(mx.float32)
    blocks, offsets = mx.arange(batch), mx.zeros((batch,), mx.int32)  # one token per block
    for _ in range(10):  # warm-up
        cache.write(0, blocks, offsets, k, k)
    mx.eval(cache.k_pools, cache.v_pools)
    start = time.perf_counter()
    for _ in range(repeats):
        cache.write(0, blocks, offsets, k, k)
        mx.eval(cache.k_pools[0], cache.v_pools[0])
    return (time.perf_counter() - start) / repeats


def main() -> None:
    print(f"{'pool blocks':>12} {'pool MB':>9} {'us/write':>9}")
    for num_blocks in (64, 512, 4096, 16384):
        mb = 2 * num_blocks * 16 * 8 * 128 * 4 / 1e6
        print(f"{num_blocks:>12} {mb:>9.1f} {time_writes(num_blocks) * 1e6:>9.1f}")


if __name__ == "__main__":
    main()
