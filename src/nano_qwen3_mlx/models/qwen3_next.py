"""Qwen3-Next (80B-A3B): the hybrid decoder (``models/hybrid.py``) with a flat
``config.json``, fused DeltaNet projections (``in_proj_qkvz``, ``in_proj_ba``, grouped per
key head) and MoE MLPs with a gated shared expert (experts stored one by one on the hub).
"""

from __future__ import annotations

from dataclasses import dataclass

from .hybrid import HybridArgs, HybridLM


@dataclass
class ModelArgs(HybridArgs):
    """Qwen3-Next ``config.json``; defaults are Qwen3-Next-80B-A3B's."""

    model_type: str = "qwen3_next"
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    intermediate_size: int = 5120
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512


class Model(HybridLM):
    """Qwen3-Next causal LM."""

    fused_projections = True


__all__ = ["Model", "ModelArgs"]
