"""What the engine may ask of a model: the whole contract between ``engine/`` and ``models/``.

The engine, the loader's callers and the benchmarks use a model only through
:class:`CausalLM`; anything else (``model.model.norm``, config objects) is the model's own
business. A new model family implements this protocol (``decoder.DecoderLM`` does it for the
dense decoders) and registers its module in ``models.MODEL_TYPES``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .base import AttentionContext


@dataclass(frozen=True, slots=True)
class LayerKV:
    """What one attention layer keeps per token: keys and values of ``num_kv_heads x head_dim``."""

    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class LayerState:
    """What one recurrent layer (linear attention: Gated DeltaNet) keeps per sequence.

    A fixed-size state whatever the sequence's length: ``shapes`` are the state arrays'
    shapes without the batch axis, in the order the layer's ``RecurrentFn`` takes them
    (Gated DeltaNet: the convolution's last inputs ``(K - 1, conv_dim)``, then the
    recurrent state ``(num_v_heads, head_v_dim, head_k_dim)``). ``dtypes`` likewise (the
    recurrent state is usually float32 whatever the activations are).
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[mx.Dtype, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of one sequence's state of this layer."""
        return sum(math.prod(s) * d.size for s, d in zip(self.shapes, self.dtypes))


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model as the engine sees it.

    Two halves, so the engine computes logits only for the rows it samples:
    ``hidden_states(ids, ctx)`` runs every layer (keys/values go to ``ctx``, never to the
    model), ``compute_logits(hidden)`` projects the rows to the vocabulary.

    A hybrid model (Qwen3.5, Qwen3-Next: Gated DeltaNet layers beside attention) also
    declares the per-sequence state of its recurrent layers in ``state_layers`` and reaches
    it only through ``ctx.recur`` (``base.AttentionContext``); attention-only models declare
    none. Attention layers are numbered by their index in ``kv_layers`` and recurrent layers
    by their index in ``state_layers``, each from 0.
    """

    model_type: str  # the config's model_type ("qwen3", "llama", ...)
    dtype: mx.Dtype  # activations, and so the KV cache
    vocab_size: int  # width of the logits; prompt token ids must be below it
    max_position_embeddings: int  # the longest sequence the model was trained for
    kv_layers: Sequence[LayerKV]  # one entry per attention layer, in ``layer_idx`` order
    state_layers: Sequence[LayerState]  # one per recurrent layer, in ``layer_idx`` order

    def hidden_states(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        """``(B, L)`` token ids -> ``(B, L, hidden)`` final hidden states."""
        ...

    def compute_logits(self, hidden: mx.array) -> mx.array:
        """``(..., hidden)`` -> ``(..., vocab_size)`` logits."""
        ...

    def num_parameters(self) -> dict[str, int]:
        """``{"total", "active"}`` parameter counts (active: used per token; < total for MoE)."""
        ...

    def parameters(self) -> dict[str, Any]:
        """The weights as a tree of arrays (``nn.Module.parameters``); their size sets the
        default KV budget."""
        ...


def uniform_kv(model: CausalLM) -> LayerKV:
    """The one ``LayerKV`` of a model whose attention layers are all alike (the paged cache's
    layout); a ``ValueError`` for a model that mixes them."""
    layers = set(model.kv_layers)
    if len(layers) != 1:
        raise ValueError(f"the paged KV cache needs identical attention layers, got {layers}")
    return layers.pop()
