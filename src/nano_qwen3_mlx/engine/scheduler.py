"""Decides what runs each step: admission, chunked prefill, decode, preemption, abort."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work: for row i, run ``num_new_tokens[i]`` tokens of ``seqs[i]``."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)  # does the chunk reach the end?
    is_prefill: bool = False

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.start_positions.append(start)
        self.samples.append(start + num_new_tokens == seq.num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def without_finished(self) -> ScheduledBatch | None:
        """The rows whose sequence is still unfinished (None if none is)."""
        kept = ScheduledBatch(is_prefill=self.is_prefill)
        for i, seq in enumerate(self.seqs):
            if not seq.is_finished:
                kept.seqs.append(seq)
                kept.num_new_tokens.append(self.num_new_tokens[i])
                kept.start_positions.append(self.start_positions[i])
                kept.samples.append(self.samples[i])
        return kept if kept.seqs else None

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Waiting and running queues ordered by (priority, arrival); lower priority value first.

    Steps alternate between prefill and decode while both have work, so a long prompt
    delays running decodes by at most one chunk of ``max_num_batched_tokens``.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._last_was_prefill = False

    # ---- queues -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=Sequence.sort_key)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort, error) and free its blocks at once."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        decodes = [s for s in self.running if s.is_decoding and not s.reached_max_tokens]
        if self._has_prefill_work() and (not decodes or not self._last_was_prefill):
            batch = self._schedule_prefill()
            if batch:
                self._last_was_prefill = True
                return batch
        self._last_was_prefill = False
        return self._schedule_decode(decodes) if decodes else None

    def _has_prefill_work(self) -> bool:
        return bool(self.waiting) or any(s.num_uncomputed_tokens > 1 for s in self.running)

    def _schedule_prefill(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(is_prefill=True), self.max_num_batched_tokens
        # Most important first, so a preemption victim (the least important) is never a
        # sequence already placed in this batch.
        prefilling = sorted((s for s in self.running if s.num_uncomputed_tokens > 1), key=Sequence.sort_key)
        for seq in prefilling:
            if seq.status is SequenceStatus.RUNNING and self._make_room(seq):
                budget = self._add_chunk(batch, seq, budget)
            if budget <= 0:
                return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if self._padded_room(batch) <= 0:
                break
            seq = self.waiting[0]
            if seq.pending_row is not None or not self._admit(seq):
                break  # strict priority order: nothing jumps the head of the queue
            budget = self._add_chunk(batch, seq, budget)
        return batch

    def _admit(self, seq: Sequence) -> bool:
        self.block_manager.allocate_prefix(seq, seq.num_tokens - 1)
        if self._room_for(seq) <= 0:
            self.block_manager.free(seq)
            return False
        self.waiting.pop(0)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _room_for(self, seq: Sequence) -> int:
        """How many more tokens of ``seq`` the free blocks can hold now."""
        bm = self.block_manager
        capacity = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size
        return capacity - seq.num_computed_tokens

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        # A chunk shrinks to what fits, so a long prompt still progresses in a small pool.
        chunk = min(seq.num_uncomputed_tokens, budget, self._room_for(seq), self._padded_room(batch))
        if chunk <= 0:
            return 0
        self.block_manager.append_slots(seq, chunk)
        batch.add(seq, chunk)
        seq.num_computed_tokens += chunk
        # Register the prompt blocks this step fills now, so a request admitted later in
        # this same step shares them: each layer writes every row's K/V before any row reads.
        self.block_manager.seal_full_blocks(seq, min(seq.num_computed_tokens, len(seq.token_ids)))
        return budget - chunk

    def _padded_room(self, batch: ScheduledBatch) -> int:
        """Longest chunk one more row may have: rows are padded to the longest, and the
        padded (rows x length) batch, not just its real tokens, must fit the token budget."""
        if not batch:
            return self.max_num_batched_tokens
        rows, longest = len(batch) + 1, max(batch.num_new_tokens)
        if rows * longest > self.max_num_batched_tokens:
            return 0
        return self.max_num_batched_tokens // rows

    def _schedule_decode(self, decodes: list[Sequence]) -> ScheduledBatch:
        batch = ScheduledBatch(is_prefill=False)
        for seq in sorted(decodes, key=Sequence.sort_key):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted below to make room for a more important one
            if not self._make_room(seq):
                continue
            self.block_manager.append_slots(seq, 1)
            batch.add(seq, 1)
            seq.num_computed_tokens += 1
        return batch

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt lowest-priority running sequences until ``seq`` can take one more token."""
        while not self.block_manager.can_append(seq, 1):
            victim = max(self.running, key=Sequence.sort_key)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free all blocks; the sequence is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
