"""The dense decoder Qwen3 and the Llama family share: attention with RoPE and optional
q/k norm, a SwiGLU MLP, pre-norm residual layers. Module paths are checkpoint keys.

The families differ only in their ``config.json`` defaults (``qwen3.py``, ``llama.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..blas import matvec
from .base import AttentionContext, RoPE, count_parameters
from .contract import LayerKV, LayerState


@dataclass
class DecoderArgs:
    """The ``config.json`` of a dense decoder; each family's ``ModelArgs`` sets its defaults."""

    model_type: str = "decoder"
    hidden_size: int = 1024
    num_hidden_layers: int = 28
    intermediate_size: int = 3072
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    vocab_size: int = 151936
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    use_qk_norm: bool = False  # per-head RMSNorm on queries and keys (Qwen3)
    rope_traditional: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # transformers >= 5 nests rope_theta (and the scaling type) under rope_parameters.
        params = self.rope_parameters or {}
        if self.rope_theta is None:
            self.rope_theta = params.get("rope_theta", 10000.0)
        if self.rope_scaling is None and params.get("rope_type", "default") != "default":
            self.rope_scaling = params
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DecoderArgs:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        if config.get("head_dim") is None:
            known.pop("head_dim", None)
        return cls(**known, extra={k: v for k, v in config.items() if k not in names})


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)
        if args.use_qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(
            head_dim, args.rope_theta, args.rope_scaling,
            args.max_position_embeddings, args.rope_traditional,
        )

    def __call__(self, x: mx.array, ctx: AttentionContext) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)  # (B, L, H, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.transpose(0, 2, 1, 3), offset=ctx.offsets)  # (B, H, L, D)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=ctx.offsets)
        out = ctx.attend(self.layer_idx, q, k, v.transpose(0, 2, 1, 3), self.scale)
        # ``out`` may hold fewer rows than ``x`` (ctx.output_rows).
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(out.shape[0], L, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, ctx: AttentionContext) -> mx.array:
        rows = ctx.output_rows(self.self_attn.layer_idx)  # attend returns only these rows
        h = self.self_attn(self.input_layernorm(x), ctx)
        h = h + (x if rows is None else x[rows])
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (checkpoint prefix ``model.``)."""

    decoder_layer = DecoderLayer  # a family whose layers differ (MoE) names its own

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [self.decoder_layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        h = self.embed_tokens(input_ids)  # (B, L, hidden)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)


class DecoderLM(nn.Module):
    """A dense decoder causal LM; implements ``contract.CausalLM``.

    ``hidden = hidden_states(ids, ctx)`` then ``compute_logits(hidden)``: the two halves are
    separate so the engine computes logits only for the rows it samples.
    """

    backbone = DecoderModel  # a family with other layers (MoE) names its own

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        self.args = args
        self.model = self.backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        return self.compute_logits(self.model(input_ids, ctx))

    def compute_logits(self, hidden: mx.array) -> mx.array:
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        # On the CPU: one row (batch-1 decode) as the BLAS's sgemv, ~3x MLX's one-row sgemm
        # there (blas.matvec). Only a float head holding the whole vocabulary: quantized
        # heads are other classes, a vocabulary-parallel shard holds a slice of it (the
        # engine's stream-split classes are an nn.Embedding and an nn.Linear, and split a
        # step of few rows over the streams themselves: engine/split_linear.py).
        if (isinstance(head, (nn.Embedding, nn.Linear)) and "bias" not in head
                and head.weight.shape[0] == self.args.vocab_size):
            logits = matvec(head.weight, hidden)
            if logits is not None:
                return logits
        return head.as_linear(hidden) if self.args.tie_word_embeddings else head(hidden)

    def hidden_states(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        return self.model(input_ids, ctx)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors the checkpoint may carry that this module does not own."""
        if "embed_tokens.weight" in weights:  # a headless body (Qwen3-Embedding): no "model."
            weights = {k if k.startswith("lm_head.") else f"model.{k}": v
                       for k, v in weights.items()}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights.pop("lm_head.scales", None)
            weights.pop("lm_head.biases", None)
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts (quantized weights counted unpacked): ``total`` and ``active``
        (used per token; the same for a dense model)."""
        total = count_parameters(self)
        return {"total": total, "active": total}

    # ---- contract.CausalLM ------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.args.model_type

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.norm.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.args.max_position_embeddings

    @property
    def kv_layers(self) -> list[LayerKV]:
        # Read from the layers: a tensor-parallel rank holds only its share of the KV heads.
        return [LayerKV(layer.self_attn.n_kv_heads, layer.self_attn.head_dim) for layer in self.layers]

    @property
    def state_layers(self) -> list[LayerState]:
        return []  # attention only: no per-sequence state besides the KV cache

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers
