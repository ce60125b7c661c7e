"""Randomised engine workout: mixed sampling settings, priorities, stops, aborts and a pool
small enough to force preemption. Every request must end, and no block may leak."""

from __future__ import annotations

import random

import pytest

from nano_qwen3_mlx import LLM, SamplingParams

WORDS = "alpha beta gamma delta river stone cloud lamp 一 二 三 😀 the of and".split()


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.0, 0.7, 1.2]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 0, 5, 50]),
        min_p=rng.choice([0.0, 0.0, 0.1]),
        max_tokens=rng.randint(1, 24),
        stop_sequences=rng.choice([[], [], ["a"], ["the", "二"]]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.5]),
        seed=rng.choice([None, rng.randint(0, 2**40)]),
        logprobs=rng.choice([None, 0, 3]),
        min_tokens=rng.choice([0, 0, 2]),
        ignore_eos=rng.random() < 0.3,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_ends_cleanly(tiny_qwen3_dir, seed):
    rng = random.Random(seed)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=20, block_size=4, max_num_seqs=6,
             max_num_batched_tokens=24) as llm:
        engine, finished, live = llm.engine, {}, []
        for step in range(400):
            if len(live) < 10 and rng.random() < 0.4 and step < 250:
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
                live.append(engine.add_request(prompt, random_params(rng), priority=rng.randint(0, 3)))
            if live and rng.random() < 0.05:
                engine.abort_request(rng.choice(live))
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.finish_reason
                    live.remove(out.request_id)
            if step >= 250 and not engine.has_unfinished_requests():
                break
        stats = llm.get_stats()
    assert not live, f"requests never finished: {live}"
    assert set(finished.values()) <= {"stop", "length", "abort"}, finished
    assert stats["kv_cache"]["num_used_blocks"] == 0
    assert stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
    assert stats["requests"]["preemptions"] > 0  # the pool really was too small
