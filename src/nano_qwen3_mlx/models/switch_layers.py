"""Mixture-of-experts building blocks: every expert's weights stacked in one tensor.

A projection of ``E`` experts is one ``(E, out, in)`` weight; a token's ``k`` routed experts
run as one ``mx.gather_mm`` (``mx.gather_qmm`` when quantized) over the whole step, never a
Python loop over experts. Module paths match mlx-community checkpoints
(``mlp.switch_mlp.{gate,up,down}_proj``) so those load without renaming.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# Sort the (token, expert) pairs by expert once a step routes at least this many of them:
# each expert's weights are then read once per run of equal indices. Measured on the CPU
# backend (scripts/bench_moe_sort.py): sorting pays from about 64 pairs on.
SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """``num_experts`` bias-free linear layers; ``x @ weight[e].T`` for each routed ``e``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int) -> None:
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self["weight"]
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # The CPU gather_mm takes float32 only: gather the routed experts' weights instead.
            return x @ w[indices].swapaxes(-1, -2)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine") -> QuantizedSwitchLinear:
        """What ``nn.quantize`` calls: the same experts, quantized per expert row group."""
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """``SwitchLinear`` with affine-quantized experts (``weight``/``scales``/``biases``)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine") -> None:
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
            transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """The experts' SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with per-token experts."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int) -> None:
        super().__init__()
        self.gate_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.up_proj = SwitchLinear(dim, hidden_dim, num_experts)
        self.down_proj = SwitchLinear(hidden_dim, dim, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """``x`` (N, dim), ``indices`` (N, k) -> (N, k, dim): each token through its k experts."""
        if indices.size < SORT_THRESHOLD:
            return self._mlp(x[:, None, None, :], indices).squeeze(-2)
        n, k = indices.shape
        flat = indices.flatten()
        order = mx.argsort(flat)
        y = self._mlp(x[order // k][:, None, :], flat[order], sorted_indices=True)
        return y[mx.argsort(order)].reshape(n, k, -1)

    def _mlp(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        gate = self.gate_proj(x, indices, sorted_indices)
        up = self.up_proj(x, indices, sorted_indices)
        return self.down_proj(nn.silu(gate) * up, indices, sorted_indices)
