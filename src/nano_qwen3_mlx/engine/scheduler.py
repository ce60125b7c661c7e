"""Decides what runs each step: admission, chunked prefill, decode, preemption, abort."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus
from .state_manager import StateManager


@dataclass(slots=True)
class ScheduledBatch:
    """One packed step: for row i, run ``num_new_tokens[i]`` tokens of ``seqs[i]``.

    Rows mix prefill chunks and decodes; the model runner lays their tokens end to end.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # does the chunk reach the end?
    # Whole KV blocks (source, destination) to copy before the step writes: a reused prefix
    # that ends inside a block (copy-on-write, ``BlockManager.allocate_prefix``).
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Hybrid models: per row, the recurrent-state snapshots it takes, as (tokens into the
    # row, snapshot slot) (``StateManager.plan``).
    state_points: list[list[tuple[int, int]]] = field(default_factory=list)
    # Hybrid models: per row, the snapshot slot of this step its state starts from (a
    # request admitted beside the prefill of its prefix), or None.
    state_sources: list[int | None] = field(default_factory=list)
    # Speculative decoding: per row, how many of its tokens are drafts (its last 1 + drafts
    # positions are all sampled; engine/speculative.py). Set after scheduling.
    num_drafts: list[int] = field(default_factory=list)
    # A follower rank's batch (distributed/plan.py): each row's known tokens, shipped in
    # the plan (its mirror sequences hold none). None: read them from the sequences.
    known_tokens: list[list[int]] | None = None

    def known(self, i: int) -> list[int]:
        """The tokens of row i that are known now (its drafts included); one fewer than
        ``num_new_tokens[i]`` when its last is the token the step in flight samples."""
        if self.known_tokens is not None:
            return self.known_tokens[i]
        seq, start, n = self.seqs[i], self.start_positions[i], self.num_new_tokens[i]
        if not self.num_drafts[i]:
            return seq.token_ids[start:start + n]
        return (seq.token_ids + seq.draft_ids)[start:start + n]

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.start_positions.append(start)
        self.samples.append(start + num_new_tokens == seq.num_tokens)
        self.state_points.append([])
        self.state_sources.append(None)
        self.num_drafts.append(0)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_decode_rows(self) -> int:
        """Rows of one token: decodes (they attend together, reading the pool in place)."""
        return sum(n == 1 for n in self.num_new_tokens)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of rows that compute prompt positions (chunks that start inside the prompt)."""
        return sum(n for seq, start, n in zip(self.seqs, self.start_positions, self.num_new_tokens)
                   if start < seq.num_prompt_tokens)

    def without_finished(self) -> ScheduledBatch | None:
        """The rows whose sequence is still unfinished (None if none is)."""
        kept = ScheduledBatch(copies=self.copies)
        for i, seq in enumerate(self.seqs):
            if not seq.is_finished:
                kept.seqs.append(seq)
                kept.num_new_tokens.append(self.num_new_tokens[i])
                kept.start_positions.append(self.start_positions[i])
                kept.samples.append(self.samples[i])
                kept.state_points.append(self.state_points[i])
                kept.state_sources.append(self.state_sources[i])
                kept.num_drafts.append(self.num_drafts[i])
        return kept if kept.seqs else None

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Waiting and running queues ordered by (priority, arrival); lower priority value first.

    Each step carries all running decodes and prefill chunks under one token budget, so a
    long prompt arriving never stalls the streams that are decoding.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 grow_pool: Callable[[int], int] | None = None,
                 prefill_limit: Callable[[int], int | None] | None = None,
                 states: StateManager | None = None):
        self.block_manager = block_manager
        self.states = states  # a hybrid model's state slots and snapshots; None: attention only
        # Asked for N more blocks before anything is refused or preempted; returns how many
        # it added (0 at the pool's cap). None: a fixed pool.
        self.grow_pool = grow_pool
        # Given the step's decode rows, the most prompt tokens it may add (None: no limit);
        # the prefill pacer's, which keeps decoding streams' token gaps even.
        self.prefill_limit = prefill_limit
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queues -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def finish(self, seq: Sequence, reason: str, num_kv_tokens: int | None = None) -> None:
        """End a sequence (stop, length, abort, error) and free its blocks at once;
        ``num_kv_tokens``: at most this many of its tokens have KV (``BlockManager.free``)."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.states is not None:  # an errored step's states are not kept
            self.states.release(seq, self.block_manager, keep=reason != "error")
        self.block_manager.free(seq, num_kv_tokens)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_decodes(self) -> bool:
        """Will the next step decode anything?"""
        return any(map(_decodes_next, self.running))

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Every running decode, plus as much prefill as the token budget has left.

        Running sequences are visited most important first, so a preemption victim (the
        least important) is never a sequence already placed in this batch.
        """
        batch = ScheduledBatch()
        decodes = set(filter(_decodes_next, self.running))
        budget = self._prefill_budget(len(decodes))
        for seq in sorted(self.running, key=Sequence.sort_key):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted above to make room for a more important one
            if seq in decodes:
                if self._make_room(seq):
                    self._add_chunk(batch, seq, 1)
            elif seq.num_uncomputed_tokens > 1 and budget > 0 and self._make_room(seq):
                budget = self._add_chunk(batch, seq, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.pending_row is not None or not self._admit(seq):
                break  # strict priority order: nothing jumps the head of the queue
            budget = self._add_chunk(batch, seq, budget)
        if batch:
            batch.copies = self.block_manager.take_copies()
        return batch or None

    def _prefill_budget(self, num_decodes: int) -> int:
        budget = self.max_num_batched_tokens - num_decodes  # one token reserved per decode
        limit = self.prefill_limit(num_decodes) if self.prefill_limit else None
        return budget if limit is None else min(budget, limit)

    def _admit(self, seq: Sequence) -> bool:
        if self.states is None:
            self.block_manager.allocate_prefix(seq, seq.num_tokens - 1)
        elif not self.states.allocate_prefix(seq, self.block_manager, seq.num_tokens - 1,
                                             self.running):
            return False  # a running prefill is about to snapshot its prefix: next step
        self._reserve(seq, min(seq.num_uncomputed_tokens, self.max_num_batched_tokens))
        if self._room_for(seq) <= 0 or (self.states is not None and not self.states.start(seq)):
            if self.states is not None:
                self.states.undo_allocate_prefix(seq)
            self.block_manager.undo_allocate_prefix(seq)
            return False
        if seq.num_cached_tokens is None:  # the first admission's, not a preempted rerun's
            seq.num_cached_tokens = seq.num_computed_tokens
        self.waiting.pop(0)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _room_for(self, seq: Sequence) -> int:
        """How many more tokens of ``seq`` the free blocks can hold now."""
        bm = self.block_manager
        capacity = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size
        return capacity - seq.num_computed_tokens

    def _reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the pool (when it may) so ``num_tokens`` more tokens of ``seq`` fit."""
        bm = self.block_manager
        shortfall = bm.blocks_needed(seq, num_tokens) - bm.num_free_blocks
        if shortfall > 0 and self.grow_pool is not None:
            self.grow_pool(shortfall)

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        self._reserve(seq, min(seq.num_uncomputed_tokens, budget))
        # A chunk shrinks to what fits, so a long prompt still progresses in a small pool.
        chunk = min(seq.num_uncomputed_tokens, budget, self._room_for(seq))
        if chunk <= 0:
            return budget
        self.block_manager.append_slots(seq, chunk)
        batch.add(seq, chunk)
        seq.num_computed_tokens += chunk
        # Register the prompt blocks this step fills now, so a request admitted later in
        # this same step shares them: each layer writes every row's K/V before any row reads.
        # Not copied from in this step, though: the step's block copies run before its writes.
        self.block_manager.seal_full_blocks(seq, min(seq.num_computed_tokens, len(seq.token_ids)),
                                            filling=True)
        if self.states is not None:
            batch.state_sources[-1] = self.states.take_source(seq)
            batch.state_points[-1] = self.states.plan(seq, self.block_manager,
                                                      seq.num_computed_tokens - chunk, chunk)
        return budget - chunk

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt lowest-priority running sequences until ``seq`` can take one more token."""
        self._reserve(seq, 1)
        while not self.block_manager.can_append(seq, 1):
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free all blocks; the sequence is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        if self.states is not None:  # its state becomes a snapshot its rerun starts from
            self.states.release(seq, self.block_manager)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)


def _decodes_next(seq: Sequence) -> bool:
    """A running sequence whose next step is one decode token (not past its max_tokens)."""
    return seq.is_decoding and not seq.reached_max_tokens
