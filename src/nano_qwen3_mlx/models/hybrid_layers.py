"""The layers of the hybrid Qwen families (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): Gated DeltaNet
(linear attention), gated full attention with partial RoPE, and the MoE block with a gated
shared expert. Module paths are Hugging Face's; the arguments are ``hybrid.HybridArgs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from . import gated_delta as gd
from .base import AttentionContext, RoPE
from .decoder import MLP
from .qwen3_moe import SparseMoeBlock

if TYPE_CHECKING:
    from .hybrid import HybridArgs


class GatedAttention(nn.Module):
    """Full attention whose ``q_proj`` also yields a per-channel output gate (sigmoid);
    per-head q/k RMSNorm; RoPE on the first ``partial_rotary_factor`` of each head."""

    def __init__(self, args: HybridArgs, kv_idx: int) -> None:
        super().__init__()
        self.kv_idx = kv_idx
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(int(head_dim * args.partial_rotary_factor), args.rope_theta,
                         args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, ctx: AttentionContext, rows: mx.array | None) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        q = self.rope(self.q_norm(q).transpose(0, 2, 1, 3), offset=ctx.offsets)
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset=ctx.offsets)
        out = ctx.attend(self.kv_idx, q, k, v.transpose(0, 2, 1, 3), self.scale)
        if rows is not None:  # ``attend`` returned only these rows
            gate = gate[rows]
        gate = gate.reshape(gate.shape[0], L, self.n_heads * self.head_dim)  # may be 0 rows
        out = out.transpose(0, 2, 1, 3).reshape(gate.shape)
        return self.o_proj(out * mx.sigmoid(gate))


class RMSNormGated(nn.Module):
    """RMSNorm of the DeltaNet output, times ``silu(z)`` (computed in float32)."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mx.ones(dims)

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x, self.weight, self.eps).astype(mx.float32)
        return (nn.silu(z.astype(mx.float32)) * y).astype(x.dtype)


class GatedDeltaNet(nn.Module):
    """Linear attention: projections here, the convolution and the delta rule in
    ``ctx.recur`` (per sequence, from its stored state), then the gated norm and out_proj.

    Two projection layouts: Qwen3.5's separate ``in_proj_qkv``/``in_proj_z``/``in_proj_b``/
    ``in_proj_a``, and Qwen3-Next's fused ``in_proj_qkvz``/``in_proj_ba`` (grouped per key
    head).
    """

    def __init__(self, args: HybridArgs, state_idx: int, fused: bool) -> None:
        super().__init__()
        self.state_idx, self.fused = state_idx, fused
        self.num_k_heads, self.num_v_heads = args.linear_num_key_heads, args.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = args.linear_key_head_dim, args.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads={self.num_v_heads} must be a multiple of "
                             f"linear_num_key_heads={self.num_k_heads}")
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = args.linear_conv_kernel_dim
        dim = args.hidden_size
        if fused:
            self.in_proj_qkvz = nn.Linear(dim, self.conv_dim + self.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(dim, 2 * self.num_v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(dim, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(dim, self.value_dim, bias=False)
            self.in_proj_b = nn.Linear(dim, self.num_v_heads, bias=False)
            self.in_proj_a = nn.Linear(dim, self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size,
                                groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones(self.num_v_heads)
        self.A_log = mx.log(mx.random.uniform(1, 16, (self.num_v_heads,)))
        self.norm = RMSNormGated(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The convolution's last inputs and the recurrent state (``contract.LayerState``)."""
        return (self.kernel_size - 1, self.conv_dim), (self.num_v_heads, self.head_v_dim, self.head_k_dim)

    def __call__(self, x: mx.array, ctx: AttentionContext) -> mx.array:
        B, L, _ = x.shape
        qkv, z, b, a = self._project(x)
        out = ctx.recur(self.state_idx, (qkv, a, b), self.recurrence)  # (B, L, Hv, Dv)
        out = self.norm(out, z.reshape(B, L, self.num_v_heads, self.head_v_dim))
        return self.out_proj(out.reshape(B, L, self.value_dim))

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """``x`` -> mixed q|k|v (B, L, conv_dim), z (B, L, value_dim), b and a (B, L, Hv)."""
        if not self.fused:
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        B, L, _ = x.shape
        nk, dk, per = self.num_k_heads, self.head_k_dim, self.num_v_heads // self.num_k_heads
        # Fused weights are grouped per key head: [q_h | k_h | v of its value heads | z ...].
        qkvz = self.in_proj_qkvz(x).reshape(B, L, nk, -1)
        q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + per * self.head_v_dim], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, nk, 2 * per), 2, axis=-1)
        qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        return qkv, z.reshape(B, L, -1), b.reshape(B, L, -1), a.reshape(B, L, -1)

    def recurrence(self, inputs: tuple[mx.array, ...], states: list[mx.array]):
        """``base.RecurrentFn``: one group of sequences (b, l) from their states."""
        qkv, a, b = inputs
        heads = (self.num_k_heads, self.head_k_dim, self.num_v_heads, self.head_v_dim)
        y, conv_state, state = gd.gated_delta_net(
            qkv, a, b, states[0], states[1], self.conv1d.weight, self.A_log, self.dt_bias, heads)
        return y, [conv_state, state]


class SharedExpertMoeBlock(SparseMoeBlock):
    """Qwen3-MoE's routed experts plus a shared expert scaled by a sigmoid gate."""

    def __init__(self, args: HybridArgs) -> None:
        super().__init__(args)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.all_sum(self.routed(x) + shared)  # sharded: one sum for both
