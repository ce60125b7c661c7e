"""Turns a scheduled batch into MLX arrays, runs the model and the sampler, lazily."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kv_cache import PagedAttention, PagedKVCache
from .sampler import Sampler, SamplerOutput
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass(slots=True)
class StepOutput:
    """What a step produced, still being computed: read it one step later."""

    seqs: list[Sequence]  # the rows that sampled, in row order
    sampled: SamplerOutput
    pooled_seqs: list[Sequence] = field(default_factory=list)  # pooling rows, in row order
    pooled: mx.array | None = None  # (len(pooled_seqs), hidden) L2-normalised, float32


class ModelRunner:
    """The only place that talks to the device: builds inputs, runs, starts evaluation."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, sampler: Sampler) -> None:
        self.model, self.cache, self.sampler = model, cache, sampler

    def run(self, batch: ScheduledBatch, prev: StepOutput | None) -> StepOutput:
        """Queue the forward pass + sampling of ``batch`` and return without waiting."""
        input_ids = self._input_ids(batch, prev)
        ctx = self._attention_context(batch)
        hidden = self.model.hidden_states(input_ids, ctx)  # (B, L, hidden)
        ends = [i for i, s in enumerate(batch.samples) if s]
        rows = [i for i in ends if not batch.seqs[i].pooling]
        pool_rows = [i for i in ends if batch.seqs[i].pooling]
        out = StepOutput([], SamplerOutput(mx.zeros((0,), mx.int32)))
        if pool_rows:
            out.pooled_seqs = [batch.seqs[i] for i in pool_rows]
            out.pooled = _l2_normalise(self._last_rows(hidden, batch, pool_rows))
        if rows:
            out.seqs = [batch.seqs[i] for i in rows]
            logits = self.model.compute_logits(self._last_rows(hidden, batch, rows))
            out.sampled = self.sampler(logits, out.seqs)
        # Only mid-prompt chunks: nothing to sample, the pass just fills the cache.
        lazy = (out.sampled.arrays() if rows else []) + ([out.pooled] if pool_rows else [])
        mx.async_eval(*(lazy or [hidden]))
        return out

    @staticmethod
    def _last_rows(hidden: mx.array, batch: ScheduledBatch, rows: list[int]) -> mx.array:
        """The hidden state of each row's last scheduled token: (len(rows), hidden)."""
        cols = [batch.num_new_tokens[i] - 1 for i in rows]
        return hidden[mx.array(rows), mx.array(cols)]

    def _input_ids(self, batch: ScheduledBatch, prev: StepOutput | None) -> mx.array:
        """(B, L) token ids; a token still being sampled comes lazily from ``prev``."""
        B, L = len(batch), max(batch.num_new_tokens)
        ids = np.zeros((B, L), np.int32)
        pending = np.full((B, L), -1, np.int32)
        for i, (seq, start, n) in enumerate(zip(batch.seqs, batch.start_positions, batch.num_new_tokens)):
            known = seq.token_ids[start:start + n]
            ids[i, :len(known)] = known
            if len(known) < n:  # the last position is the token sampled in the step in flight
                pending[i, len(known)] = seq.pending_row
        out = mx.array(ids)
        if prev is not None and (pending >= 0).any():
            lazy = prev.sampled.token_ids[mx.array(np.maximum(pending, 0))]
            out = mx.where(mx.array(pending >= 0), lazy, out)
        return out

    def _attention_context(self, batch: ScheduledBatch) -> PagedAttention:
        bs, scratch = self.cache.block_size, self.cache.scratch_block
        B, L = len(batch), max(batch.num_new_tokens)
        starts = np.array(batch.start_positions, np.int32)
        lengths = np.array(batch.num_new_tokens, np.int32)
        max_blocks = max(-(-(s + n) // bs) for s, n in zip(starts, lengths))
        tables = np.full((B, max_blocks), scratch, np.int32)
        for i, seq in enumerate(batch.seqs):
            used = -(-(starts[i] + lengths[i]) // bs)
            tables[i, :used] = seq.block_table[:used]
        positions = starts[:, None] + np.arange(L)[None]  # (B, L)
        valid = np.arange(L)[None] < lengths[:, None]
        block_of = np.take_along_axis(tables, np.minimum(positions // bs, max_blocks - 1), axis=1)
        slots = np.where(valid, block_of * bs + positions % bs, scratch * bs)
        mask = self._mask(positions, lengths, max_blocks * bs)
        return PagedAttention(
            self.cache, mx.array(slots.reshape(-1)), mx.array(tables), mx.array(starts), mask
        )

    @staticmethod
    def _mask(positions: np.ndarray, lengths: np.ndarray, num_keys: int) -> mx.array | None:
        """Key j is visible to the query at position p iff j <= p (causal + padding)."""
        B, L = positions.shape
        if B == 1 and L == 1 and positions[0, 0] == num_keys - 1:
            return None
        visible = np.arange(num_keys)[None, None, :] <= positions[:, :, None]  # (B, L, S)
        return mx.array(visible[:, None])


def _l2_normalise(rows: mx.array) -> mx.array:
    """Unit-length float32 rows (last-token pooling, as Qwen3-Embedding does)."""
    rows = rows.astype(mx.float32)
    return rows / mx.maximum(mx.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
