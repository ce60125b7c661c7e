"""Tensor parallelism: ``shard_model`` splits a loaded model in place across the ranks of an
``mx.distributed`` group; every rank then runs the same step on its share of each layer.

- Column-parallel (each rank computes some output features; no communication): q/k/v by
  head, the MLP's and the experts' gate/up by intermediate feature, the Gated DeltaNet input
  projections (and its convolution channels, ``A_log``, ``dt_bias``) by key/value head.
- Row-parallel (each rank holds some input features; the partial outputs are summed with
  ``all_sum``): ``o_proj``, ``down_proj``, the DeltaNet ``out_proj`` (MLX's
  ``ShardedToAllLinear``), and each MoE block as a whole: routed and shared experts are
  summed once (``SparseMoeBlock.sharding_group``).
- Vocabulary-parallel: the embedding table and the output layer keep a slice of the token
  ids; a lookup takes the one rank's row (``all_sum``), logits are gathered
  (``all_gather``), so ``compute_logits`` gives the whole vocabulary on every rank.

Norms, the MoE router and the shared expert's gate stay whole. KV heads split with the query
heads where the ranks divide them; otherwise each rank keeps only the KV heads its query
heads read (one KV head then lives on several ranks), so the GQA grouping the attention
kernels assume (``kv head = query head // group``) holds on every rank. The per-rank head
counts are written into the layers, and ``kv_layers``/``state_layers`` read them there: the
engine's KV and state pools hold one rank's share.

Quantized layers (``QuantizedLinear``, ``QuantizedSwitchLinear``, ``QuantizedEmbedding``)
split alike: output rows are rows of ``weight``/``scales``/``biases``, and an input split
cuts whole quantization groups. Every kept slice is a copy (``mx.take``), so the full
tensors are freed and the weights' bytes per rank are about 1/world_size.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..models.decoder import MLP, Attention
from ..models.hybrid_layers import GatedAttention, GatedDeltaNet, SharedExpertMoeBlock
from ..models.qwen3_moe import SparseMoeBlock

QUANT_PARTS = ("weight", "scales", "biases")  # a quantized layer's arrays (row-major by output)


def shard_model(model: nn.Module, group: mx.distributed.Group) -> None:
    """Shard ``model`` in place across ``group`` (tensor parallel). No-op for size 1.

    Works on every family of ``models/`` (dense Qwen3/Llama, Qwen3-MoE, the hybrid Qwen3.5 /
    Qwen3.5-MoE / Qwen3-Next), quantized or not. Raises ``ValueError`` naming the size the
    ranks do not divide (attention heads, intermediate size, quantization groups, ...).
    Best called before the weights are evaluated (``loader.load(name, prepare=...)``): each
    rank then holds at most its share plus one layer's full tensors. After an error the
    model is partly sharded: load it again.
    """
    if group.size() == 1:
        return
    for layer in model.layers:
        _shard_layer(layer, group)
        # Layer by layer: from lazily loaded weights (``loader.load(prepare=...)``) a rank
        # then reads one layer's full tensors at a time, never the whole model.
        mx.eval(layer.parameters())
    backbone = model.model
    backbone.embed_tokens = _vocab_parallel(backbone.embed_tokens, group)
    mx.eval(backbone.embed_tokens.parameters())
    if "lm_head" in model:  # tied embeddings: embed_tokens.as_linear gathers the logits
        model.lm_head = _vocab_parallel(model.lm_head, group)
    mx.eval(model.parameters())  # the rest: norms


def _shard_layer(layer: nn.Module, group: mx.distributed.Group) -> None:
    if "self_attn" in layer:
        attn = layer.self_attn
        if isinstance(attn, GatedAttention):  # q_proj yields [query | gate] per head
            _shard_attention(attn, group, 2 * attn.head_dim)
        elif isinstance(attn, Attention):
            _shard_attention(attn, group, attn.head_dim)
        else:
            raise TypeError(f"cannot shard attention {type(attn).__name__}")
    if "linear_attn" in layer:
        _shard_delta_net(layer.linear_attn, group)
    if isinstance(layer.mlp, SparseMoeBlock):
        _shard_moe(layer.mlp, group)
    elif isinstance(layer.mlp, MLP):
        _shard_mlp(layer.mlp, group, summed=True)
    else:
        raise TypeError(f"cannot shard MLP {type(layer.mlp).__name__}")


# ---- attention ------------------------------------------------------------------------------
def _shard_attention(attn: nn.Module, group: mx.distributed.Group, rows_per_head: int) -> None:
    """q_proj by query head, k/v_proj by the KV heads those read, o_proj row-parallel."""
    heads = _part(attn.n_heads, group, "num_attention_heads")
    kv = kv_heads_for(attn.n_heads, attn.n_kv_heads, heads)
    _keep_rows(attn.q_proj, _head_rows(heads, rows_per_head))
    _keep_rows(attn.k_proj, _head_rows(kv, attn.head_dim))
    _keep_rows(attn.v_proj, _head_rows(kv, attn.head_dim))
    attn.o_proj = _row_parallel(attn.o_proj, group, "o_proj")
    attn.n_heads, attn.n_kv_heads = len(heads), len(kv)


def kv_heads_for(n_heads: int, n_kv_heads: int, heads: range) -> list[int]:
    """The KV heads a rank keeps for its query ``heads`` (a contiguous run), in order.

    Query head ``h`` reads KV head ``h // group`` (``group = n_heads // n_kv_heads``). The
    local heads are cut into equal runs of ``gcd(group, len(heads))``: each run lies inside
    one global group, so keeping one KV head per run gives equal local groups again. Ranks
    dividing the KV heads get ``n_kv_heads / ranks`` of them; more ranks than KV heads get
    one each (shared with the ranks of the same group); others a few repeated ones.
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of "
                         f"num_key_value_heads={n_kv_heads}")
    size = n_heads // n_kv_heads
    run = math.gcd(size, len(heads))
    return [h // size for h in heads[::run]]


def _shard_delta_net(net: GatedDeltaNet, group: mx.distributed.Group) -> None:
    """Gated DeltaNet by key head and the value heads that share it (the delta rule and its
    state are per head, the convolution per channel): each rank runs whole heads."""
    k_heads = _part(net.num_k_heads, group, "linear_num_key_heads")
    per = net.num_v_heads // net.num_k_heads
    v_heads = range(k_heads.start * per, k_heads.stop * per)
    dk, dv = net.head_k_dim, net.head_v_dim
    # The mixed q|k|v features (and convolution channels): every key head's q, then k, then v.
    qkv = mx.concatenate([_head_rows(k_heads, dk), net.key_dim + _head_rows(k_heads, dk),
                          2 * net.key_dim + _head_rows(v_heads, dv)])
    if net.fused:  # grouped per key head: [q | k | v of its value heads | z], then [b | a]
        _keep_rows(net.in_proj_qkvz, _head_rows(k_heads, 2 * dk + 2 * per * dv))
        _keep_rows(net.in_proj_ba, _head_rows(k_heads, 2 * per))
    else:
        _keep_rows(net.in_proj_qkv, qkv)
        _keep_rows(net.in_proj_z, _head_rows(v_heads, dv))
        _keep_rows(net.in_proj_b, _head_rows(v_heads, 1))
        _keep_rows(net.in_proj_a, _head_rows(v_heads, 1))
    net.conv1d.weight = mx.take(net.conv1d.weight, qkv, axis=0)  # (C, K, 1), depthwise
    net.conv1d.groups = qkv.size
    net.A_log = mx.take(net.A_log, _head_rows(v_heads, 1))
    net.dt_bias = mx.take(net.dt_bias, _head_rows(v_heads, 1))
    net.out_proj = _row_parallel(net.out_proj, group, "out_proj")
    net.num_k_heads, net.num_v_heads = len(k_heads), len(v_heads)
    net.key_dim, net.value_dim = len(k_heads) * dk, len(v_heads) * dv
    net.conv_dim = 2 * net.key_dim + net.value_dim


# ---- MLPs and experts -----------------------------------------------------------------------
def _shard_mlp(mlp: MLP, group: mx.distributed.Group, summed: bool) -> None:
    """gate/up by intermediate feature; down_proj row-parallel, summed here (``summed``) or
    by the MoE block the MLP belongs to."""
    rows = _part(mlp.gate_proj["weight"].shape[-2], group, "intermediate_size")
    _keep_rows(mlp.gate_proj, rows)
    _keep_rows(mlp.up_proj, rows)
    if summed:
        mlp.down_proj = _row_parallel(mlp.down_proj, group, "down_proj")
    else:
        _keep_columns(mlp.down_proj, group, "shared_expert.down_proj")


def _shard_moe(block: SparseMoeBlock, group: mx.distributed.Group) -> None:
    """Every expert's intermediate features split (the router stays whole: every rank routes
    alike); the block sums the ranks' routed and shared outputs once."""
    experts = block.switch_mlp
    rows = _part(experts.gate_proj["weight"].shape[-2], group, "moe_intermediate_size")
    _keep_rows(experts.gate_proj, rows)
    _keep_rows(experts.up_proj, rows)
    _keep_columns(experts.down_proj, group, "switch_mlp.down_proj")
    if isinstance(block, SharedExpertMoeBlock):
        _shard_mlp(block.shared_expert, group, summed=False)
    block.sharding_group = group


# ---- vocabulary -----------------------------------------------------------------------------
class _Lookup:
    """Mixin for an embedding table holding ``vocab_rows`` ids from ``vocab_start``."""

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_rows)
        h = super().__call__(mx.where(inside, local, 0))
        return mx.distributed.all_sum(mx.where(inside[..., None], h, 0), group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return gather_vocab(super().as_linear(x), self.group, self.vocab_size)


class _Gather:
    """Mixin for an output layer computing ``vocab_rows`` logits from ``vocab_start``."""

    def __call__(self, x: mx.array) -> mx.array:
        return gather_vocab(super().__call__(x), self.group, self.vocab_size)


class ShardedEmbedding(_Lookup, nn.Embedding):
    """``nn.Embedding`` split by token id (see ``_Lookup``)."""


class ShardedQuantizedEmbedding(_Lookup, nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` split by token id."""


class GatheredLinear(_Gather, nn.Linear):
    """An output ``nn.Linear`` split by token id; its logits gathered."""


class GatheredQuantizedLinear(_Gather, nn.QuantizedLinear):
    """An output ``nn.QuantizedLinear`` split by token id; its logits gathered."""


VOCAB_PARALLEL = {nn.Embedding: ShardedEmbedding, nn.QuantizedEmbedding: ShardedQuantizedEmbedding,
                  nn.Linear: GatheredLinear, nn.QuantizedLinear: GatheredQuantizedLinear}


def _vocab_parallel(module: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """This rank's slice of the token ids of ``module`` (zero rows pad a vocabulary the
    ranks do not divide), as the vocabulary-parallel subclass of its type; parameter paths
    and quantization attributes stay."""
    cls = VOCAB_PARALLEL.get(type(module))
    if cls is None:
        raise TypeError(f"cannot shard {type(module).__name__} by vocabulary")
    vocab = module["weight"].shape[0]
    rows = -(-vocab // group.size())
    start = group.rank() * rows
    _keep_rows(module, mx.arange(start, min(start + rows, vocab)), pad_to=rows)
    module.__class__ = cls  # the same parameters and attributes, plus the collectives
    module.group, module.vocab_start, module.vocab_rows, module.vocab_size = group, start, rows, vocab
    return module


def gather_vocab(local: mx.array, group: mx.distributed.Group, vocab: int) -> mx.array:
    """``(..., rows)`` logits of each rank's slice -> ``(..., vocab)`` on every rank."""
    parts = mx.distributed.all_gather(local[None], group=group)  # (ranks, ..., rows)
    full = mx.moveaxis(parts, 0, -2).reshape(*local.shape[:-1], -1)
    return full if full.shape[-1] == vocab else full[..., :vocab]


# ---- slicing --------------------------------------------------------------------------------
def _part(total: int, group: mx.distributed.Group, what: str) -> range:
    """This rank's contiguous share of ``total`` items."""
    n = group.size()
    if total % n:
        raise ValueError(f"{what}={total} cannot be split across {n} ranks")
    size = total // n
    return range(group.rank() * size, (group.rank() + 1) * size)


def _head_rows(heads: range | list[int], size: int) -> mx.array:
    """The feature indices of ``heads`` when each head owns ``size`` consecutive ones."""
    return (mx.array(list(heads))[:, None] * size + mx.arange(size)).flatten()


def _keep_rows(module: nn.Module, rows: range | mx.array, pad_to: int = 0) -> None:
    """Keep these output features of a (quantized, or switch) linear layer or embedding, in
    order, then zero rows up to ``pad_to``."""
    index = rows if isinstance(rows, mx.array) else mx.array(list(rows))
    for name in (*QUANT_PARTS, "bias"):
        if (a := module.get(name)) is None:
            continue
        axis = a.ndim - 1 if name == "bias" else a.ndim - 2  # weights are (..., out, in)
        kept = mx.take(a, index, axis=axis)
        if pad_to > index.size:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, pad_to - index.size)
            kept = mx.pad(kept, widths)
        module[name] = kept


def _keep_columns(module: nn.Module, group: mx.distributed.Group, what: str) -> None:
    """Keep this rank's contiguous share of the input features (whole quantization groups);
    the caller sums the ranks' outputs."""
    for name in QUANT_PARTS:
        if (a := module.get(name)) is not None:
            cols = _part(a.shape[-1], group, f"{what}.{name} columns (input features or "
                         "quantization groups)")
            module[name] = mx.take(a, mx.arange(cols.start, cols.stop), axis=-1)


def _row_parallel(module: nn.Module, group: mx.distributed.Group, what: str) -> nn.Module:
    """MLX's ``ShardedToAllLinear`` (quantized: ``QuantizedShardedToAllLinear``): this rank's
    input features, outputs summed over the ranks, the bias added once."""
    for name in QUANT_PARTS:  # a clear error before MLX's split
        if (a := module.get(name)) is not None:
            _part(a.shape[-1], group, f"{what}.{name} columns (input features or quantization groups)")
    return shard_linear(module, "sharded-to-all", group=group)
