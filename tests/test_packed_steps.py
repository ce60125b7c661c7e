"""Packed steps: any mix of prefill chunks and decodes in one step gives the greedy tokens of
one-at-a-time runs and of mlx-lm; a bf16 model (gather read path on CPU) batches the same."""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.kv_cache import gather_mm_supports
from tests.test_engine import mlx_lm_greedy

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Hello", "Once upon a time there was a very long prompt that "
           "keeps going on and on and on", "def fibonacci(n):", "2 + 2 ="]


@pytest.fixture(scope="module")
def small_budget(tiny_qwen3_dir):
    """A 16-token budget and 4-token blocks: prompts arrive in chunks beside running decodes."""
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16,
             max_num_seqs=4) as llm:
        yield llm


@pytest.fixture(scope="module")
def expected(small_budget, tiny_qwen3_dir):
    singles = [small_budget.generate_single(p, PARAMS)["token_ids"] for p in PROMPTS]
    for prompt, tokens in zip(PROMPTS, singles):
        assert tokens == mlx_lm_greedy(tiny_qwen3_dir, small_budget.tokenizer.encode(prompt), 8)
    return singles


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.integers(0, 12), min_size=len(PROMPTS), max_size=len(PROMPTS)),
       priorities=st.lists(st.integers(0, 2), min_size=len(PROMPTS), max_size=len(PROMPTS)))
def test_any_mix_of_chunks_and_decodes_gives_the_single_run_tokens(small_budget, expected, arrivals, priorities):
    engine, got, ids, step = small_budget.engine, {}, {}, 0
    # Earlier runs cached every prompt's KV but its last token: prefills would be one token
    # each, never a chunk beside a decode. This test is about packing, so start cold.
    engine.block_manager.reset_prefix_cache()
    while len(ids) < len(PROMPTS) or engine.has_unfinished_requests():
        for i, when in enumerate(arrivals):
            if when == step:
                ids[engine.add_request(PROMPTS[i], PARAMS, priority=priorities[i])] = i
        for out in engine.step():
            got.setdefault(ids[out.request_id], []).extend(out.token_ids)
        step += 1
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert engine.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_a_prompt_arriving_beside_a_decode_is_packed_into_its_step(small_budget):
    engine, queued = small_budget.engine, []
    engine.block_manager.reset_prefix_cache()
    real_run = engine.runner.run
    engine.runner.run = lambda batch, prev: queued.append(list(batch.num_new_tokens)) or real_run(batch, prev)
    try:
        engine.add_request(PROMPTS[0], PARAMS)
        while not engine.step():  # until the first request has its first token
            pass
        assert engine.scheduler.has_decodes()
        engine.add_request(PROMPTS[2], PARAMS)  # a long prompt arrives while it decodes
        before = len(queued)
        while len(queued) == before:
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.runner.run = real_run
    assert queued[before] == [1, 15]  # the decode, and the prompt's first chunk in the rest of the 16-token budget


def test_bf16_model_batches_like_one_at_a_time(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), dtype="bfloat16", num_kv_blocks=64, block_size=4,
             max_num_batched_tokens=16) as llm:
        assert llm.engine.cache.dtype.size == 2
        assert llm.engine.cache.read_path == ("gather_mm" if gather_mm_supports(mx.bfloat16) else "gather")
        singles = [llm.generate_single(p, PARAMS)["token_ids"] for p in PROMPTS[:3]]
        batched = [r["token_ids"] for r in llm.generate(PROMPTS[:3], PARAMS)]
    assert batched == singles


def test_last_tokens_do_not_wait_behind_a_prompt_only_step(tiny_qwen3_dir):
    """When nothing will decode next, the step in flight is read before any prompt chunk is
    queued: on the CPU backend queueing computes most of a step, so a stream's last token
    would otherwise arrive only after a whole prompt chunk ran."""
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, block_size=4) as llm:
        engine, queued = llm.engine, []
        real_run = engine.runner.run
        engine.runner.run = lambda batch, prev: queued.append(batch.num_tokens) or real_run(batch, prev)
        engine.add_request("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                           request_id="stream")
        finished_by, long_added = None, False
        while finished_by is None:
            before = len(queued)
            outs = engine.step()
            if any(o.request_id == "stream" and o.finished for o in outs):
                finished_by = queued[before:]
            elif not long_added and not engine.scheduler.has_decodes():
                # The stream's last token is in flight and nothing else decodes: a long
                # prompt arrives now.
                engine.add_request("word " * 60, PARAMS, request_id="long")
                long_added = True
        while engine.has_unfinished_requests():
            engine.step()
    assert finished_by == []  # the step that returned the last token queued nothing
    assert max(queued) > 60  # the long prompt then ran as one chunk


def test_a_first_token_is_read_before_the_next_step_is_queued(tiny_qwen3_dir):
    """Time to first token: the step that sampled it is read before another is queued (on
    the CPU backend queueing computes most of a step, so waiting would add a whole step)."""
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, block_size=4) as llm:
        engine, queued = llm.engine, []
        real_run = engine.runner.run
        engine.runner.run = lambda batch, prev: queued.append(batch.num_tokens) or real_run(batch, prev)
        engine.add_request("word " * 30, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while not (outs := engine.step()):
            pass
        assert len(queued) == 1 and len(outs[0].token_ids) == 1  # only the prefill had run
        while engine.has_unfinished_requests():
            engine.step()
    assert queued[1:] == [1, 1, 1]  # then one decode step per token
