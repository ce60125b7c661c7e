"""``Drafter``: what the draft model (``draft_model.py``) and the MTP head (``mtp.py``) share,
a paged KV pool of their own on the target's block ids.

The pool has the target's block size and number of blocks, and is rebuilt (``attach``) and
grown (``grow``) with the target's, so a sequence's block table addresses both pools: there
is no second bookkeeping. Its block's bytes count with the target's block in the memory cap
(``block_bytes``). After every target step the drafter queues its own pass over the same
batch (``follow``) so its KV covers every token the target computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .kv_cache import KVLayout, PagedKVCache, block_bytes_for, pool_for
from .model_runner import ModelRunner, StepOutput
from .scheduler import ScheduledBatch


class Drafter:
    """A drafting model's KV pool on the target's block ids and the runner that fills it.

    Subclasses give ``_new_runner`` (the runner over a fresh pool) and ``follow``."""

    weights_nbytes = 0  # weights beyond the target's (counted in the memory cap)

    def __init__(self, kv_model: Any, block_size: int, layout: KVLayout) -> None:
        """``kv_model``: the module whose ``kv_layers`` the pool holds; ``layout``: how its
        rows are stored (``--kv-cache-dtype``)."""
        self.kv_model, self.block_size, self.layout = kv_model, block_size, layout
        self.cache: PagedKVCache | None = None
        self.runner: ModelRunner | None = None

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this pool (counted with the target's block)."""
        return block_bytes_for(self.kv_model, self.block_size, self.layout)

    def attach(self, num_blocks: int) -> None:
        """(Re)build the pool with ``num_blocks`` blocks, as the target's was."""
        self.cache = self.runner = None  # the old pool is freed before the new one is made
        self.cache = pool_for(self.kv_model, num_blocks, self.block_size, self.layout)
        self.runner = self._new_runner(self.cache)

    def grow(self, num_new_blocks: int) -> None:
        """Add blocks as the target's pool did (same ids)."""
        self.cache.grow(num_new_blocks)

    def _new_runner(self, cache: PagedKVCache) -> ModelRunner:
        raise NotImplementedError

    def follow(self, batch: ScheduledBatch, prev: StepOutput | None,
               out: StepOutput | None) -> None:
        """Queue this drafter's pass over the target's step (``prev``: the step in flight,
        ``out``: the one just queued)."""
        raise NotImplementedError

    def _queue_with_pool(self, *arrays: mx.array) -> None:
        """Start evaluating ``arrays`` and every layer's pool writes (also where a step
        samples no row, so the writes happen before a later step reads them)."""
        pools = [p for parts in (*self.cache.k_parts, *self.cache.v_parts) for p in parts]
        mx.async_eval(*arrays, *pools)


def chain_drafts(seqs: list[Any], counts: list[int], carry: tuple[mx.array, ...],
                 run: Callable[[ScheduledBatch, tuple[mx.array, ...]], tuple[mx.array, ...]]
                 ) -> list[list[int]]:
    """Chained one-token steps, one read: step m runs the rows with more than m drafts to
    make (``counts``), each at position ``len(token_ids) - 1 + m``, on ``carry`` (one row
    each: the last tokens, ...) cut to those rows; ``run`` returns the next carry, the new
    drafts first (lazy). Returns each row's drafts."""
    active, steps = list(range(len(seqs))), []
    for m in range(max(counts, default=0)):
        still = [a for a, r in enumerate(active) if counts[r] > m]
        if len(still) < len(active):
            keep = mx.array(still)
            carry, active = tuple(c[keep] for c in carry), [active[a] for a in still]
        step = ScheduledBatch()
        for r in active:
            step.add(seqs[r], 1)
            step.start_positions[-1] = len(seqs[r].token_ids) - 1 + m
            step.samples[-1] = True
        carry = run(step, carry)
        steps.append((active, carry[0]))
    mx.eval([t for _, t in steps])
    drafts: list[list[int]] = [[] for _ in seqs]
    for rows, sampled in steps:
        for r, t in zip(rows, sampled.tolist()):
            drafts[r].append(t)
    return drafts
