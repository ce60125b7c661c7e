"""What the models share: the attention-context protocol, RoPE and a dense cache.

The models never see how the KV cache is stored: every attention layer hands its
new keys/values to a context object and gets the attention output back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

# A recurrent layer's math over one group of sequences: ``(inputs, states) -> (output,
# new_states)``. ``inputs`` are per-token arrays ``(b, l, ...)`` (b sequences of l tokens
# each, consecutive), ``states`` the layer's state arrays ``(b, *LayerState.shapes[i])``
# before those tokens; ``output`` is ``(b, l, ...)`` and ``new_states`` the states after them.
RecurrentFn = Callable[[tuple[mx.array, ...], list[mx.array]], tuple[mx.array, list[mx.array]]]


class AttentionContext(Protocol):
    """Per-forward-pass state the attention (and recurrent) layers need."""

    offsets: int | mx.array  # RoPE offset: one int, or one per sequence, shape (B,)

    def attend(
        self, layer_idx: int, queries: mx.array, keys: mx.array, values: mx.array, scale: float
    ) -> mx.array:
        """Store ``keys``/``values`` (B, n_kv, L, D) and attend ``queries`` (B, H, L, D)."""
        ...

    def recur(self, layer_idx: int, inputs: tuple[mx.array, ...], fn: RecurrentFn) -> mx.array:
        """Run recurrent layer ``layer_idx`` (its index in ``state_layers``) over this pass.

        ``inputs`` are per-token arrays shaped like the layer's input, ``(B, L, ...)``. The
        context groups their tokens by sequence, calls ``fn`` on each group with the group's
        stored states, keeps the new states, and returns ``fn``'s outputs in the inputs'
        ``(B, L, ...)`` layout. The model never sees where states are kept.
        """
        ...

    def output_rows(self, layer_idx: int) -> mx.array | None:
        """The rows of this layer's output anyone reads (None: all).

        A layer that asks before attending gets only these rows back from ``attend``, and
        keeps only them of its residual: the engine reads just the sampled tokens after the
        last layer, so mid-prompt tokens skip its attention, o_proj and MLP (their K/V are
        still stored). A layer that never asks gets every row.
        """
        ...


class DenseCache:
    """The simple per-request cache: K/V concatenated per layer (one sequence batch), and
    each recurrent layer's states (zeros before the first token).

    Used by tests as the dense reference and for quick single-request scoring.
    """

    def __init__(self, num_layers: int, state_layers: Any = ()) -> None:
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.state_layers = list(state_layers)  # contract.LayerState per recurrent layer
        self.states: list[list[mx.array] | None] = [None] * len(self.state_layers)
        self.offsets = 0

    def recur(self, layer_idx: int, inputs: tuple[mx.array, ...], fn: RecurrentFn) -> mx.array:
        states = self.states[layer_idx]
        if states is None:  # a new sequence starts from zero states
            layer, batch = self.state_layers[layer_idx], inputs[0].shape[0]
            states = [mx.zeros((batch, *s), d) for s, d in zip(layer.shapes, layer.dtypes)]
        out, self.states[layer_idx] = fn(inputs, states)
        return out

    def attend(self, layer_idx: int, queries, keys, values, scale: float) -> mx.array:
        if self.keys[layer_idx] is not None:
            keys = mx.concatenate([self.keys[layer_idx], keys], axis=2)
            values = mx.concatenate([self.values[layer_idx], values], axis=2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        L = queries.shape[2]
        mask = "causal" if L > 1 else None
        if L > 1 and keys.shape[2] != L:
            # queries are the last L positions of the keys
            S = keys.shape[2]
            q_pos = mx.arange(S - L, S)[:, None]
            mask = q_pos >= mx.arange(S)[None]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def output_rows(self, layer_idx: int) -> None:
        return None

    def advance(self, num_tokens: int) -> None:
        """Call after each forward pass so the next one gets the right RoPE offset."""
        self.offsets += num_tokens


class RoPE(nn.Module):
    """Rotary embedding with the ``rope_scaling`` types Qwen3/Llama checkpoints use."""

    def __init__(
        self,
        dims: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 32768,
        traditional: bool = False,
    ) -> None:
        super().__init__()
        self.dims, self.base, self.traditional = dims, base, traditional
        self.scale = 1.0
        self.mscale = 1.0
        self._freqs = None
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif kind == "llama3":
            self._freqs = _llama3_freqs(dims, base, scaling)
        elif kind == "yarn":
            self._freqs, self.mscale = _yarn_freqs(dims, base, scaling, max_position_embeddings)
        elif kind not in ("default", None):
            raise ValueError(f"unsupported rope_scaling type {kind!r}")

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.mscale != 1.0:
            x = x * self.mscale
        base = None if self._freqs is not None else self.base
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=base,
            scale=self.scale, offset=offset, freqs=self._freqs,
        )


def _llama3_freqs(dims: int, base: float, cfg: dict[str, Any]) -> mx.array:
    factor = cfg["factor"]
    low, high = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    old_len = cfg.get("original_max_position_embeddings", 8192)
    freqs = base ** (mx.arange(0, dims, 2) / dims)
    wavelens = 2 * mx.pi * freqs
    freqs = mx.where(wavelens > old_len / low, freqs * factor, freqs)
    is_medium = (wavelens > old_len / high) & (wavelens < old_len / low)
    smooth = (old_len / wavelens - low) / (high - low)
    smoothed = freqs / ((1 - smooth) / factor + smooth)
    return mx.where(is_medium, smoothed, freqs)


def _yarn_freqs(dims: int, base: float, cfg: dict[str, Any], max_pos: int):
    factor = cfg["factor"]
    old_len = cfg.get("original_max_position_embeddings", max_pos)
    beta_fast, beta_slow = cfg.get("beta_fast", 32), cfg.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    ramp = (mx.arange(dims // 2, dtype=mx.float32) - low) / max(high - low, 1e-3)
    extrapolation = 1 - mx.clip(ramp, 0, 1)
    freq_extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    freq_inter = factor * freq_extra
    freqs = (freq_inter * freq_extra) / (freq_inter * extrapolation + freq_extra * (1 - extrapolation))
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return freqs, cfg.get("attention_factor", mscale)


def count_parameters(module: nn.Module) -> int:
    """Logical parameter count: a quantized weight counts its unpacked values, and its
    ``scales``/``biases`` (quantization metadata) count nothing."""
    total = 0
    for _, m in module.named_modules():
        bits = getattr(m, "bits", None)
        for name, value in m.items():
            if not isinstance(value, mx.array):
                continue
            if bits and name == "weight":
                total += value.size * 32 // bits
            elif not (bits and name in ("scales", "biases")):
                total += value.size
    return total
