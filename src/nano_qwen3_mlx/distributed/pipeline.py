"""Pipeline parallelism: ``pipeline_model`` gives each rank of an ``mx.distributed`` group a
contiguous run of the model's layers (rank 0 the first ones); hidden states go rank to rank.

For links too slow for tensor parallelism (``sharding.py`` sums every layer's output over
the ranks; a pipeline sends one ``(tokens, hidden)`` array per hop and step). Every rank runs
every step, as in tensor parallelism: rank 0 embeds and runs its layers, then ``send``s;
each later rank ``recv``s, runs its layers and sends on; the last rank's final hidden states
reach every rank (``all_gather``), so each one computes the same logits and samples the same
tokens. The ranks wait on each other (no micro-batching): the point is memory, each rank
holding ``1/world_size`` of the layers; the embedding, final norm and output layer stay on
every rank.

A rank's ``kv_layers``/``state_layers`` list only its layers, renumbered from 0 (the engine's
pools then hold only them). Only the last rank may prune its output to the sampled rows
(``ctx.output_rows``); the others pass every row on, and cut their (unused) result to the
same rows so the gathered arrays match.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..models.base import AttentionContext


def pipeline_model(model: nn.Module, group: mx.distributed.Group) -> None:
    """Keep this rank's share of ``model``'s layers (in place); no-op for size 1.

    Layers are split evenly, the first ranks taking one more where they do not divide. Raises
    ``ValueError`` when there are fewer layers than ranks. Like ``shard_model``, best called
    before the weights are read (``loader.load(prepare=...)``).
    """
    n, rank = group.size(), group.rank()
    if n == 1:
        return
    layers = model.layers
    if len(layers) < n:
        raise ValueError(f"{len(layers)} layers cannot be split across {n} ranks")
    base, extra = divmod(len(layers), n)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    backbone = model.model
    # Whether the whole model's last layer asks for the sampled rows only (a hybrid model's
    # asks only if it is an attention layer): the other ranks then cut their output alike.
    final_prunes = getattr(layers[-1], "prunes", True)
    backbone.layers = layers[start:stop]
    _renumber(backbone.layers)
    stage = _stage_class(type(backbone))
    backbone.__class__ = stage
    backbone.group, backbone.final_prunes = group, final_prunes
    mx.eval(model.parameters())


def _renumber(layers: list[nn.Module]) -> None:
    """Attention and recurrent layers numbered from 0 on this rank (their pool indices)."""
    kv = state = 0
    for layer in layers:
        if getattr(layer, "is_linear", False):
            layer.linear_attn.state_idx, state = state, state + 1
            continue
        attn = layer.self_attn
        if hasattr(attn, "kv_idx"):  # hybrid GatedAttention
            attn.kv_idx = kv
        else:
            attn.layer_idx = kv
        kv += 1


class _PipelineStage:
    """Mixin over a backbone (embeddings, ``layers``, final ``norm``) running one stage."""

    group: mx.distributed.Group
    final_prunes: bool

    def __call__(self, input_ids: mx.array, ctx: AttentionContext) -> mx.array:
        rank, last = self.group.rank(), self.group.size() - 1
        h = self.embed_tokens(input_ids)  # on later ranks: the shape and dtype to receive
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=self.group)
        stage_ctx = ctx if rank == last else _NoPruning(ctx)
        for layer in self.layers:
            h = layer(h, stage_ctx)
        if rank < last:
            h = mx.distributed.send(h, rank + 1, group=self.group)
            # The last rank may keep only the sampled rows: gather arrays of one shape (the
            # engine's last attention layer here is this rank's last one).
            if self.final_prunes and (rows := ctx.output_rows(self.num_attention_layers - 1)) is not None:
                h = h[rows]
        h = mx.distributed.all_gather(h[None], group=self.group)[last]
        return self.norm(h)

    @property
    def num_attention_layers(self) -> int:
        return sum(not getattr(layer, "is_linear", False) for layer in self.layers)


class _NoPruning:
    """A context whose ``output_rows`` keeps every row (a stage before the last one)."""

    def __init__(self, ctx: AttentionContext) -> None:
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def output_rows(self, layer_idx: int) -> None:
        return None


_STAGES: dict[type, type] = {}


def _stage_class(backbone: type) -> type:
    """``backbone``'s class with ``_PipelineStage``'s forward (one per backbone class)."""
    if backbone not in _STAGES:
        _STAGES[backbone] = type(f"Pipeline{backbone.__name__}", (_PipelineStage, backbone), {})
    return _STAGES[backbone]
