"""Qwen3.5 (0.8B ... 27B): the hybrid decoder (``models/hybrid.py``) with separate
``in_proj_qkv``/``in_proj_z``/``in_proj_b``/``in_proj_a`` DeltaNet projections.

The published checkpoints are vision-language models: ``config.json`` nests the text model
under ``text_config``; the vision tower's config and weights are ignored (text only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .hybrid import HybridArgs, HybridLM


@dataclass
class ModelArgs(HybridArgs):
    """Qwen3.5's text ``config.json`` (``text_config``, or a flat config)."""

    model_type: str = "qwen3_5"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        text = dict(config.get("text_config") or config)
        text["model_type"] = config["model_type"]
        for key in ("tie_word_embeddings", "quantization"):  # may sit beside text_config
            if key in config and key not in text:
                text[key] = config[key]
        return super().from_dict(text)


class Model(HybridLM):
    """Qwen3.5 causal LM (text)."""


__all__ = ["Model", "ModelArgs"]
