"""Prefill pacing: while streams decode, prompt chunks are sized so a step takes at most
``max_itl_ratio`` decode steps; the tokens are those of an unpaced run."""

from __future__ import annotations

import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.config import EngineConfig
from nano_qwen3_mlx.engine.block_manager import BlockManager
from nano_qwen3_mlx.engine.prefill_pacer import PrefillPacer, StepClock
from nano_qwen3_mlx.engine.scheduler import Scheduler
from nano_qwen3_mlx.engine.sequence import Sequence


def run_steps(pacer: PrefillPacer, decode_s: float, fixed_s: float, token_s: float,
              rows: int = 4, steps: int = 30) -> list[int]:
    """Drive the pacer with steps that cost ``decode_s + fixed_s + token_s * n``."""
    pacer.observe(rows, 0, decode_s)
    chunks = []
    for _ in range(steps):
        n = pacer.prefill_limit(rows)
        chunks.append(n)
        pacer.observe(rows, n, decode_s + (fixed_s + token_s * n if n else 0.0))
    return chunks


@pytest.mark.parametrize("fixed_s", [0.0, 0.02, 0.05])
def test_chunks_settle_at_the_largest_that_meets_the_target(fixed_s):
    decode_s, token_s, ratio = 0.1, 0.001, 2.0
    chunks = run_steps(PrefillPacer(ratio), decode_s, fixed_s, token_s)
    best = ((ratio - 1) * decode_s - fixed_s) / token_s  # decode_s + fixed + n * c == ratio * decode_s
    assert chunks[0] == PrefillPacer().first_chunk
    assert abs(chunks[-1] - best) <= 0.05 * best + 1
    step_s = decode_s + fixed_s + token_s * chunks[-1]
    assert step_s <= ratio * decode_s * 1.02


def test_a_prompt_always_progresses_even_when_one_token_is_too_slow():
    chunks = run_steps(PrefillPacer(1.5), decode_s=0.1, fixed_s=0.0, token_s=1.0)
    assert chunks[-1] == 1


def test_no_ratio_or_no_decodes_means_no_limit():
    assert PrefillPacer(None).prefill_limit(4) is None
    pacer = PrefillPacer(2.0)
    assert pacer.prefill_limit(0) is None  # nothing decodes: prefill takes the whole budget
    pacer.observe(3, 0, 0.1)
    assert pacer.prefill_limit(3) == PrefillPacer().first_chunk


def test_a_new_number_of_decode_rows_is_timed_before_prompts_join_it():
    pacer = PrefillPacer(2.0)
    assert pacer.prefill_limit(2) == 0  # never timed: this step is decode-only, the measurement
    pacer.observe(2, 0, 0.1)
    assert pacer.prefill_limit(2) == 16
    pacer.observe(2, 16, 0.1 + 16 * 0.001)
    assert pacer.prefill_limit(2) == 24  # 100 tokens fit, but a chunk grows by half at most
    assert pacer.prefill_limit(3) == 0  # a stream joined: its decode step is timed first
    pacer.observe(3, 0, 0.02)
    assert pacer.prefill_limit(3) == 20  # (2 - 1) * 0.02 s / 1 ms per token
    assert pacer.prefill_limit(2) == 24  # two rows were timed already: no new measurement


def test_chunks_grow_by_half_at_most_per_step():
    chunks = run_steps(PrefillPacer(3.0), decode_s=0.1, fixed_s=0.0, token_s=0.00001)
    assert chunks[0] == 16 and abs(chunks[-1] - 20000) <= 1  # (3 - 1) * 0.1 s / 10 us
    assert all(b <= max(a, 16) * 3 // 2 for a, b in zip(chunks, chunks[1:]))


def test_a_step_faster_than_a_decode_step_teaches_nothing():
    pacer = PrefillPacer(2.0)
    for t in (0.1, 0.1, 0.1):
        pacer.observe(2, 0, t)
    pacer.observe(2, 16, 0.1 + 16 * 0.001)
    pacer.observe(2, 32, 0.05)  # noise: quicker than a decode-only step
    assert pacer.token_s == 0.001


def test_scheduler_caps_prompt_tokens_beside_decodes_only():
    bm = BlockManager(64, 4)
    limits = []

    def limit(num_decodes: int) -> int | None:
        limits.append(num_decodes)
        return 5 if num_decodes else None

    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, prefill_limit=limit)
    first = Sequence(0, "a", list(range(10, 22)), SamplingParams(max_tokens=8))
    sched.add(first)
    batch = sched.schedule()
    assert batch.num_new_tokens == [12]  # nothing decodes: the whole prompt in one chunk
    first.token_ids.append(7)  # its first token was sampled: now it decodes
    sched.add(second := Sequence(1, "b", list(range(30, 50)), SamplingParams(max_tokens=8)))
    batch = sched.schedule()
    assert batch.seqs == [first, second] and batch.num_new_tokens == [1, 5]
    assert limits == [0, 1]


def test_config_rejects_a_ratio_that_cannot_be_met():
    with pytest.raises(ValueError, match="max_itl_ratio"):
        EngineConfig.load(max_itl_ratio=1.0)


def test_paced_engine_gives_the_unpaced_tokens_and_caps_chunks_beside_decodes(tiny_qwen3_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    stream, long = "Tell me a story about", "word " * 120
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, block_size=4) as llm:
        expected = [llm.generate_single(p, params)["token_ids"] for p in (stream, long)]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, block_size=4, max_itl_ratio=1.5) as llm:
        engine, got, mixed = llm.engine, {}, []
        real_run = engine.runner.run

        def spy(batch, prev):
            limit = engine.pacer.prefill_limit(batch.num_decode_rows)
            if batch.num_decode_rows and limit is not None:
                mixed.append((batch.num_tokens - batch.num_decode_rows, limit))
            return real_run(batch, prev)

        engine.runner.run = spy
        engine.add_request(stream, params, request_id="stream")
        for _ in range(3):  # the stream decodes before the long prompt arrives
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
        engine.add_request(long, params, request_id="long")
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.token_ids)
        stats = engine.get_stats()
        assert stats["kv_cache"]["num_used_blocks"] == 0
        pacing = stats["prefill_pacing"]
        assert pacing["max_itl_ratio"] == 1.5 and pacing["decode_step_s"]
        assert all(t > 0 for t in pacing["decode_step_s"].values())
        assert "prefill_token_s" in pacing  # None until a mixed step outlasts a decode step
    assert [got["stream"], got["long"]] == expected
    assert all(n <= limit for n, limit in mixed)
    long_len = len(llm.tokenizer.encode(long))
    assert any(0 < n < long_len for n, _ in mixed)  # the prompt came in paced chunks


@pytest.mark.parametrize("per_token_s, per_key_s", [(0.001, 2e-5), (0.0005, 5e-5)])
def test_steps_stay_near_the_target_as_a_prompt_grows(per_token_s, per_key_s):
    """Each prompt token costs more the further into the prompt it is (it attends to more
    keys): the pacer follows, overshooting by a bounded amount while chunks grow."""
    pacer, decode_s, pos, times = PrefillPacer(2.0), 0.48, 0, []
    pacer.observe(4, 0, decode_s)
    while pos < 2048:
        n = min(pacer.prefill_limit(4), 2048 - pos)
        t = decode_s + sum(per_token_s + per_key_s * (pos + i) for i in range(n))
        pacer.observe(4, n, t)
        times.append(t)
        pos += n
    assert max(times) <= 1.3 * 2.0 * decode_s
    assert sorted(times)[len(times) // 2] >= 1.6 * decode_s  # the median step uses the room


def test_step_clock_times_the_step_each_engine_step_waited_on():
    clock, decode, chunk = StepClock(), object(), object()
    assert clock.tick(None, decode, 0.0, 0.001, 0.002) is None  # nothing read: nothing timed
    # CPU-like: queueing ``chunk`` took the time, reading ``decode`` none.
    assert clock.tick(decode, chunk, 0.010, 0.510, 0.511) == (chunk, pytest.approx(0.501))
    # Metal-like: queueing returned at once, the read waited on ``chunk``.
    assert clock.tick(chunk, decode, 0.520, 0.521, 0.900) == (chunk, pytest.approx(0.389))
    assert clock.tick(None, None, 1.0, 1.0, 1.0) is None and clock.last_end is None
