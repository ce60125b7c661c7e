"""Turns a scheduled batch into MLX arrays, runs the model and the sampler, lazily."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .kv_cache import PagedKVCache
from .paged_attention import DecodeGroup, PagedAttention, PrefillChunk, SampledRows
from .prompt_dequant import dequantize_prompt_products
from .recurrent import RecurrentRow, RecurrentStep
from .sampler import Sampler, SamplerOutput
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .split_linear import split_linears, use_single_thread
from .state_cache import StateCache


@dataclass(slots=True)
class StepOutput:
    """What a step produced, still being computed: read it one step later."""

    seqs: list[Sequence]  # the rows that sampled, in row order
    sampled: SamplerOutput
    pooled_seqs: list[Sequence] = field(default_factory=list)  # pooling rows, in row order
    pooled: mx.array | None = None  # (len(pooled_seqs), hidden) L2-normalised, float32
    # For the prefill pacer: what the step carried.
    num_decode_rows: int = 0
    num_chunk_tokens: int = 0  # tokens of the rows of more than one token
    # Speculating rows: first sampled row -> the drafts its next rows verify (speculative.py).
    drafts: dict[int, list[int]] = field(default_factory=dict)
    # (T, hidden): every packed token's final hidden state, in packed order; only from a
    # runner built with ``keep_hidden`` (the MTP head reads it, engine/mtp.py).
    hidden: mx.array | None = None


class ModelRunner:
    """The only place that talks to the device: builds inputs, runs, starts evaluation.

    A step is packed: the rows' tokens are laid end to end (decode rows first, then each
    prefill chunk), and the model sees them as ``(T, 1)`` so no position is padding.
    """

    def __init__(self, model: nn.Module, cache: PagedKVCache, sampler: Sampler,
                 states: StateCache | None = None, keep_hidden: bool = False) -> None:
        self.model, self.cache, self.sampler = model, cache, sampler
        self.states = states  # a hybrid model's recurrent-state pool; None: attention only
        # Keep every token's hidden state (``StepOutput.hidden``): the last layer then
        # computes all rows, not only the sampled ones.
        self.keep_hidden = keep_hidden
        self._hidden: mx.array | None = None
        # Distributed rank 0: broadcasts each batch's plan before its forward is queued, so
        # the other ranks run the same step (distributed/leader.py). None: one process.
        self.before_run: Callable[[ScheduledBatch], None] | None = None
        split_linears(model)  # CPU: skinny products split over the streams (split_linear.py)
        dequantize_prompt_products(model)  # x86 CPU: prompt chunks via the BLAS (prompt_dequant.py)

    def run(self, batch: ScheduledBatch, prev: StepOutput | None) -> StepOutput:
        """Queue the forward pass + sampling of ``batch`` and return without waiting."""
        if self.before_run is not None:
            self.before_run(batch)
        use_single_thread(batch.num_tokens, batch.num_prefill_tokens)
        rows, last = self.forward(batch, prev)  # rows: batch indices that sample or pool
        out = StepOutput([], SamplerOutput(mx.zeros((0,), mx.int32)), hidden=self._hidden)
        if not rows:  # only mid-prompt chunks: nothing to sample, just fill the cache
            mx.async_eval(last)
            return self._stamp(out, batch)
        sample = [k for k, i in enumerate(rows) if not batch.seqs[i].pooling]
        pool = [k for k, i in enumerate(rows) if batch.seqs[i].pooling]
        if pool:
            out.pooled_seqs = [batch.seqs[rows[k]] for k in pool]
            out.pooled = _l2_normalise(last[mx.array(pool)])
        if sample:
            out.seqs = [batch.seqs[rows[k]] for k in sample]
            out.drafts = _draft_rows(batch, [rows[k] for k in sample])
            picked = last if len(sample) == len(rows) else last[mx.array(sample)]
            out.sampled = self.sampler(self.model.compute_logits(picked), out.seqs)
        mx.async_eval(*(out.sampled.arrays() if sample else []), *([out.pooled] if pool else []))
        return self._stamp(out, batch)

    @staticmethod
    def _stamp(out: StepOutput, batch: ScheduledBatch) -> StepOutput:
        out.num_decode_rows = batch.num_decode_rows
        # A speculating row is a decode to the pacer, its drafts are no prompt tokens.
        out.num_decode_rows += sum(d > 0 for d in batch.num_drafts)
        out.num_chunk_tokens = batch.num_tokens - out.num_decode_rows - sum(batch.num_drafts)
        return out

    def forward(self, batch: ScheduledBatch, prev: StepOutput | None) -> tuple[list[int], mx.array]:
        """The rows that sample (batch indices, packed order; a speculating row once per
        sampled position) and, lazily, the hidden state of each one's sampled tokens (its last;
        a speculating row's last 1 + drafts): logits are computed only for these."""
        self.copy_reused(batch)
        order = packed_order(batch)
        ctx = self.attention_context(batch, order)
        hidden = self.model.hidden_states(self._input_ids(batch, order, prev), ctx)[:, 0]
        rows = [i for i in order if batch.samples[i] for _ in range(1 + batch.num_drafts[i])]
        self._hidden = hidden if self.keep_hidden else None
        if ctx.pruned:  # the last layer already kept only these rows
            return rows, hidden
        return rows, hidden[ctx.sampled.tokens]

    def _input_ids(self, batch: ScheduledBatch, order: list[int], prev: StepOutput | None) -> mx.array:
        """(T, 1) token ids; a token still being sampled comes lazily from ``prev``."""
        ids, pending = [], []
        for i in order:
            seq, n, known = batch.seqs[i], batch.num_new_tokens[i], batch.known(i)
            ids += known
            pending += [-1] * len(known)
            if len(known) < n:  # the last position is the token sampled in the step in flight
                ids.append(0)
                pending.append(seq.pending_row)
        out = mx.array(ids, mx.int32)
        pending_np = np.array(pending, np.int32)
        if prev is not None and (pending_np >= 0).any():
            lazy = prev.sampled.token_ids[mx.array(np.maximum(pending_np, 0))]
            out = mx.where(mx.array(pending_np >= 0), lazy, out)
        return out[:, None]

    def copy_reused(self, batch: ScheduledBatch) -> None:
        """Queue the batch's copy-on-write of reused KV that ends inside a block (before the
        step's writes into those blocks)."""
        if batch.copies:
            src, dst = zip(*batch.copies)
            self.cache.copy_blocks(list(src), list(dst))

    def attention_context(self, batch: ScheduledBatch, order: list[int]) -> PagedAttention:
        """Where each token of the packed step writes its K/V and which blocks it reads."""
        bs = self.cache.block_size
        counts = np.array([batch.num_new_tokens[i] for i in order], np.int64)
        starts = np.array([batch.start_positions[i] for i in order], np.int64)
        ends = np.cumsum(counts)  # one past each row's last packed token
        row_of = np.repeat(np.arange(len(order)), counts)  # the row each packed token is in
        positions = starts[row_of] + np.arange(ends[-1]) - (ends - counts)[row_of]
        blocks = self._block_ids(batch, order, row_of, positions // bs)
        decode_rows = [i for i in order if batch.num_new_tokens[i] == 1]
        chunks = [self._chunk(batch, i) for i in order if batch.num_new_tokens[i] > 1]
        return PagedAttention(
            self.cache, mx.array(positions.astype(np.int32)), mx.array(blocks),
            mx.array((positions % bs).astype(np.int32)), self._decode_group(batch, decode_rows),
            chunks, self._sampled_rows(batch, order, ends - 1), self._recurrent(batch, order),
        )

    def _recurrent(self, batch: ScheduledBatch, order: list[int]) -> RecurrentStep | None:
        """Each row's state slot, whether it starts from zeros, its snapshots."""
        if self.states is None:
            return None
        rows = {i: RecurrentRow(batch.num_new_tokens[i], batch.seqs[i].state_slot,
                                batch.start_positions[i] == 0, sorted(batch.state_points[i]))
                for i in order}
        chunks = [rows[i] for i in order if rows[i].num_tokens > 1]
        taken = {slot: (c, p) for c, chunk in enumerate(chunks)
                 for p, (_, slot) in enumerate(chunk.points)}
        for i in order:
            source = batch.state_sources[i]
            if source is not None:  # a snapshot an earlier chunk of this step takes
                if source not in taken or (rows[i].num_tokens > 1 and
                                           taken[source][0] >= chunks.index(rows[i])):
                    raise RuntimeError(f"state snapshot slot {source} is not taken before "
                                       "the row that starts from it in this step")
                rows[i].source = taken[source]
        return RecurrentStep(self.states, [rows[i] for i in order if rows[i].num_tokens == 1],
                             chunks)

    @staticmethod
    def _block_ids(batch: ScheduledBatch, order: list[int], row_of: np.ndarray,
                   block_index: np.ndarray) -> np.ndarray:
        """The pool block of each packed token: one lookup into the rows' tables, laid flat."""
        tables = [batch.seqs[i].block_table for i in order]
        offsets = np.cumsum([0] + [len(t) for t in tables[:-1]])
        flat = np.fromiter((b for t in tables for b in t), np.int32)
        return flat[offsets[row_of] + block_index]

    def _sampled_rows(self, batch: ScheduledBatch, order: list[int], last: np.ndarray) -> SampledRows:
        """``last``: each row's last packed token (the one that samples, where it samples)."""
        samples = np.array([batch.samples[i] for i in order])
        decode = [r for r, i in enumerate(order) if batch.num_new_tokens[i] == 1]
        keep = [r for r in decode if samples[r]]
        tokens = [t for r, i in enumerate(order) if samples[r]
                  for t in range(last[r] - batch.num_drafts[i], last[r] + 1)]
        last_layer = -1 if self.keep_hidden else len(self.model.kv_layers) - 1  # -1: no pruning
        return SampledRows(last_layer, mx.array(np.array(tokens, np.int32)),
                           None if len(keep) == len(decode) else mx.array(keep, mx.int32))

    def _decode_group(self, batch: ScheduledBatch, rows: list[int]) -> DecodeGroup | None:
        if not rows:
            return None
        bs = self.cache.block_size
        lengths = np.array([batch.start_positions[i] + 1 for i in rows], np.int32)
        tables = np.full((len(rows), int(-(-lengths.max() // bs))), self.cache.scratch_block, np.int32)
        for r, i in enumerate(rows):
            used = -(-int(lengths[r]) // bs)
            tables[r, :used] = batch.seqs[i].block_table[:used]
        return DecodeGroup.build(tables, lengths, self.cache)

    def _chunk(self, batch: ScheduledBatch, i: int) -> PrefillChunk:
        end = batch.start_positions[i] + batch.num_new_tokens[i]
        used = -(-end // self.cache.block_size)
        table = mx.array([batch.seqs[i].block_table[:used]], mx.int32)
        return PrefillChunk(batch.num_new_tokens[i], end, table, batch.samples[i],
                            1 + batch.num_drafts[i])


def packed_order(batch: ScheduledBatch) -> list[int]:
    """Row order of the packed step: one-token rows (they attend together) first."""
    n = batch.num_new_tokens
    return [i for i in range(len(batch)) if n[i] == 1] + [i for i in range(len(batch)) if n[i] > 1]


def _draft_rows(batch: ScheduledBatch, rows: list[int]) -> dict[int, list[int]]:
    """{first sampled row of a speculating sequence: its drafts} for the sampled ``rows``."""
    drafts, k = {}, 0
    while k < len(rows):
        i = rows[k]
        if batch.num_drafts[i]:
            drafts[k] = list(batch.seqs[i].draft_ids)
        k += 1 + batch.num_drafts[i]
    return drafts


def _l2_normalise(rows: mx.array) -> mx.array:
    """Unit-length float32 rows (last-token pooling, as Qwen3-Embedding does)."""
    rows = rows.astype(mx.float32)
    return rows / mx.maximum(mx.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
