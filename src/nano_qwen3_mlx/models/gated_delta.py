"""Gated DeltaNet math in portable MLX ops (no Metal-only kernel): the causal depthwise
convolution with a carried state, q/k L2 normalisation and the gated delta rule.

The recurrence, per value head, on a state ``S`` of shape ``(Dv, Dk)`` (kept in float32)::

    S = g_t * S                                  # decay, g_t = exp(log_g_t) in (0, 1]
    S = S + beta_t * (v_t - S k_t) k_t^T         # delta rule: move S k_t towards v_t
    y_t = S q_t

Decoding (a few tokens) runs it step by step. A long chunk runs the equivalent chunkwise
(WY) form: within blocks of ``CHUNK`` tokens everything is matrix products, and only the
block boundaries are sequential, so a 512-token prompt is 8 sequential steps, not 512.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Block length of the chunkwise form, and the shortest run that uses it (shorter runs go
# step by step: padding them to a block would cost more than it saves).
CHUNK = 64
CHUNKED_FROM = 32


def gated_delta_net(
    qkv: mx.array, a: mx.array, b: mx.array, conv_state: mx.array, state: mx.array,
    conv_weight: mx.array, A_log: mx.array, dt_bias: mx.array, heads: tuple[int, int, int, int],
) -> tuple[mx.array, mx.array, mx.array]:
    """A Gated DeltaNet layer's recurrent part for one group of sequences (b, l): the
    convolution from ``conv_state``, silu, the q/k/v split (``heads`` = key heads, key head
    dim, value heads, value head dim), L2 norms, gates, and the delta rule from ``state``.
    Returns ``y`` (b, l, Hv, Dv) and the new convolution and recurrent states.

    One-token steps (decode) run as one compiled function: a dozen elementwise ops fuse
    into a few kernels, which is what a decode step's time is made of."""
    fn = _decode if qkv.shape[1] == 1 else _forward
    return fn(qkv, a, b, conv_state, state, conv_weight, A_log, dt_bias, heads)


def _forward(qkv, a, b, conv_state, state, conv_weight, A_log, dt_bias, heads):
    nk, dk, nv, dv = heads
    bsz, length, _ = qkv.shape
    conv, new_conv_state = causal_conv1d(qkv, conv_state, conv_weight)
    q, k, v = mx.split(nn.silu(conv), [nk * dk, 2 * nk * dk], axis=-1)
    q, k = l2_normalize_qk(q.reshape(bsz, length, nk, dk), k.reshape(bsz, length, nk, dk))
    v = v.reshape(bsz, length, nv, dv)
    beta = mx.sigmoid(b.astype(mx.float32))
    y, state = gated_delta_rule(q, k, v, log_decay(A_log, a, dt_bias), beta, state)
    return y, new_conv_state.astype(conv_state.dtype), state


# Traced once per batch size (and dtype); longer chunks are compute-bound and run as they are.
_decode = mx.compile(_forward)


def causal_conv1d(x: mx.array, state: mx.array, weight: mx.array) -> tuple[mx.array, mx.array]:
    """Depthwise causal convolution over ``x`` (b, l, C) preceded by ``state`` (b, K-1, C)
    (the previous inputs); ``weight`` is ``nn.Conv1d``'s (C, K, 1). Returns the output
    (b, l, C) and the new state (the last K-1 inputs)."""
    kernel = weight.shape[1]
    full = mx.concatenate([state.astype(x.dtype), x], axis=1)  # (b, l + K - 1, C)
    length = x.shape[1]
    w = weight[:, :, 0].T.astype(mx.float32)  # (K, C); sums in float32, as a conv does
    out = full[:, 0:length] * w[0]
    for i in range(1, kernel):  # K is 4: shifted multiply-adds, which a compiled step fuses
        out = out + full[:, i:i + length] * w[i]
    return out.astype(x.dtype), full[:, -(kernel - 1):]


def l2_normalize_qk(q: mx.array, k: mx.array, eps: float = 1e-6) -> tuple[mx.array, mx.array]:
    """``q / |q| * Dk**-0.5`` and ``k / |k|`` (the readout scale folded into q)."""
    dim = q.shape[-1]
    # rms_norm(x, eps / D) = x * sqrt(D) / sqrt(|x|^2 + eps): one fused op for the L2 norm.
    q = mx.fast.rms_norm(q, None, eps / dim) * (1.0 / dim)
    k = mx.fast.rms_norm(k, None, eps / dim) * (dim**-0.5)
    return q, k


def log_decay(A_log: mx.array, a: mx.array, dt_bias: mx.array) -> mx.array:
    """``log g = -exp(A_log) * softplus(a + dt_bias)``, float32, per token and value head."""
    return -mx.exp(A_log.astype(mx.float32)) * nn.softplus((a + dt_bias).astype(mx.float32))


def gated_delta_rule(
    q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """Run the recurrence over l tokens from ``state``.

    ``q``, ``k`` (b, l, Hk, Dk) normalised; ``v`` (b, l, Hv, Dv); ``log_g``, ``beta``
    (b, l, Hv); ``state`` (b, Hv, Dv, Dk) float32. Returns ``y`` (b, l, Hv, Dv) in v's
    dtype and the new state. Value heads share key heads in groups (Hv // Hk each).
    """
    hv, hk = v.shape[2], k.shape[2]
    if hv != hk:
        q, k = mx.repeat(q, hv // hk, axis=2), mx.repeat(k, hv // hk, axis=2)
    if q.shape[1] >= CHUNKED_FROM:
        y, state = _chunked(q, k, v, log_g, beta, state)
    else:
        y, state = _recurrent(q, k, v, log_g, beta, state)
    return y.astype(v.dtype), state


def _recurrent(q, k, v, log_g, beta, state):
    """Token by token; the decode path (l = 1 is one step)."""
    g = mx.exp(log_g)
    ys = []
    for t in range(q.shape[1]):
        y, state = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        ys.append(y)
    return mx.stack(ys, axis=1), state


@mx.compile  # fuses the elementwise work; one trace per shape (slices are not shapeless)
def _step(q, k, v, g, beta, state):
    """One token, rearranged so the state is read twice and written once (the naive order
    reads it five times): with ``S k`` and ``S q`` from one product,
    ``S' = g S + d k^T`` and ``y = S' q = g S q + d (k . q)``, ``d = beta (v - g S k)``."""
    q, k = q.astype(mx.float32), k.astype(mx.float32)  # (b, H, Dk)
    g = g[..., None]  # (b, H, 1)
    sk_sq = state @ mx.stack([k, q], axis=-1)  # (b, H, Dv, 2)
    delta = (v.astype(mx.float32) - g * sk_sq[..., 0]) * beta[..., None]
    y = g * sk_sq[..., 1] + delta * (k * q).sum(-1, keepdims=True)
    return y, g[..., None] * state + delta[..., None] * k[..., None, :]


def _chunked(q, k, v, log_g, beta, state):
    """The chunkwise (WY) form: same result as ``_recurrent`` up to float rounding."""
    b, length, heads, _ = q.shape
    pad = -length % CHUNK
    n = (length + pad) // CHUNK

    def blocks(x: mx.array) -> mx.array:  # (b, l, H, ...) -> (b, H, n, C, ...), float32
        x = x.astype(mx.float32)
        if pad:  # zero k, v and beta, log g = 0: padded tokens leave the state unchanged
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, n, CHUNK, heads, *x.shape[3:])
        return x.transpose(0, 3, 1, 2, *range(4, x.ndim))

    q, k, v, log_g, beta = (blocks(x) for x in (q, k, v, log_g, beta))
    gc = mx.cumsum(log_g, axis=-1)  # (b, H, n, C): log of the decay from the chunk start
    lower = mx.tril(mx.ones((CHUNK, CHUNK), dtype=mx.bool_))
    diff = gc[..., :, None] - gc[..., None, :]
    decay = mx.where(lower, mx.exp(mx.where(lower, diff, 0.0)), 0.0)  # g_i / g_j for i >= j
    k_beta = k * beta[..., None]
    strict = -(k_beta @ k.swapaxes(-1, -2)) * decay * (1 - mx.eye(CHUNK))
    wy = _unit_lower_inverse(strict)  # (I - strict)^-1
    u = wy @ (v * beta[..., None])  # (b, H, n, C, Dv)
    w = wy @ (k_beta * mx.exp(gc)[..., None])  # (b, H, n, C, Dk)
    intra = (q @ k.swapaxes(-1, -2)) * decay  # causal, diagonal included
    q_decayed = q * mx.exp(gc)[..., None]
    tail = mx.exp(gc[..., -1:] - gc)[..., None]  # decay from each token to the chunk end
    ys = []
    for i in range(n):
        st = state.swapaxes(-1, -2)  # (b, H, Dk, Dv)
        v_new = u[:, :, i] - w[:, :, i] @ st
        ys.append(q_decayed[:, :, i] @ st + intra[:, :, i] @ v_new)
        k_end = k[:, :, i] * tail[:, :, i]
        state = state * mx.exp(gc[:, :, i, -1])[..., None, None] + v_new.swapaxes(-1, -2) @ k_end
    y = mx.stack(ys, axis=2).reshape(b, heads, n * CHUNK, -1)[:, :, :length]
    return y.transpose(0, 2, 1, 3), state


def _unit_lower_inverse(strict: mx.array) -> mx.array:
    """``(I - N)^-1`` for strictly lower-triangular ``N`` (C x C, C a power of two):
    ``N`` is nilpotent, so the inverse is ``(I + N)(I + N^2)(I + N^4)...``, log2(C)
    matrix products instead of C sequential row updates."""
    eye = mx.eye(strict.shape[-1])
    power, inverse = strict, eye + strict
    for _ in range(strict.shape[-1].bit_length() - 2):
        power = power @ power
        inverse = inverse @ (eye + power)
    return inverse
