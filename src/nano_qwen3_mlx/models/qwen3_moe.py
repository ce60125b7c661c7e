"""Qwen3-MoE (Qwen3-30B-A3B family): Qwen3 whose MLPs are routed mixtures of experts.

Attention, norms, embeddings and the decoder layer's residual wiring are Qwen3's
(``models/qwen3.py``); only the MLP of the sparse layers differs. Field names are
``config.json`` keys; module paths are the mlx-community checkpoint keys (experts stacked
under ``mlp.switch_mlp``); the Hugging Face layout (one tensor per expert) is stacked in
``sanitize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import qwen3
from .base import count_parameters
from .switch_layers import SwitchGLU

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArgs(qwen3.ModelArgs):
    """Qwen3-MoE ``config.json``; defaults are Qwen3-30B-A3B's."""

    model_type: str = "qwen3_moe"
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    intermediate_size: int = 6144  # the dense MLP of ``mlp_only_layers``
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    tie_word_embeddings: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_experts(self)

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has experts (Hugging Face's rule)."""
        return is_sparse_layer(self, layer_idx)


def check_experts(args: ModelArgs) -> None:
    """A clear error for a top-k the experts cannot give (also the hybrid MoE families')."""
    if args.num_experts and not 0 < args.num_experts_per_tok <= args.num_experts:
        raise ValueError(f"num_experts_per_tok={args.num_experts_per_tok} must be in "
                         f"1..num_experts={args.num_experts}")


def is_sparse_layer(args: ModelArgs, layer_idx: int) -> bool:
    """Hugging Face's rule for which layers have experts (Qwen3-MoE, Qwen3.5-MoE, Qwen3-Next)."""
    return (layer_idx not in args.mlp_only_layers and args.num_experts > 0
            and (layer_idx + 1) % args.decoder_sparse_step == 0)


class SparseMoeBlock(nn.Module):
    """Router (``gate``) + experts: each token goes through its top-k experts, weighted."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    # Tensor parallel (``distributed/sharding.py``): each rank holds a slice of every
    # expert, and the block sums the ranks' partial outputs over this group.
    sharding_group: mx.distributed.Group | None = None

    def __call__(self, x: mx.array) -> mx.array:
        return self.all_sum(self.routed(x))

    def all_sum(self, y: mx.array) -> mx.array:
        """The ranks' partial outputs summed (unchanged when not sharded)."""
        group = self.sharding_group
        return y if group is None else mx.distributed.all_sum(y, group=group)

    def routed(self, x: mx.array) -> mx.array:
        """The routed experts' output (this rank's part of it when sharded)."""
        # Any leading shape ((B, L) padded or (1, T) packed): route the tokens as one list.
        tokens = x.reshape(-1, x.shape[-1])
        probs = mx.softmax(self.gate(tokens), axis=-1, precise=True)
        experts = mx.argpartition(probs, kth=-self.top_k, axis=-1)[:, -self.top_k:]
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(tokens, experts)  # (N, k, hidden)
        y = (y * weights[..., None]).sum(axis=-2).astype(y.dtype)
        return y.reshape(x.shape)


class DecoderLayer(qwen3.DecoderLayer):
    """Qwen3's layer (same ``__call__``) with a sparse MLP where ``is_sparse``."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        nn.Module.__init__(self)  # not qwen3's: it would build a dense MLP to throw away
        self.self_attn = qwen3.Attention(args, layer_idx)
        if args.is_sparse(layer_idx):
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = qwen3.MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Qwen3MoeModel(qwen3.Qwen3Model):
    decoder_layer = DecoderLayer


class Model(qwen3.Model):
    """Qwen3-MoE causal LM: the engine contract of ``qwen3.Model``."""

    backbone = Qwen3MoeModel

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack the Hugging Face per-expert tensors into ``switch_mlp`` (E, out, in)."""
        weights = super().sanitize(weights)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                _stack_experts(weights, f"model.layers.{i}.mlp", self.args.num_experts)
        return weights

    def num_parameters(self) -> dict[str, int]:
        """``total`` and ``active`` (per token: top-k of each sparse layer's experts)."""
        total = count_parameters(self)
        args = self.args
        idle = 0
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                experts = count_parameters(layer.mlp.switch_mlp)
                idle += experts * (args.num_experts - args.num_experts_per_tok) // args.num_experts
        return {"total": total, "active": total - idle}

    @property
    def quant_predicate(self):
        """Quantize-on-load keeps the router at 8 bits, as mlx-lm does: routing decisions
        are sensitive and the router is tiny."""

        def predicate(path: str, module: nn.Module) -> bool | dict:
            return {"group_size": 64, "bits": 8} if path.endswith("mlp.gate") else True

        return predicate


def _stack_experts(weights: dict[str, mx.array], prefix: str, num_experts: int) -> None:
    """``{prefix}.experts.{e}.{proj}.{w}`` for every e -> ``{prefix}.switch_mlp.{proj}.{w}``.

    Raises ``ValueError`` naming the first missing expert tensor when the set is incomplete.
    """
    for proj in PROJECTIONS:
        for suffix in ("weight", "scales", "biases"):
            names = [f"{prefix}.experts.{e}.{proj}.{suffix}" for e in range(num_experts)]
            present = [n in weights for n in names]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"missing tensor {names[present.index(False)]} "
                                 f"({present.count(False)} of {num_experts} experts missing)")
            weights[f"{prefix}.switch_mlp.{proj}.{suffix}"] = mx.stack([weights.pop(n) for n in names])


__all__ = ["Model", "ModelArgs"]
