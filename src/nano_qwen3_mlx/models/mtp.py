"""The multi-token prediction (MTP) head of Qwen3.5 / Qwen3-Next checkpoints (``mtp.*``).

Given the target's final hidden state at position t and the embedding of token t + 1 (the
one sampled from it), the head predicts token t + 2:
``h = fc(concat(pre_fc_norm_embedding(embed(x[t+1])), pre_fc_norm_hidden(hidden[t])))``, one
full-attention decoder layer (its own KV, written at position t), ``norm``, and the target's
embeddings / ``lm_head`` for the logits. Names follow the Hugging Face checkpoints
(``mtp.fc``, ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*``,
``mtp.norm``). The engine side is ``engine/mtp.py``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from .base import AttentionContext
from .contract import LayerKV

if TYPE_CHECKING:
    from .hybrid import HybridArgs


def mtp_num_layers(args: HybridArgs) -> int:
    """How many MTP layers the config declares (Qwen3.5: ``mtp_num_hidden_layers``,
    Qwen3-Next: ``num_nextn_predict_layers``; absent: one, as every published checkpoint)."""
    extra = args.extra
    return int(extra.get("mtp_num_hidden_layers", extra.get("num_nextn_predict_layers", 1)))


class MTPHead(nn.Module):
    """``mtp.*``: the fusion of token and hidden state, the decoder layer(s), the norm."""

    def __init__(self, args: HybridArgs, fused: bool) -> None:
        super().__init__()
        from .hybrid import FULL, HybridLayer

        n = mtp_num_layers(args)
        if n < 1:
            raise ValueError("the model config declares no MTP layers (mtp_num_hidden_layers: 0)")
        # The head's layers are full-attention layers numbered from 0 in its own KV pool;
        # whether one has experts follows the model's rule at its own index (as vLLM's).
        sub = replace(args, num_hidden_layers=n, layer_types=[FULL] * n)
        hidden = args.hidden_size
        self.pre_fc_norm_embedding = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = [HybridLayer(sub, i, i, fused) for i in range(n)]
        self.norm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)
        self._kv = LayerKV(args.num_key_value_heads, args.head_dim)

    @property
    def kv_layers(self) -> list[LayerKV]:
        """The head's own paged KV layers (the engine gives it a pool of its own)."""
        return [self._kv] * len(self.layers)

    def __call__(self, embeds: mx.array, hidden: mx.array, ctx: AttentionContext) -> mx.array:
        """``embeds``: the next tokens' embeddings, ``hidden``: the target's final hidden
        states, both ``(T, 1, H)`` packed -> the head's normed hidden states (pruned to the
        sampled rows by its last layer, as the target's are)."""
        h = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embeds),
                                    self.pre_fc_norm_hidden(hidden)], axis=-1))
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)
