"""Decode attention over a quantized pool on the CPU: a numba kernel that reads each packed
K/V row once, where it lies (``read_path="cpu_kernel"``).

Why not ``mx.gather_qmm`` there: MLX's CPU quantized matmul vectorises only where its SIMD
layer has a backend (Accelerate/NEON on Apple silicon); on x86 its ``simd::max_size`` is 1
and the kernel is a scalar loop, so at 8 x 2,048 an int8 layer read 38 MB in ~19 ms (8% of
this machine's bandwidth limit) where the float32 pool's 134 MB took ~8 ms: int8 bought
memory but cost speed. This kernel computes, per (sequence, kv head), the scores
``q . (scale * k + bias)`` group by group as ``scale * (q . k) + bias * sum(q)`` on the
integer codes, one softmax, then ``sum_t p_t * (scale * v_t + bias)``: nothing dequantized
outside registers (``scripts/bench_decode_parts.py 2048 8 kv int8``: ~19 -> ~5 ms a layer).

The pieces run on Python threads (numba releases the GIL), one per core, each over a range
of (sequence, kv head) pairs balanced by context length. The step's graph is evaluated up to
this layer's queries and pool first (on the CPU backend queueing a step computes it anyway);
the pool is read in place through NumPy views that are dropped before the next write (MLX
updates a pool in place only while nothing else holds its buffer).

Used where numba is installed (a Linux dependency of the package), the device is the CPU,
and scales and biases are float32 (NumPy has no bfloat16); elsewhere ``gather_qmm``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from ..errors import first_line
from ..streams import PIECES, host_pool

if TYPE_CHECKING:
    from .kv_cache import PagedKVCache
    from .paged_attention import DecodeGroup

log = logging.getLogger(__name__)


def supports(bits: int | None, dtype: mx.Dtype) -> bool:
    """Can the kernel read a pool of ``bits``-bit codes with ``dtype`` scales here (and did
    it compile)?"""
    return (bits in (4, 8) and dtype == mx.float32 and mx.default_device() == mx.cpu
            and importlib.util.find_spec("numba") is not None and warm_up())


def decode_attention(cache: PagedKVCache, layer: int, q: mx.array, group: DecodeGroup,
                     scale: float) -> mx.array:
    """The decode rows' attention ``(B, H, 1, D)`` over layer ``layer``'s quantized pool."""
    B, H, _, D = q.shape
    n_kv = cache.num_kv_heads
    G = H // n_kv
    queries = (q.reshape(B, n_kv, G, D) * scale).astype(mx.float32)
    parts = [pools[layer] for pools in (*cache.k_parts, *cache.v_parts)]
    mx.eval(queries, parts)
    out = np.empty((B, n_kv, G, D), np.float32)
    _run(np.array(queries, copy=False), [np.array(p, copy=False) for p in parts],
         group.host_tables, group.lengths, cache.bits, out)
    return mx.array(out).reshape(B, H, 1, D).astype(q.dtype)


def _run(queries: np.ndarray, parts: list[np.ndarray], tables: np.ndarray, lengths: np.ndarray,
         bits: int, out: np.ndarray) -> None:
    """The kernel over every (sequence, kv head) pair, one range of pairs per core."""
    k, ks, kb, v, vs, vb = parts
    k, v = k.view(np.uint8), v.view(np.uint8)  # little-endian words: code i is byte i (int8)
    kernel = _kernel()
    n_kv = queries.shape[1]
    bounds = split_pairs(lengths, n_kv, PIECES)

    def piece(i: int) -> None:
        kernel(queries, k, ks, kb, v, vs, vb, tables, lengths, bits, bounds[i], bounds[i + 1], out)

    futures = [host_pool().submit(piece, i) for i in range(1, len(bounds) - 1)]
    piece(0)
    for future in futures:
        future.result()


def split_pairs(lengths: np.ndarray, n_kv: int, pieces: int) -> list[int]:
    """Bounds of at most ``pieces`` contiguous ranges of the (sequence, kv head) pairs
    (sequence-major), each cut where the keys read so far come nearest an equal share."""
    work = np.repeat(np.maximum(lengths.astype(np.int64), 1), n_kv)
    cum = np.concatenate([[0], np.cumsum(work)])
    targets = cum[-1] * np.arange(1, pieces) / pieces
    above = np.minimum(np.searchsorted(cum, targets), len(work))
    nearest = np.where(targets - cum[above - 1] < cum[above] - targets, above - 1, above)
    return sorted({0, len(work), *(int(c) for c in nearest if 0 < c < len(work))})


def _kernel():
    """The compiled kernel: numba imported and the function compiled (or read from numba's
    on-disk cache) on first use."""
    from .cpu_attention_kernel import attend

    return attend


@functools.cache
def warm_up() -> bool:
    """Compile the kernel now (numba: ~4 s; read from its cache in later processes: ~0.3 s)
    on a tiny pool, once per process, so the first decode step does not; False (and a
    warning) where it cannot, and pools are read by ``gather_qmm`` instead."""
    q = np.zeros((1, 1, 1, 64), np.float32)
    words = np.zeros((2, 1, 1, 16), np.uint32)
    params = np.ones((2, 1, 1, 1), np.float32)
    try:
        _run(q, [words, params, params, words, params, params], np.zeros((1, 1), np.int32),
             np.ones(1, np.int32), 8, np.empty_like(q))
    except Exception as exc:  # numba's compiler or its cache: the MLX path still works
        log.warning("quantized KV: the CPU decode kernel is unavailable (%s); using gather_qmm",
                    first_line(exc))
        return False
    return True
