"""A step plan as int32 words: rank 0 writes one per packed step, followers rebuild it.

A plan carries what ``ModelRunner.run`` reads of the batch and its sequences: per row the
tokens it knows, its start, its sampling, its speculation and state-pool fields, and its
block table as a change since the last plan (a kept prefix and a new tail), plus the step's
block copies, the pool's size and the state pool's queued operations. Followers keep a
mirror ``Sequence`` per running request (its block table only); rank 0 tells them which to
forget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.scheduler import ScheduledBatch
from ..engine.sequence import Sequence
from ..sampling_params import SamplingParams

STEP, STOP = 1, 2  # plan kinds
COPY = 1  # a state-pool operation (``leader.RecordingSlots``): copy slots


class PlanWriter:
    """Rank 0's side: encodes batches, remembering the block tables followers hold."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[Sequence, list[int]]] = {}  # seq_id -> (seq, as shipped)

    def step(self, batch: ScheduledBatch, num_blocks: int, num_slots: int,
             state_ops: list[int]) -> list[int]:
        """The plan of ``batch``; ``num_blocks``/``num_slots``: the KV and state pools' sizes
        now (-1: no state pool), ``state_ops``: the state pool's operations since the last."""
        forget = [sid for sid, (seq, _) in self._tables.items() if seq.is_finished]
        for sid in forget:
            del self._tables[sid]
        words = [STEP, num_blocks, num_slots, len(forget), *forget, len(state_ops), *state_ops,
                 2 * len(batch.copies), *(b for pair in batch.copies for b in pair), len(batch)]
        for i, seq in enumerate(batch.seqs):
            words += self._row(batch, i, seq)
        return words

    def _row(self, batch: ScheduledBatch, i: int, seq: Sequence) -> list[int]:
        known = batch.known(i)
        points = [w for point in batch.state_points[i] for w in point]
        source = batch.state_sources[i]
        keep, tail = self._table_change(seq)
        return [seq.seq_id, batch.num_new_tokens[i], batch.start_positions[i],
                int(batch.samples[i]), batch.num_drafts[i],
                -1 if seq.pending_row is None or len(known) == batch.num_new_tokens[i]
                else seq.pending_row,
                int(seq.pooling), -1 if seq.state_slot is None else seq.state_slot,
                -1 if source is None else source, len(batch.state_points[i]), *points,
                keep, len(tail), *tail, len(known), *known]

    def _table_change(self, seq: Sequence) -> tuple[int, list[int]]:
        """(how much of the shipped table still holds, the blocks after it)."""
        table = seq.block_table
        shipped = self._tables.get(seq.seq_id, (seq, []))[1]
        keep = len(shipped)
        if table[:keep] != shipped:  # preempted, trimmed or re-admitted: the common prefix
            keep = next((k for k, (a, b) in enumerate(zip(table, shipped)) if a != b),
                        min(len(table), len(shipped)))
        if keep != len(table) or keep != len(shipped):
            self._tables[seq.seq_id] = (seq, list(table))
        else:
            self._tables.setdefault(seq.seq_id, (seq, shipped))
        return keep, table[keep:]


@dataclass
class Plan:
    """A decoded plan: what a follower does before and for one packed step."""

    kind: int
    num_blocks: int = 0
    num_slots: int = -1
    state_ops: list[int] = field(default_factory=list)
    batch: ScheduledBatch | None = None


class PlanReader:
    """A follower's side: decodes plans into batches of mirror sequences."""

    def __init__(self) -> None:
        self.mirrors: dict[int, Sequence] = {}
        self._params = SamplingParams()

    def read(self, words: list[int]) -> Plan:
        r = Words(words)
        kind = r.one()
        if kind == STOP:
            return Plan(STOP)
        if kind != STEP:
            raise RuntimeError(f"unknown plan kind {kind}: the ranks run different versions")
        num_blocks, num_slots = r.take(2)
        for sid in r.list():
            self.mirrors.pop(sid, None)
        state_ops = r.list()
        flat = r.list()
        batch = ScheduledBatch(copies=list(zip(flat[::2], flat[1::2])), known_tokens=[])
        for _ in range(r.one()):
            self._row(r, batch)
        return Plan(STEP, num_blocks, num_slots, state_ops, batch)

    def _row(self, r: Words, batch: ScheduledBatch) -> None:
        sid, n, start, samples, drafts, pending, pooling, slot, source = r.take(9)
        seq = self.mirrors.get(sid)
        if seq is None:
            seq = self.mirrors[sid] = Sequence(sid, f"mirror-{sid}", [], self._params)
        points = r.take(2 * r.one())
        keep = r.one()
        seq.block_table = seq.block_table[:keep] + r.list()
        seq.pending_row = None if pending < 0 else pending
        seq.pooling, seq.state_slot = bool(pooling), None if slot < 0 else slot
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.start_positions.append(start)
        batch.samples.append(bool(samples))
        batch.num_drafts.append(drafts)
        batch.state_points.append(list(zip(points[::2], points[1::2])))
        batch.state_sources.append(None if source < 0 else source)
        batch.known_tokens.append(r.list())


class Words:
    """A cursor over a plan's words."""

    def __init__(self, words: list[int]) -> None:
        self.words, self.at = words, 0

    def one(self) -> int:
        self.at += 1
        return self.words[self.at - 1]

    def take(self, n: int) -> list[int]:
        self.at += n
        return self.words[self.at - n:self.at]

    def list(self) -> list[int]:
        return self.take(self.one())
