"""The Llama family (Llama 2/3, SmolLM, ...): the shared dense decoder without q/k norm.

Every layer lives in ``models/decoder.py`` (Qwen3 is the same decoder plus per-head RMSNorm
on queries and keys); only the defaults of ``config.json`` differ (untied embeddings unless
the config says so). ``rope_scaling`` of type ``llama3`` and ``linear``
is handled by the shared ``RoPE``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoder import DecoderArgs, DecoderLM


@dataclass
class ModelArgs(DecoderArgs):
    """Llama ``config.json``; ``head_dim`` defaults to ``hidden_size // num_attention_heads``."""

    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False  # the LlamaConfig default; SmolLM sets it to true
    use_qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:  # old Llama configs omit it: plain multi-head
            self.num_key_value_heads = self.num_attention_heads
        self.use_qk_norm = False  # not a Llama config key: never let a config turn it on
        super().__post_init__()


class Model(DecoderLM):
    """Llama causal LM."""


__all__ = ["Model", "ModelArgs"]
