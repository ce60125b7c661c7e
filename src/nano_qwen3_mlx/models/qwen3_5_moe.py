"""Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5 whose MLPs are routed experts plus a
sigmoid-gated shared expert (``hybrid_layers.SharedExpertMoeBlock``). The Hugging Face
checkpoints fuse the experts (``experts.gate_up_proj``); ``hybrid.HybridLM.sanitize`` splits
them into ``switch_mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import qwen3_5


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    """Qwen3.5-MoE's text ``config.json``."""

    model_type: str = "qwen3_5_moe"


class Model(qwen3_5.Model):
    """Qwen3.5-MoE causal LM (text)."""


__all__ = ["Model", "ModelArgs"]
