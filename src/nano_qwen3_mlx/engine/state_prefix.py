"""Admission of a hybrid model's request through the recurrent-state snapshots.

The KV cache can resume a prefix at any token; a recurrent state only where a snapshot was
taken (``state_manager.py``). So a request takes the cached KV of its prompt's start only up
to the last snapshot inside the match, and starts its state from that snapshot. Two more
rules keep requests that arrive together from computing a shared prefix twice: one admitted
beside the prefill of its prefix gets a snapshot point added to that chunk where it leaves
it (block-aligned) and starts from there in the same step; one whose prefix a running
prefill reaches only in a later step waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .block_manager import BlockManager, common_prefix

Key = tuple[int | None, tuple[int, ...]]  # (parent chain hash, the anchor block's tokens)


@dataclass(slots=True, eq=False)
class Snapshot:
    slot: int
    position: int  # tokens the state has absorbed
    key: Key
    anchor: int  # the KV block holding token ``position - 1``; the snapshot dies with it
    seq: Any = None  # the sequence whose queued step writes it; None once written
    # Block-aligned and from a chunk of several tokens: a request admitted in the step that
    # takes it may start from it there and then (``RecurrentRow.source``).
    in_step: bool = False



class SnapshotReuse:
    """``StateManager``'s admission half (it owns the snapshot index this reads)."""

    def allocate_prefix(self, seq: Any, bm: BlockManager, max_tokens: int, running: list) -> bool:
        """Take the cached KV of ``seq``'s start up to its last snapshot (so its state can
        start there); False: a running prefill is about to snapshot further into this
        sequence's prompt, so admitting it next step computes less (nothing is taken)."""
        candidates = self._candidates(seq, bm, max_tokens)
        best = candidates[0].position if candidates else 0
        if self._split_chunk(seq, bm, max_tokens, best):
            candidates = self._candidates(seq, bm, max_tokens)
            best = candidates[0].position
        if self._should_wait(seq, best, max_tokens, running):
            self.num_deferred += 1
            return False
        for snap in candidates:
            if bm.allocate_prefix(seq, snap.position) == snap.position:
                self._sources[seq] = snap
                return True
            bm.undo_allocate_prefix(seq)
        return True

    def undo_allocate_prefix(self, seq: Any) -> None:
        self._sources.pop(seq, None)

    def _candidates(self, seq: Any, bm: BlockManager, max_tokens: int) -> list[Snapshot]:
        """Written snapshots of a prefix of ``seq``'s first ``max_tokens`` tokens whose KV
        blocks before the last are cached, longest first."""
        if not bm.enable_prefix_caching:
            return []
        found, parent, bs = [], None, self.block_size
        for start in range(0, max_tokens, bs):
            tokens = tuple(seq.token_ids[start:min(start + bs, max_tokens)])
            for tail, snap in self._by_parent.get(parent, {}).items():
                if (snap.seq is None or snap.in_step) and tokens[:len(tail)] == tail:
                    found.append(snap)
            if len(tokens) < bs or (parent := bm.cached_hash(parent, tokens)) is None:
                break
        return sorted(found, key=lambda s: s.position, reverse=True)

    def _split_chunk(self, seq: Any, bm: BlockManager, max_tokens: int, best: int) -> bool:
        """Add a snapshot point to a chunk of this step where ``seq`` leaves its prompt (at
        a block boundary: the KV is shared whole), so ``seq`` starts from it in this step
        (clients sharing a system prompt compute it once, then only their own messages)."""
        bs = self.block_size
        for other, (start, n, points) in self._chunks.items():
            shared = common_prefix(seq.token_ids[:max_tokens], other.token_ids[:start + n])
            at = shared // bs * bs
            if at - best < bs or not start < at <= start + n:
                continue
            found = self._key(other, bm, at)
            if found is None or found[0] in self._snapshots:
                continue  # already a snapshot (a candidate if usable)
            slot = self._snapshot_slot()
            if slot is None:
                return False
            self._take(Snapshot(slot, at, *found, seq=other, in_step=True), points, start)
            return True
        return False

    def _should_wait(self, seq: Any, best: int, max_tokens: int, running: list) -> bool:
        """Is a running sequence prefilling a prompt that shares at least one more block
        with ``seq`` than ``best``, and will it snapshot there in a later step (or in this
        one, but where ``seq`` cannot start from it in this step)?"""
        for other in running:
            end = other.num_prompt_tokens
            if other.state_slot is None or other.state_tokens >= end:
                continue  # its prompt's snapshots are all taken already
            shared = common_prefix(seq.token_ids[:max_tokens], other.token_ids[:end])
            # Its next snapshots inside the shared part that a later step could resume from:
            # on the interval grid, or its prompt's end where that ends a block (inside a
            # block, the KV up to it is not findable while the other sequence runs).
            q = shared // self.interval * self.interval
            if shared == end and end % self.block_size == 0:
                q = end
            if q - best < self.block_size:
                continue
            if other.num_computed_tokens < q or any(  # not this step, or not usable in it
                    s.seq is other and s.position == q and not s.in_step for s in self._planned):
                return True
        return False
