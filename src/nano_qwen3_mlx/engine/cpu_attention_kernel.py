"""The numba kernel of ``cpu_attention`` (imported on first use: it compiles, or loads the
compiled code from numba's cache next to this file, or in the user's cache where that is
read-only).

The helpers are inlined in numba's IR (``inline="always"``): called as functions the same
loops ran ~3.5x slower (8 x 2,048, int8: 18 ms a layer against 5).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_jit = njit(nogil=True, fastmath=True, cache=True)
_inline = njit(nogil=True, fastmath=True, cache=True, inline="always")


@_inline
def _nibbles(byte):
    """A byte's two int4 codes (low nibble, high nibble) as float32."""
    whole = np.float32(byte)
    high = np.floor(whole * np.float32(0.0625))
    return whole - np.float32(16) * high, high


@_inline
def _dot(q, row, base, size, bits):
    """``q[base:base + size] . codes`` of one quantization group of a packed row."""
    total = np.float32(0)
    if bits == 8:  # code i is byte i
        qs, codes = q[base:base + size], row[base:base + size]
        for d in range(size):
            total += qs[d] * np.float32(codes[d])
    else:  # int4, ``q`` in ``_split_nibbles``' order: byte i's low nibble, then its high one
        n = size // 2
        lows, highs, codes = q[base:base + n], q[base + n:base + size], row[base // 2:base // 2 + n]
        for i in range(n):
            low, high = _nibbles(codes[i])
            total += lows[i] * low + highs[i] * high
    return total


@_inline
def _add_scaled(acc, row, base, size, bits, w):
    """``acc[base:base + size] += w * codes`` for one quantization group of a packed row."""
    if bits == 8:
        out, codes = acc[base:base + size], row[base:base + size]
        for d in range(size):
            out[d] += w * np.float32(codes[d])
    else:  # int4, ``acc`` in ``_split_nibbles``' order
        n = size // 2
        lows, highs, codes = acc[base:base + n], acc[base + n:base + size], row[base // 2:base // 2 + n]
        for i in range(n):
            low, high = _nibbles(codes[i])
            lows[i] += w * low
            highs[i] += w * high


@_inline
def _split_nibbles(x, out, size, back):
    """int4: each group's even positions (low nibbles), then its odd ones, so the loops over a
    group read both halves contiguously (strided, they did not vectorise: ~5x slower);
    ``back``: the inverse."""
    for base in range(0, x.shape[0], size):
        for i in range(size // 2):
            if back:
                out[base + 2 * i], out[base + 2 * i + 1] = x[base + i], x[base + size // 2 + i]
            else:
                out[base + i], out[base + size // 2 + i] = x[base + 2 * i], x[base + 2 * i + 1]


@_jit
def attend(q, k, ks, kb, v, vs, vb, tables, lengths, bits, lo, hi, out):
    """Pairs ``lo:hi`` (sequence-major) of ``q`` (B, n_kv, G, D), already scaled: scores,
    softmax, values, into ``out`` (B, n_kv, G, D).

    ``k``/``v``: the pool's packed rows as bytes ``(blocks, n_kv, block_size, D * bits / 8)``;
    ``ks``/``kb``/``vs``/``vb``: scales and biases ``(blocks, n_kv, block_size, groups)``;
    ``tables`` (B, nb) block ids; ``lengths`` (B,) keys per sequence.
    """
    n_kv, G, D = q.shape[1], q.shape[2], q.shape[3]
    bs, groups = k.shape[2], ks.shape[3]
    size = D // groups
    longest = 1
    for pair in range(lo, hi):
        longest = max(longest, lengths[pair // n_kv])
    s = np.empty((G, longest), np.float32)
    q_sums = np.empty((G, groups), np.float32)
    acc = np.empty((G, D), np.float32)
    p_biases = np.empty((G, groups), np.float32)  # sum over keys of p * bias, per group
    qp = np.empty((G, D), np.float32)  # this pair's queries, in the order the codes are read
    for pair in range(lo, hi):
        b, h, n = pair // n_kv, pair % n_kv, lengths[pair // n_kv]
        for g in range(G):
            if bits == 8:
                qp[g] = q[b, h, g]
            else:
                _split_nibbles(q[b, h, g], qp[g], size, False)
            for j in range(groups):
                q_sums[g, j] = qp[g, j * size:(j + 1) * size].sum()
        for t in range(n):  # scores: scale * (q . codes) + bias * sum(q), per group
            blk, r = tables[b, t // bs], t % bs
            row, scales, biases = k[blk, h, r], ks[blk, h, r], kb[blk, h, r]
            for g in range(G):
                qg, total = qp[g], np.float32(0)
                for j in range(groups):
                    dot = _dot(qg, row, j * size, size, bits)
                    total += scales[j] * dot + biases[j] * q_sums[g, j]
                s[g, t] = total
        for g in range(G):  # softmax over the sequence's keys
            top = s[g, :n].max()
            denom = np.float32(0)
            for t in range(n):
                s[g, t] = np.exp(s[g, t] - top)
                denom += s[g, t]
            s[g, :n] /= denom
        acc[:] = 0
        p_biases[:] = 0
        for t in range(n):  # values: p * scale * codes per group (+ the sum of p * bias, after)
            blk, r = tables[b, t // bs], t % bs
            row, scales, biases = v[blk, h, r], vs[blk, h, r], vb[blk, h, r]
            for g in range(G):
                p = s[g, t]
                for j in range(groups):
                    _add_scaled(acc[g], row, j * size, size, bits, p * scales[j])
                    p_biases[g, j] += p * biases[j]
        for g in range(G):
            for j in range(groups):
                acc[g, j * size:(j + 1) * size] += p_biases[g, j]
        for g in range(G):
            if bits == 8:
                out[b, h, g] = acc[g]
            else:
                _split_nibbles(acc[g], out[b, h, g], size, True)
