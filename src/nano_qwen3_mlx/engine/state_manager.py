"""Recurrent-state bookkeeping of a hybrid model: slots, snapshots, their lifetimes. Pure Python.

Every running sequence owns one slot of the ``StateCache`` from admission until it finishes,
is aborted or preempted. The other slots hold **snapshots**: the recurrent states after the
first ``position`` tokens of some sequence, which let a later request with the same start
resume there (a recurrent state cannot be cut at an arbitrary token, unlike the KV cache).

Snapshots are taken while a prompt is prefilled, every ``interval`` tokens (a multiple of
the block size), at the end of the prompt, at the end of its first message (the system
prompt clients share), and before its generation prompt (``plan``: the
last ``turn_tokens`` token, ``<|im_start|>``, among its last ``TURN_LOOKBACK`` tokens; a
chat's next turn renders the previous reply after that point, not always after the
generation prompt: Qwen3.5 opens ``<think>`` there), and when a sequence lets its slot go
(``release``: the state after everything it computed, so a chat's next turn resumes after
the previous one). A snapshot is keyed like the KV it needs: by the chain hash of the block
before the one holding its last token, and that block's tokens up to its position; it lives
as long as that KV block (``block_reset``: evicted with it) and while snapshots fit
``max_snapshots`` (least recently used first out).

Why ``interval`` = 256 tokens by default (memory against recompute): a snapshot costs one
sequence's whole state. Qwen3.5-0.8B (18 Gated DeltaNet layers: 16 x 128 x 128 fp32 plus the
conv window each) takes 19.5 MB per snapshot, as much as the KV of 1,590 of its tokens (6
attention layers, 2 x 256 bf16 K/V heads); Qwen3-Next-80B 75 MB, the KV of ~3,000 tokens. A
snapshot every block (16 tokens) would cost ~100x the prompt's KV; every 256 tokens a
2,000-token prompt keeps 8 (156 MB against its 25 MB of KV) and a shared prefix is reused
to within 256 tokens: at most 256 tokens (mean 128) of prefill redone per hit, a fraction
of the 2,000 it saves. 1,024 would cut the memory 4x but lose half of a 2,000-token
prefix. Under pressure a prompt's earliest snapshots (least recently used) go first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from .block_manager import BlockManager
from .state_prefix import Key, Snapshot, SnapshotReuse

TURN_LOOKBACK = 16  # how far before a prompt's end a turn start counts as its generation prompt


class SlotDevice(Protocol):
    """What the manager asks of the pool on the device (``state_cache.StateCache``)."""

    num_slots: int

    def grow(self, num_new_slots: int) -> None: ...

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Queue slot copies (lazily: ordered after every step queued before)."""
        ...


class StateManager(SnapshotReuse):
    """Slots of the state pool ``device``: sequences' and snapshots'. The pool starts
    with ``device.num_slots`` slots and doubles on demand up to ``cap_slots``. Admission
    through the snapshots is ``state_prefix.SnapshotReuse``'s."""

    def __init__(self, device: SlotDevice, max_num_seqs: int, max_snapshots: int, interval: int,
                 block_size: int, bytes_per_slot: int) -> None:
        if interval <= 0 or interval % block_size:
            raise ValueError(f"state_snapshot_interval ({interval}) must be a positive multiple "
                             f"of block_size ({block_size})")
        self.device = device
        self.max_snapshots, self.interval, self.block_size = max_snapshots, interval, block_size
        self.max_num_seqs = max_num_seqs  # running sequences (one slot each) at most
        self.cap_slots = max_num_seqs + max_snapshots
        self.bytes_per_slot = bytes_per_slot
        self.initial_slots = self.num_slots = device.num_slots
        self._free: list[int] = list(range(self.num_slots))
        self._snapshots: OrderedDict[Key, Snapshot] = OrderedDict()  # LRU first
        self._by_parent: dict[int | None, dict[tuple[int, ...], Snapshot]] = {}
        self._by_anchor: dict[int, list[Snapshot]] = {}
        self._planned: list[Snapshot] = []  # taken by the step being scheduled
        self._sources: dict[Any, Snapshot] = {}  # admitted this pass -> snapshot to start from
        self._in_step: dict[Any, Snapshot] = {}  # ... one this step takes
        self._chunks: dict[Any, tuple[int, int, list]] = {}  # this step's (start, n, points)
        self.num_seq_slots = 0
        self.num_restores = 0  # admissions that started from a snapshot
        self.num_restored_tokens = 0
        self.num_deferred = 0  # admissions that waited for a running prefill's snapshot
        self.turn_tokens: set[int] = set()  # ids that open a chat turn (``<|im_start|>``)

    @property
    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, least recently used first (those being written included)."""
        return list(self._snapshots.values())

    # ---- slots --------------------------------------------------------------------------
    def _grow(self, n: int) -> None:
        self.device.grow(n)
        self._free.extend(range(self.num_slots, self.num_slots + n))
        self.num_slots += n

    def _take_slot(self) -> int | None:
        if not self._free and self.num_slots < self.cap_slots:
            self._grow(min(self.num_slots, self.cap_slots - self.num_slots))
        if not self._free:
            self._evict_one()
        return self._free.pop() if self._free else None

    def _snapshot_slot(self) -> int | None:
        if len(self._snapshots) >= self.max_snapshots and not self._evict_one():
            return None
        return self._take_slot()

    def _evict_one(self) -> bool:
        """Drop the least recently used written snapshot; False if there is none."""
        for snap in self._snapshots.values():
            if snap.seq is None:
                self._drop(snap)
                return True
        return False

    # ---- sequences ----------------------------------------------------------------------
    def start(self, seq: Any) -> bool:
        """Give an admitted sequence its slot, restoring the snapshot it resumes from (a copy
        queued now: before the step that reads it). False if no slot can be had."""
        source = self._sources.pop(seq, None)
        if source is not None:  # most recently used: the last a new slot would evict
            self._snapshots.move_to_end(source.key)
        slot = self._take_slot()  # if it evicts the source, it is the source's slot: no copy
        if slot is None:
            return False
        seq.state_slot, seq.state_tokens = slot, seq.num_computed_tokens
        self.num_seq_slots += 1
        if source is not None and source.seq is not None:  # written by this very step
            self._in_step[seq] = source
            self.num_restores += 1
            self.num_restored_tokens += source.position
        elif source is not None:
            self.device.copy_slots([source.slot], [slot])
            self.num_restores += 1
            self.num_restored_tokens += source.position
        return True

    def release(self, seq: Any, bm: BlockManager, keep: bool = True) -> None:
        """The sequence lets its slot go (finish, abort, preemption). ``keep``: its state
        (after ``seq.state_tokens`` tokens, all run) becomes a snapshot. Call before the
        block manager frees its blocks."""
        self._sources.pop(seq, None)
        self._in_step.pop(seq, None)
        slot, seq.state_slot = seq.state_slot, None
        if slot is None:
            return
        self.num_seq_slots -= 1
        found = self._key(seq, bm, seq.state_tokens) if keep and bm.enable_prefix_caching \
            else None
        if found is not None and found[0] not in self._snapshots:
            snap_slot = self._snapshot_slot()
            if snap_slot is not None:
                self.device.copy_slots([slot], [snap_slot])
                self._add(Snapshot(snap_slot, seq.state_tokens, *found))
        seq.state_tokens = 0
        self._free.append(slot)

    # ---- speculative decoding -------------------------------------------------------------
    def reserve_draft_slots(self, num_slots: int) -> None:
        """Room in the pool (and its memory cap) for the scratch slots of speculating rows."""
        self.cap_slots += num_slots

    def take_draft_slots(self, seq: Any, num_drafts: int) -> bool:
        """Scratch slots for a row of ``seq``'s last token and ``num_drafts`` drafts: slot
        ``j`` takes the state after ``j + 1`` of its tokens (``draft_points``), so any
        accepted prefix has its state. False (nothing taken) if the pool has too few."""
        slots: list[int] = []
        while len(slots) < num_drafts:
            slot = self._take_slot()
            if slot is None:
                self._free.extend(slots)
                return False
            slots.append(slot)
        seq.draft_slots = slots
        return True

    @staticmethod
    def draft_points(seq: Any) -> list[tuple[int, int]]:
        """The speculating row's points for ``RecurrentStep``: (tokens into the row, slot)."""
        return [(j + 1, slot) for j, slot in enumerate(seq.draft_slots)]

    def keep_accepted(self, seq: Any, num_accepted: int) -> None:
        """The row verified ``num_accepted`` drafts: the sequence's state becomes the one
        after them (a copy queued before the next step reads it; after every draft the
        row's own state already is) and the scratch slots go back."""
        slots, seq.draft_slots = seq.draft_slots, []
        if seq.state_slot is not None and num_accepted < len(slots):
            self.device.copy_slots([slots[num_accepted]], [seq.state_slot])
        seq.state_tokens -= len(slots) - num_accepted
        self._free.extend(slots)

    def drop_draft_slots(self, seq: Any) -> None:
        """Give back a row's scratch slots without keeping any state (a failed step)."""
        self._free.extend(seq.draft_slots)
        seq.draft_slots = []

    # ---- snapshots while a step is scheduled ------------------------------------------------
    def plan(self, seq: Any, bm: BlockManager, start: int, num_tokens: int) -> list[tuple[int, int]]:
        """The snapshots the chunk ``[start, start + num_tokens)`` of ``seq`` takes, as
        ``(tokens into the chunk, slot)``: at multiples of ``interval`` and the prompt's end."""
        if not bm.enable_prefix_caching:
            return []
        end, s = start + num_tokens, self.interval
        positions = set(range((start // s + 1) * s, end + 1, s))
        for p in (seq.num_prompt_tokens, self._turn_start(seq), self._first_turn_end(seq)):
            if p is not None and start < p <= end:
                positions.add(p)
        points = []
        for p in sorted(positions):
            found = self._key(seq, bm, p)
            if found is None:
                continue
            if found[0] in self._snapshots:
                self._snapshots.move_to_end(found[0])
                continue
            slot = self._snapshot_slot()
            if slot is None:
                break
            self._take(Snapshot(slot, p, *found, seq=seq,
                                in_step=num_tokens > 1 and p % self.block_size == 0),
                       points, start)
        if num_tokens > 1:  # other rows of this step may start from more points of it
            self._chunks[seq] = (start, num_tokens, points)
        return points

    def _take(self, snap: Snapshot, points: list[tuple[int, int]], start: int) -> None:
        self._add(snap)
        self._planned.append(snap)
        points.append((snap.position - start, snap.slot))

    def take_source(self, seq: Any) -> int | None:
        """The snapshot slot of this step that ``seq``'s first chunk starts from, if any."""
        source = self._in_step.pop(seq, None)
        return None if source is None else source.slot

    def commit(self, batch: Any | None) -> None:
        """The step was queued (``batch``, or None: nothing ran): its rows' states are on
        their way, so its snapshots are usable; those of rows dropped before it ran go."""
        ran = set(batch.seqs) if batch else set()
        for snap in self._planned:
            if snap.seq in ran:
                snap.seq = None
            else:
                self._drop(snap)
        self._planned.clear()
        self._chunks.clear()
        for seq, source in self._in_step.items():  # admitted, but no row of it ran
            if self._snapshots.get(source.key) is not source:
                raise RuntimeError(f"request {seq.request_id}: the state it resumes from was "
                                   "never written")
            self.device.copy_slots([source.slot], [seq.state_slot])  # after the step: written
        self._in_step.clear()
        if batch:
            for seq, start, n in zip(batch.seqs, batch.start_positions, batch.num_new_tokens):
                seq.state_tokens = start + n

    def block_reset(self, block_id: int) -> None:
        """KV block ``block_id`` was evicted or freed: the snapshots anchored there go."""
        for snap in self._by_anchor.pop(block_id, []):
            self._drop(snap)

    def drop_snapshots(self) -> None:
        """Forget every snapshot (after an engine fault, or when the pools are rebuilt)."""
        for snap in list(self._snapshots.values()):
            self._drop(snap)
        self._planned.clear()
        self._sources.clear()
        self._in_step.clear()
        self._chunks.clear()

    def reset(self, device: SlotDevice) -> None:
        """The state pool was rebuilt as ``device`` (nothing running)."""
        if self.num_seq_slots:
            raise RuntimeError("state pool reset while sequences hold slots")
        self.drop_snapshots()
        self.device, self.num_slots = device, device.num_slots
        self._free = list(range(self.num_slots))

    # ---- internals ----------------------------------------------------------------------
    def _turn_start(self, seq: Any) -> int | None:
        """Where the prompt's generation prompt starts (its last turn token, near its end)."""
        end = seq.num_prompt_tokens
        for p in range(end - 1, max(end - TURN_LOOKBACK, 0) - 1, -1):
            if seq.token_ids[p] in self.turn_tokens:
                return p or None
        return None

    def _first_turn_end(self, seq: Any) -> int | None:
        """Where the prompt's second turn starts: the end of its system message, which
        clients share (the prompt caches of mlx_lm.server and the APIs keep it too)."""
        ends = []
        for token in self.turn_tokens:
            try:
                ends.append(seq.token_ids.index(token, 1, seq.num_prompt_tokens))
            except ValueError:
                continue
        return min(ends, default=None)

    def _key(self, seq: Any, bm: BlockManager, position: int) -> tuple[Key, int] | None:
        """(key, anchor block) of ``seq``'s state after ``position`` tokens; None where it
        cannot be keyed (no tokens, tokens not all known yet, an unsealed block before)."""
        anchor = (position - 1) // self.block_size
        if position <= 0 or position > len(seq.token_ids) or anchor >= len(seq.block_table):
            return None
        parent = bm.blocks[seq.block_table[anchor - 1]].hash if anchor else None
        if anchor and parent is None:
            return None
        tokens = tuple(seq.token_ids[anchor * self.block_size:position])
        return (parent, tokens), seq.block_table[anchor]

    def _add(self, snap: Snapshot) -> None:
        self._snapshots[snap.key] = snap
        self._by_parent.setdefault(snap.key[0], {})[snap.key[1]] = snap
        self._by_anchor.setdefault(snap.anchor, []).append(snap)

    def _drop(self, snap: Snapshot) -> None:
        if self._snapshots.get(snap.key) is not snap:
            return  # already dropped
        del self._snapshots[snap.key]
        kids = self._by_parent[snap.key[0]]
        del kids[snap.key[1]]
        if not kids:
            del self._by_parent[snap.key[0]]
        anchored = self._by_anchor.get(snap.anchor, [])
        if snap in anchored:
            anchored.remove(snap)
            if not anchored:
                del self._by_anchor[snap.anchor]
        self._free.append(snap.slot)

    def stats(self) -> dict[str, float]:
        num_snapshots = len(self._snapshots)
        return {
            "slots": self.num_slots, "cap_slots": self.cap_slots,
            "slots_used": self.num_seq_slots, "slots_free": len(self._free),
            "bytes_per_slot": self.bytes_per_slot,
            "snapshots": num_snapshots, "snapshot_bytes": num_snapshots * self.bytes_per_slot,
            "max_snapshots": self.max_snapshots, "snapshot_interval": self.interval,
            "restores": self.num_restores, "restored_tokens": self.num_restored_tokens,
            "deferred_admissions": self.num_deferred,
        }
