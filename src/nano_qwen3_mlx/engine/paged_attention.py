"""The ``AttentionContext`` of one packed step over the paged KV cache.

A packed step is a flat list of T tokens: the model sees them as T rows of length 1
(``input_ids`` of shape ``(T, 1)``), so projections and MLP run as one ``(T, hidden)`` matrix
and RoPE gets one position per token. Attention then needs to know each token's sequence:

- decode tokens (one per sequence) come first and attend together, reading the pool in
  place with ``mx.gather_mm`` (per-block scores, one softmax across blocks, per-block values),
  or ``mx.gather_qmm`` where the cache is quantized (``--kv-cache-dtype int8|int4``; on
  the CPU the ``cpu_attention`` kernel instead); on CPU split by sequence (or, for one
  sequence, by kv head) over one stream per core;
- each prefill chunk (several tokens of one sequence) attends with SDPA over its sequence's
  blocks gathered into a contiguous ``(1, n_kv, S, D)`` copy, causal from its start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..models.base import RecurrentFn
from ..streams import CORES, on_streams, split_ranges
from . import cpu_attention
from .kv_cache import PagedKVCache
from .recurrent import RecurrentStep

MAX_SCORES = 1 << 26  # attention scores one SDPA call may hold (256 MB in float32)
LOG2E = math.log2(math.e)  # decode scores in base 2: exp(x) = 2 ** (x * log2(e))
MAX_PARTS = 8  # most streams one layer's attention is split over (CPU)
# Below these a layer's attention is too little work to split: the hand-offs between the
# streams (an event per piece, the concatenation) cost what the other cores save. Measured on
# two cores (4 layers, kv shape): decode breaks even at ~4.5 MB (2.5 MB: 0.24 -> 0.28 ms,
# 8.5 MB: 0.56 -> 0.46 ms); a chunk at 0.5M scores was slower split, at 1M 20 -> 16 ms.
MIN_SPLIT_BYTES = 6 << 20  # decode: the K/V bytes the step's decode rows read per layer
MIN_SPLIT_SCORES = 1 << 20  # prefill chunk: its attention scores (heads x queries x keys)
_CORES = CORES  # (a module global, so a test can pretend another core count)


def attention_parts(work: int, min_work: int) -> int:
    """How many pieces one layer's attention (``work`` units of it) is split into, each on
    its own stream: one below ``min_work``.

    MLX runs each CPU op on one thread, and a thread alone cannot draw the memory bandwidth a
    long-context decode needs (nor run a prefill chunk's softmax faster than one core): a
    piece per core reads the pool with every core (2K x 8 decode on two cores: 15.7 -> 7.9 ms
    per layer; a 2,048-token chunk's SDPA 1.27 -> 0.80 s). A GPU spreads each op over all its
    cores already: one piece.
    """
    if mx.default_device() != mx.cpu or work < min_work:
        return 1
    return max(1, min(MAX_PARTS, _CORES))


@dataclass(slots=True)
class DecodePart:
    """The query rows of a decode group one stream attends: sequences ``seqs`` x kv heads
    ``heads``, with the indices its block products and mask use."""

    seqs: slice
    heads: slice
    bias: mx.array  # (Bp, 1, nb, 1, bs) float32: 0 where the key position is valid, -inf past it
    lhs: mx.array  # (Bp * Hp * nb,) uint32: query row (sequence, kv head) of each block product
    rhs: mx.array  # (Bp * Hp * nb,) uint32: pool row (block, kv head) of each block product
    rows: mx.array  # (Bp * Hp * nb,) uint32: 0, 1, ...: each block product's own score rows

    @classmethod
    def build(cls, seqs: slice, heads: slice, bias: np.ndarray, pool_rows: np.ndarray) -> DecodePart:
        """``bias`` (B, 1, nb, 1, bs) and ``pool_rows`` (B, n_kv, nb) of the whole group."""
        rhs = pool_rows[seqs, heads]
        n, nb = rhs.shape[0] * rhs.shape[1], rhs.shape[2]
        return cls(seqs, heads, mx.array(bias[seqs]), mx.array(np.repeat(np.arange(n, dtype=np.uint32), nb)),
                   mx.array(rhs.reshape(-1).astype(np.uint32)), mx.arange(n * nb, dtype=mx.uint32))


@dataclass(slots=True)
class DecodeGroup:
    """The step's one-token rows: their block tables (padded with the scratch block), the
    mask, and the pieces every layer's decode attention is split into (built once per step).

    Pieces split the sequences, or, for one sequence, its kv heads (``split_heads``); a pool
    the CPU kernel reads gets none (it reads ``host_tables`` and splits its own work)."""

    tables: mx.array  # (B, nb) int32
    valid: mx.array  # (B, 1, nb, bs, 1) bool: key position < sequence length (SDPA path)
    parts: list[DecodePart]
    split_heads: bool
    host_tables: np.ndarray  # (B, nb) int32 and (B,) int32: what the CPU kernel reads
    lengths: np.ndarray

    @classmethod
    def build(cls, tables: np.ndarray, lengths: np.ndarray, cache: PagedKVCache,
              num_parts: int | None = None) -> DecodeGroup:
        B, nb = tables.shape
        bs = cache.block_size
        valid = np.arange(nb * bs)[None] < lengths[:, None]  # (B, nb * bs)
        split_heads = B == 1
        # The CPU kernel reads host_tables and splits its own work: no pieces for it.
        parts = ([] if cache.read_path == "cpu_kernel"
                 else _decode_parts(tables, valid, cache, split_heads, num_parts))
        tables, lengths = np.ascontiguousarray(tables, np.int32), np.ascontiguousarray(lengths, np.int32)
        return cls(mx.array(tables), mx.array(valid.reshape(B, 1, nb, bs, 1)), parts, split_heads,
                   tables, lengths)

    def __len__(self) -> int:
        return self.tables.shape[0]

    def attend(self, fn: Callable[[DecodePart], mx.array]) -> mx.array:
        """``fn`` of every piece, each on its stream, joined: ``(B, n_kv, ...)``."""
        return on_streams(fn, self.parts, axis=1 if self.split_heads else 0)


def _decode_parts(tables: np.ndarray, valid: np.ndarray, cache: PagedKVCache, split_heads: bool,
                  num_parts: int | None) -> list[DecodePart]:
    """The group's pieces, one per stream (``attention_parts``): its sequences, or for one
    sequence its kv heads."""
    (B, nb), n_kv, bs = tables.shape, cache.num_kv_heads, cache.block_size
    bias = np.where(valid, np.float32(0), np.float32(-np.inf)).reshape(B, 1, nb, 1, bs)
    pool_rows = tables[:, None, :] * n_kv + np.arange(n_kv)[None, :, None]  # (B, n_kv, nb)
    layer_bytes = B * nb * bs * cache.bytes_per_token // len(cache.k_pools)
    pieces = split_ranges(n_kv if split_heads else B,
                          num_parts or attention_parts(layer_bytes, MIN_SPLIT_BYTES))
    return [DecodePart.build(slice(0, B), r, bias, pool_rows) if split_heads
            else DecodePart.build(r, slice(0, n_kv), bias, pool_rows) for r in pieces]


@dataclass(slots=True)
class PrefillChunk:
    """``num_tokens`` consecutive tokens of one sequence, whose keys end at ``end``."""

    num_tokens: int
    end: int  # start position + num_tokens: the keys this chunk sees
    table: mx.array  # (1, ceil(end / block_size)) int32
    samples: bool = False  # is its last token sampled?
    num_sampled: int = 1  # where it samples: its last this many (a speculating row: 1 + drafts)


@dataclass(slots=True)
class SampledRows:
    """Which tokens' outputs the step reads after the last layer (the ones it samples)."""

    last_layer: int
    tokens: mx.array  # packed indices of the sampled tokens
    decode: mx.array | None  # of the decode rows, those that sample (None: all do)


class PagedAttention:
    """Writes every token's K/V into its slot, then attends each group of the step.

    Rows are ordered: the decode group's tokens, then each prefill chunk's tokens.
    """

    def __init__(
        self, cache: PagedKVCache, positions: mx.array, blocks: mx.array, block_offsets: mx.array,
        decode: DecodeGroup | None, chunks: list[PrefillChunk], sampled: SampledRows | None = None,
        recurrent: RecurrentStep | None = None,
    ) -> None:
        self.cache = cache
        self.offsets = positions  # (T,) RoPE position of every token
        self.blocks, self.block_offsets = blocks, block_offsets  # (T,) where each token's K/V goes
        self.decode, self.chunks, self.sampled = decode, chunks, sampled
        self.pruned = False  # did the last layer ask for only the sampled rows?
        self.recurrent = recurrent  # a hybrid model's recurrent layers (recurrent.py)

    def output_rows(self, layer_idx: int) -> mx.array | None:
        if self.sampled is None or layer_idx != self.sampled.last_layer:
            return None
        self.pruned = True
        return self.sampled.tokens

    def recur(self, layer_idx: int, inputs: tuple[mx.array, ...], fn: RecurrentFn) -> mx.array:
        """A recurrent layer over the step: ``inputs`` and the result are ``(T, 1, ...)``,
        ``fn`` runs per sequence group on its slot's states (``RecurrentStep``)."""
        if self.recurrent is None:
            raise RuntimeError("ctx.recur called, but the model declares no state_layers")
        if self.pruned:  # the rows it would need are gone
            raise RuntimeError("a recurrent layer ran after the last attention layer asked "
                               "for output_rows: only the last layers may prune")
        return self.recurrent(layer_idx, inputs, fn)

    def attend(self, layer_idx: int, queries, keys, values, scale: float) -> mx.array:
        """``queries`` (T, H, 1, D), ``keys``/``values`` (T, n_kv, 1, D) -> (T, H, 1, D),
        or only the sampled rows where the layer asked for them (``output_rows``)."""
        T, n_kv, _, D = keys.shape
        self.cache.write(layer_idx, self.blocks, self.block_offsets,
                         keys.reshape(T, n_kv, D), values.reshape(T, n_kv, D))
        prune = self.pruned and layer_idx == self.sampled.last_layer
        outs, row = [], 0
        if self.decode is not None:
            row = len(self.decode)
            out = self._attend_decode(layer_idx, queries[:row], scale)
            outs.append(out[self.sampled.decode] if prune and self.sampled.decode is not None else out)
        for chunk in self.chunks:
            # Pruned: only the queries it samples (its last; a speculating row's drafts too).
            first = row + chunk.num_tokens - chunk.num_sampled if prune else row
            row += chunk.num_tokens
            if chunk.samples or not prune:
                outs.append(self._attend_chunk(layer_idx, queries[first:row], chunk, scale))
        if not outs:
            return mx.zeros((0, *queries.shape[1:]), queries.dtype)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    def _attend_decode(self, layer: int, q: mx.array, scale: float) -> mx.array:
        return decode_attention(self.cache, layer, q, self.decode, scale)

    def _attend_chunk(self, layer: int, q: mx.array, chunk: PrefillChunk, scale: float) -> mx.array:
        """The chunk's last ``len(q)`` queries against its sequence's keys, causally, its KV
        heads split over the streams (``attention_parts``).

        A quantized cache dequantizes the gathered copy of this sequence's blocks (the copy
        is made anyway); SDPA over it is one fused call, where quantized matmuls would need
        the scores materialised.
        """
        k, v = self.cache.gather(layer, chunk.table)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        n, q = q.shape[0], q.transpose(2, 1, 0, 3)  # (1, H, n, D)
        group = q.shape[1] // k.shape[1]
        # Where SDPA is not fused (CPU) it materialises (H, rows, keys) scores: split the
        # queries so that stays under MAX_SCORES elements (all pieces together) at long contexts.
        step = max(1, MAX_SCORES // (q.shape[1] * chunk.end))

        def attend(heads: slice) -> mx.array:
            qh = q[:, heads.start * group:heads.stop * group]
            outs = []
            for a in range(0, n, step):
                b = min(a + step, n)
                end = chunk.end - n + b  # the keys query row b - 1 sees
                # "causal" aligns the queries with the last of the ``end`` keys.
                outs.append(mx.fast.scaled_dot_product_attention(
                    qh[:, :, a:b], k[:, heads, :end], v[:, heads, :end], scale=scale, mask="causal"))
            return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

        parts = attention_parts(q.shape[1] * n * chunk.end, MIN_SPLIT_SCORES)
        out = on_streams(attend, split_ranges(k.shape[1], parts), axis=1)
        return out.transpose(2, 1, 0, 3)


def decode_attention(cache: PagedKVCache, layer: int, q: mx.array, group: DecodeGroup,
                     scale: float) -> mx.array:
    """The decode rows' attention ``(B, H, 1, D)`` by the cache's ``read_path``."""
    if cache.read_path == "gather_mm":
        return decode_gather_mm(cache, layer, q, group, scale)
    if cache.read_path == "gather_qmm":
        return decode_gather_qmm(cache, layer, q, group, scale)
    if cache.read_path == "cpu_kernel":
        return cpu_attention.decode_attention(cache, layer, q, group, scale)
    k, v = cache.gather(layer, group.tables)
    mask = group.valid.reshape(len(group), 1, 1, -1)
    return mx.fast.scaled_dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, mask=mask
    )


def decode_gather_mm(cache: PagedKVCache, layer: int, q: mx.array, group: DecodeGroup,
                     scale: float) -> mx.array:
    """One query per sequence against its blocks, read where they lie in the pool.

    Scores are ``q @ K_block^T`` per (sequence, kv head, block) (K is read through a
    transposed view, not copied); values ``p @ V_block`` (``_decode_blocks``).
    """
    D, bs = cache.head_dim, cache.block_size
    k_pool = cache.k_pools[layer].reshape(-1, bs, D).swapaxes(-1, -2)  # (blocks*n_kv, D, bs): a view
    v_pool = cache.v_pools[layer].reshape(-1, bs, D)
    return _decode_blocks(
        cache, q, group, scale,
        lambda rows, part: mx.gather_mm(rows, k_pool, part.lhs, part.rhs),
        lambda probs, part: mx.gather_mm(probs, v_pool, part.rows, part.rhs))


def decode_gather_qmm(cache: PagedKVCache, layer: int, q: mx.array, group: DecodeGroup,
                      scale: float) -> mx.array:
    """``decode_gather_mm`` over a quantized pool: ``mx.gather_qmm`` multiplies each block's
    packed rows where they lie, dequantizing group by group inside the kernel.

    Scores use ``transpose=True`` (K rows are quantized along head_dim); values
    ``transpose=False`` (V's quantization groups run along the output axis, head_dim, as the
    kernel wants).
    """
    bs, quant = cache.block_size, {"group_size": cache.group_size, "bits": cache.bits}
    k = [pools[layer].reshape(-1, bs, pools[layer].shape[-1]) for pools in cache.k_parts]
    v = [pools[layer].reshape(-1, bs, pools[layer].shape[-1]) for pools in cache.v_parts]
    return _decode_blocks(
        cache, q, group, scale,
        lambda rows, part: mx.gather_qmm(rows, *k, lhs_indices=part.lhs, rhs_indices=part.rhs,
                                         transpose=True, **quant),
        lambda probs, part: mx.gather_qmm(probs, *v, lhs_indices=part.rows,
                                          rhs_indices=part.rhs, transpose=False, **quant))


BlockProduct = Callable[[mx.array, DecodePart], mx.array]  # (rows, piece) -> block products


def _decode_blocks(cache: PagedKVCache, q: mx.array, group: DecodeGroup, scale: float,
                   scores: BlockProduct, values: BlockProduct) -> mx.array:
    """The decode rows' attention ``(B, H, 1, D)`` from the read path's two block products.

    Per piece of the group (each on its stream): ``scores(q rows, part)`` gives ``(Bp*Hp*nb,
    G, bs)`` (G query heads per kv head), one softmax runs across the (block, position) axes
    (``_softmax_base2``), ``values(probabilities, part)`` gives each block's weighted values
    ``(Bp*Hp*nb, G, D)``, and the blocks are summed.
    """
    B, H, _, D = q.shape
    n_kv, bs = cache.num_kv_heads, cache.block_size
    G, nb = H // n_kv, group.tables.shape[1]
    q_g = (q.reshape(B, n_kv, G, D) * (scale * LOG2E)).astype(cache.dtype)

    def attend(part: DecodePart) -> mx.array:
        qp = q_g[part.seqs, part.heads]
        shape = (*qp.shape[:2], nb, G, bs)
        p, denom = _softmax_base2(scores(qp.reshape(-1, G, D), part).reshape(shape), part.bias)
        o = values(p.astype(cache.dtype).reshape(-1, G, bs), part)
        return _sum_blocks(o, denom, (*shape[:4], D))

    return group.attend(attend).reshape(B, H, 1, D).astype(q.dtype)


def _softmax_base2(s: mx.array, bias: mx.array) -> tuple[mx.array, mx.array]:
    """Unnormalised probabilities of scores ``s`` ``(Bp, Hp, nb, G, bs)`` already in base 2
    (the queries carry ``log2(e)``), and their sums ``(Bp, Hp, G, 1)``.

    ``2 ** x`` instead of ``exp``: MLX's CPU ``exp`` is the slowest part of this softmax
    (about 3.5 ms of a 2K x 8 layer's ~20), ``power(2, x)`` about a third of that, same
    float32 result to ~1e-7. The mask is one add of the step's precomputed float32 ``bias``
    ``(Bp, 1, nb, 1, bs)``, which is also what makes bf16/fp16 scores (GPU) float32 for the
    softmax: no separate cast.
    """
    s = s + bias
    p = mx.power(2.0, s - s.max(axis=(2, 4), keepdims=True))
    return p, p.sum(axis=(2, 4))[..., None]


def _sum_blocks(o: mx.array, denom: mx.array, shape: tuple[int, ...]) -> mx.array:
    """Per-block outputs ``o`` ``(Bp*Hp*nb, G, D)`` summed over blocks and normalised:
    ``(Bp, Hp, G, D)`` float32."""
    return o.astype(mx.float32).reshape(shape).sum(axis=2) / denom
