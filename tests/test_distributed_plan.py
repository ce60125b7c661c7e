"""Step plans (distributed/plan.py) round-trip: what a follower rebuilds is rank 0's batch."""

from __future__ import annotations

from nano_qwen3_mlx.distributed.plan import STEP, STOP, PlanReader, PlanWriter
from nano_qwen3_mlx.engine.scheduler import ScheduledBatch
from nano_qwen3_mlx.engine.sequence import Sequence, SequenceStatus
from nano_qwen3_mlx.sampling_params import SamplingParams


def _seq(seq_id: int, tokens: list[int], table: list[int]) -> Sequence:
    seq = Sequence(seq_id, f"r{seq_id}", tokens, SamplingParams())
    seq.block_table, seq.status = list(table), SequenceStatus.RUNNING
    return seq


def _check(batch: ScheduledBatch, got: ScheduledBatch) -> None:
    for name in ("num_new_tokens", "start_positions", "samples", "num_drafts", "state_points",
                 "state_sources", "copies"):
        assert getattr(got, name) == getattr(batch, name), name
    assert got.known_tokens == [batch.known(i) for i in range(len(batch))]
    for a, b in zip(batch.seqs, got.seqs):
        assert (b.seq_id, b.block_table, b.pending_row, b.pooling, b.state_slot) == \
            (a.seq_id, a.block_table, a.pending_row, a.pooling, a.state_slot)


def test_plans_round_trip_with_block_table_changes_and_forgotten_sequences():
    writer, reader = PlanWriter(), PlanReader()
    prompt = _seq(0, list(range(100, 140)), [3, 4, 5])
    decode = _seq(1, [7, 8, 9], [6])
    decode.pending_row, decode.state_slot = 2, 5  # its last token is still being sampled
    draft = _seq(2, [1, 2, 3, 4], [9])
    draft.draft_ids = [5, 6]
    batch = ScheduledBatch(copies=[(4, 11)])
    for seq, n, start in ((prompt, 40, 0), (decode, 1, 3), (draft, 3, 3)):
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.start_positions.append(start)
        batch.samples.append(True)
        batch.state_points.append([(16, 7)] if seq is prompt else [])
        batch.state_sources.append(3 if seq is prompt else None)
        batch.num_drafts.append(2 if seq is draft else 0)
    plan = reader.read(writer.step(batch, 64, 9, [1, 1, 2, 8]))
    assert (plan.kind, plan.num_blocks, plan.num_slots, plan.state_ops) == (STEP, 64, 9, [1, 1, 2, 8])
    assert plan.batch.known_tokens[1] == [] and plan.batch.known_tokens[2] == [4, 5, 6]
    _check(batch, plan.batch)

    # Grown, rewritten (preempted, readmitted), and finished: the next plan follows them.
    prompt.block_table.append(12)
    decode.block_table = [20, 21]
    draft.status = SequenceStatus.FINISHED
    decode.pending_row = None
    decode.token_ids.append(10)
    batch2 = ScheduledBatch()
    for seq, start in ((prompt, 40), (decode, 3)):
        batch2.seqs.append(seq)
        batch2.num_new_tokens.append(1)
        batch2.start_positions.append(start)
        batch2.samples.append(True)
        batch2.state_points.append([])
        batch2.state_sources.append(None)
        batch2.num_drafts.append(0)
    prompt.pending_row = 0
    words = writer.step(batch2, 64, -1, [])
    plan2 = reader.read(words)
    _check(batch2, plan2.batch)
    assert set(reader.mirrors) == {0, 1}  # the finished one is forgotten
    assert reader.read([STOP]).kind == STOP


def test_an_unchanged_table_is_not_shipped_again():
    writer = PlanWriter()
    seq = _seq(0, [1, 2, 3], list(range(50)))
    batch = ScheduledBatch()
    batch.add(seq, 1)
    first, second = writer.step(batch, 64, -1, []), writer.step(batch, 64, -1, [])
    assert len(first) - len(second) == 50  # the second plan keeps all 50 blocks, ships none
