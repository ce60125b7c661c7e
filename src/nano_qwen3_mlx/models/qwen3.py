"""Qwen3: the shared dense decoder with per-head q/k RMSNorm and tied embeddings (0.6B).

Field names are ``config.json`` keys; the layers live in ``models/decoder.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoder import MLP, Attention, DecoderArgs, DecoderLayer, DecoderLM, DecoderModel


@dataclass
class ModelArgs(DecoderArgs):
    """Qwen3 ``config.json``; defaults are Qwen3-0.6B's."""

    model_type: str = "qwen3"
    use_qk_norm: bool = True


Qwen3Model = DecoderModel  # Qwen3's backbone (checkpoint prefix ``model.``)


class Model(DecoderLM):
    """Qwen3 causal LM."""


__all__ = ["MLP", "Attention", "DecoderLayer", "Model", "ModelArgs", "Qwen3Model"]
