"""The hybrid decoder the Qwen3.5 and Qwen3-Next families share: Gated DeltaNet layers with
a full-attention layer every ``full_attention_interval`` (Hugging Face ``layer_types``), a
dense or MoE MLP, pre-norm residuals. Implements ``contract.CausalLM`` with ``state_layers``.

Loads both layouts (``sanitize``): Hugging Face (conv1d weights ``(C, 1, K)``, decoder RMSNorm
weights stored zero-centred, experts per expert or fused) and mlx-community (as mlx-lm saves
them). Vision tensors are dropped with a log line; so are ``mtp.*`` (multi-token prediction)
unless ``add_mtp`` built the MTP head first (``--speculative mtp``, ``models/mtp.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .base import AttentionContext, count_parameters
from .contract import LayerKV, LayerState
from .decoder import MLP, DecoderArgs, DecoderLM
from .hybrid_layers import GatedAttention, GatedDeltaNet, SharedExpertMoeBlock
from .qwen3_moe import _stack_experts, check_experts, is_sparse_layer

log = logging.getLogger(__name__)

LINEAR, FULL = "linear_attention", "full_attention"
# Hugging Face stores these RMSNorm weights as w - 1 (the norm multiplies by 1 + w).
ZERO_CENTRED_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                      "model.norm.weight", ".q_norm.weight", ".k_norm.weight", "mtp.norm.weight",
                      "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight")
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")


@dataclass
class HybridArgs(DecoderArgs):
    """The text model's ``config.json`` (defaults: Qwen3.5-9B-like)."""

    model_type: str = "hybrid"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 12288
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 256
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    linear_num_value_heads: int = 32
    linear_num_key_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    layer_types: list[str] | None = None
    partial_rotary_factor: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.partial_rotary_factor is None:
            self.partial_rotary_factor = (self.rope_parameters or {}).get("partial_rotary_factor", 0.25)
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % self.full_attention_interval == 0 else LINEAR
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {LINEAR, FULL}:
            raise ValueError(f"layer_types must be {self.num_hidden_layers} of {LINEAR!r}/{FULL!r}")
        if self.extra.get("attn_output_gate", True) is not True:
            raise ValueError("attn_output_gate=false is not supported (every Qwen3.5/Next gates)")
        check_experts(self)

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has experts (Hugging Face's rule)."""
        return is_sparse_layer(self, layer_idx)


class HybridLayer(nn.Module):
    """One decoder layer: ``linear_attn`` (Gated DeltaNet) or ``self_attn``, then the MLP."""

    def __init__(self, args: HybridArgs, layer_idx: int, kind_idx: int, fused: bool) -> None:
        super().__init__()
        self.is_linear = args.layer_types[layer_idx] == LINEAR
        # Pruning to the sampled rows is only safe in the last layer (later layers would see
        # pruned rows), and only an attention layer may ask (the engine prunes there).
        self.prunes = not self.is_linear and layer_idx == args.num_hidden_layers - 1
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args, kind_idx, fused)
        else:
            self.self_attn = GatedAttention(args, kind_idx)
        if args.is_sparse(layer_idx):
            self.mlp = SharedExpertMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, ctx: AttentionContext) -> mx.array:
        if self.is_linear:
            h = x + self.linear_attn(self.input_layernorm(x), ctx)
        else:
            rows = ctx.output_rows(self.self_attn.kv_idx) if self.prunes else None
            h = self.self_attn(self.input_layernorm(x), ctx, rows)
            h = h + (x if rows is None else x[rows])
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridModel(nn.Module):
    """Embeddings, the layers and the final norm (checkpoint prefix ``model.``)."""

    def __init__(self, args: HybridArgs, fused: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        counts = {LINEAR: 0, FULL: 0}  # attention and linear layers are numbered apart
        self.layers = []
        for i, kind in enumerate(args.layer_types):
            self.layers.append(HybridLayer(args, i, counts[kind], fused))
            counts[kind] += 1
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)


class HybridLM(DecoderLM):
    """A hybrid causal LM; ``contract.CausalLM`` with recurrent ``state_layers``."""

    fused_projections = False  # Qwen3-Next: in_proj_qkvz / in_proj_ba

    def __init__(self, args: HybridArgs) -> None:
        nn.Module.__init__(self)
        self.args = args
        self.model = HybridModel(args, self.fused_projections)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def kv_layers(self) -> list[LayerKV]:
        # Read from the layers: a tensor-parallel rank holds only its share of the KV heads.
        return [LayerKV(layer.self_attn.n_kv_heads, layer.self_attn.head_dim)
                for layer in self.layers if not layer.is_linear]

    @property
    def state_layers(self) -> list[LayerState]:
        # Convolution inputs in the activations' dtype; the recurrent state in float32.
        return [LayerState(layer.linear_attn.state_shapes(), (self.dtype, mx.float32))
                for layer in self.layers if layer.is_linear]

    def checkpoint_key(self, key: str) -> str | None:
        """A checkpoint tensor's (or quantization entry's) path in this module; None: not
        ours (``mtp.*``, vision). Maps Qwen3.5's ``model.language_model.*`` (Hugging Face)
        and ``language_model.model.*`` / ``language_model.lm_head.*`` (mlx-lm)."""
        if key.startswith(VISION_PREFIXES):
            return None
        if key.startswith("mtp.") or ".mtp." in key:  # kept only when the head was built
            return key[key.index("mtp."):] if "mtp" in self else None
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.", "")):
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename to our paths, drop what is not ours, undo Hugging Face's storage quirks."""
        renamed = {new: v for k, v in weights.items() if (new := self.checkpoint_key(k)) is not None}
        if skipped := sorted(k for k in weights if self.checkpoint_key(k) is None):
            log.info("ignoring %d checkpoint tensors not used for text generation "
                     "(multi-token prediction, vision), e.g. %s", len(skipped), skipped[0])
        if "mtp" in self and not any(k.startswith("mtp.") for k in renamed):
            raise ValueError("the checkpoint has no mtp.* (multi-token prediction) weights: "
                             "speculative='mtp' needs a Qwen3.5 / Qwen3-Next checkpoint that "
                             "ships them (mlx-lm conversions drop them)")
        weights = super().sanitize(renamed)
        if any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in weights.items()):
            _from_hugging_face(weights)
        layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(self.layers)]
        if "mtp" in self:
            layers += [(f"mtp.layers.{i}", layer) for i, layer in enumerate(self.mtp.layers)]
        for prefix, layer in layers:
            if isinstance(layer.mlp, SharedExpertMoeBlock):
                _split_fused_experts(weights, f"{prefix}.mlp")
                _stack_experts(weights, f"{prefix}.mlp", self.args.num_experts)
        return weights

    def add_mtp(self) -> None:
        """Build the multi-token prediction head (``self.mtp``) before loading, so that
        ``sanitize`` keeps the checkpoint's ``mtp.*`` weights (speculative="mtp")."""
        from .mtp import MTPHead

        self.mtp = MTPHead(self.args, self.fused_projections)

    def mtp_hidden_states(self, next_ids: mx.array, hidden: mx.array,
                          ctx: AttentionContext) -> mx.array:
        """The MTP head (``add_mtp``) over packed ``(T, 1)`` next tokens and the target's
        ``(T, 1, H)`` final hidden states; ``compute_logits`` of the result predicts the
        token after each next token."""
        return self.mtp(self.model.embed_tokens(next_ids), hidden, ctx)

    def num_parameters(self) -> dict[str, int]:
        """``total`` and ``active`` (per token: top-k of each sparse layer's experts)."""
        total, idle, args = count_parameters(self), 0, self.args
        for layer in self.layers:
            if isinstance(layer.mlp, SharedExpertMoeBlock):
                experts = count_parameters(layer.mlp.switch_mlp)
                idle += experts * (args.num_experts - args.num_experts_per_tok) // args.num_experts
        return {"total": total, "active": total - idle}

    @property
    def quant_predicate(self):
        """Quantize-on-load keeps the MoE router and the shared-expert gate at 8 bits, as
        mlx-lm does (tiny and decision-making). ``A_log``/``dt_bias`` are no Linear layers."""

        def predicate(path: str, module: nn.Module) -> bool | dict:
            if path.endswith(("mlp.gate", "shared_expert_gate")):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate

    def cast_predicate(self, path: str) -> bool:
        """Whether ``--dtype`` may cast this parameter: ``A_log`` stays as loaded (its
        exponent sets every decay)."""
        return not path.endswith("A_log")


def _from_hugging_face(weights: dict[str, mx.array]) -> None:
    """conv1d ``(C, 1, K)`` -> MLX's ``(C, K, 1)``; zero-centred RMSNorm weights + 1."""
    for key, value in weights.items():
        if key.endswith("conv1d.weight"):
            weights[key] = value.moveaxis(2, 1)
        elif key.endswith(ZERO_CENTRED_NORMS) and value.ndim == 1:
            weights[key] = value + 1.0


def _split_fused_experts(weights: dict[str, mx.array], prefix: str) -> None:
    """Hugging Face's fused ``experts.gate_up_proj`` (E, 2I, H) / ``experts.down_proj``
    -> ``switch_mlp.{gate,up,down}_proj.weight``."""
    if (gate_up := weights.pop(f"{prefix}.experts.gate_up_proj", None)) is None:
        return
    mid = gate_up.shape[-2] // 2
    weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :mid, :]
    weights[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., mid:, :]
    weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
