"""The engine on a hybrid model (recurrent layers beside attention; ``tests/toy_hybrid.py``):
packed steps equal the dense reference, batched equals one at a time, the state pool's slots
and snapshots never leak, and prefix reuse resumes from snapshots (computing only the rest)."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.sampling_params import SamplingParams
from tests.toy_hybrid import ToyHybridLM, greedy_reference, toy_engine

BS, S = 4, 8  # block size, snapshot interval
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[7], [5, 6, 7], list(range(10, 19)), list(range(30, 53)), list(range(60, 97))]


@pytest.fixture(scope="module")
def model():
    return ToyHybridLM()


@pytest.fixture(scope="module")
def reference(model):
    """prompt (tuple) -> greedy tokens on DenseCache, computed once."""
    cache: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt: list[int], n: int = PARAMS.max_tokens) -> list[int]:
        key = tuple(prompt)
        if len(cache.get(key, ())) < n:
            cache[key] = greedy_reference(model, prompt, n)[0]
        return cache[key][:n]
    return tokens


def make(model, qwen_tokenizer_dir, **options):
    defaults = dict(block_size=BS, state_snapshot_interval=S, num_kv_blocks=256,
                    max_num_batched_tokens=16, max_num_seqs=4, device="cpu")
    return toy_engine(model, qwen_tokenizer_dir, **(defaults | options))


def drive(engine, prompts, params=PARAMS, arrivals=None, priorities=None) -> dict[int, list[int]]:
    """Run ``prompts`` (prompt i added at step ``arrivals[i]``); tokens by prompt index."""
    arrivals = arrivals or [0] * len(prompts)
    ids, got, step = {}, {i: [] for i in range(len(prompts))}, 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        for i, when in enumerate(arrivals):
            if when == step:
                prio = priorities[i] if priorities else 0
                ids[engine.add_request(prompts[i], params, priority=prio)] = i
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            got[ids[out.request_id]] += out.token_ids
        step += 1
    return got


def assert_no_leaks(engine) -> None:
    """No slot held, every slot free or a snapshot, every snapshot's KV block findable."""
    stats = engine.get_stats()
    states, bm = stats["state_cache"], engine.block_manager
    assert states["slots_used"] == 0
    assert states["slots_free"] + states["snapshots"] == states["slots"]
    assert states["snapshots"] <= states["max_snapshots"]
    assert stats["kv_cache"]["num_used_blocks"] == 0
    for snap in engine.states.snapshots:
        assert snap.seq is None
        assert bm._is_indexed(bm.blocks[snap.anchor])  # evicted with its block, not after


def computed(engine, prompt, params=PARAMS) -> tuple[list[int], int, int]:
    """(tokens, prompt tokens prefilled, num_cached_tokens) of one request."""
    before = engine.stats.num_computed_prompt_tokens
    engine.add_request(prompt, params)
    tokens, cached = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
            cached = out.num_cached_tokens
    return tokens, engine.stats.num_computed_prompt_tokens - before, cached


def test_packed_steps_match_the_dense_reference_logprobs(model, qwen_tokenizer_dir):
    engine = make(model, qwen_tokenizer_dir)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    ids = {engine.add_request(p, params): i for i, p in enumerate(PROMPTS)}
    logprobs: dict[int, list[float]] = {i: [] for i in ids.values()}
    tokens: dict[int, list[int]] = {i: [] for i in ids.values()}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[ids[out.request_id]] += out.token_ids
            logprobs[ids[out.request_id]] += [r["logprob"] for r in out.logprobs or []]
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = greedy_reference(model, prompt, 4)
        assert tokens[i] == ref_tokens
        ref = [float(lg[t] - mx.logsumexp(lg)) for lg, t in zip(ref_logits, ref_tokens)]
        assert logprobs[i] == pytest.approx(ref, abs=1e-4)
    assert_no_leaks(engine)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(st.integers(0, 10), min_size=len(PROMPTS), max_size=len(PROMPTS)),
       priorities=st.lists(st.integers(0, 2), min_size=len(PROMPTS), max_size=len(PROMPTS)))
def test_batched_equals_one_at_a_time(model, qwen_tokenizer_dir, reference, arrivals, priorities):
    engine = make(model, qwen_tokenizer_dir, enable_prefix_caching=False)
    got = drive(engine, PROMPTS, arrivals=arrivals, priorities=priorities)
    assert [got[i] for i in range(len(PROMPTS))] == [reference(p) for p in PROMPTS]
    assert engine.get_stats()["state_cache"]["slots_used"] == 0


def test_a_prefix_hit_resumes_from_the_last_snapshot_and_keeps_the_cold_tokens(
        model, qwen_tokenizer_dir, reference):
    engine = make(model, qwen_tokenizer_dir)
    first = list(range(100, 127))  # 27 tokens: snapshots at 8, 16, 24 and 27 (its end)
    tokens, n, cached = computed(engine, first)
    assert (tokens, n, cached) == (reference(first), 27, 0)
    # Shares 20 tokens: the KV matches 20, the state resumes at 16, 7 tokens run.
    second = first[:20] + [200, 201, 202]
    assert computed(engine, second) == (reference(second), 7, 16)
    # Shares the whole first prompt (a chat turn whose reply was stripped): resumes at 27,
    # inside a block (its tokens copied).
    third = first + [210, 211, 212]
    assert computed(engine, third) == (reference(third), 3, 27)
    # The next turn of a chat: the first request's final state covers its prompt and its
    # reply (every token it ran, the last one too when its step ran).
    fourth = first + tokens + [220, 221]
    run = computed(engine, fourth)
    assert run[0] == reference(fourth)
    assert run[2] >= len(first) + len(tokens) - 1 and run[1] == len(fourth) - run[2]
    assert engine.get_stats()["state_cache"]["restores"] == 3
    assert_no_leaks(engine)


def test_clients_sharing_a_prefix_compute_it_once(model, qwen_tokenizer_dir, reference):
    """The shared prefix fits one step: the others start from its state where they leave
    it (44: off the snapshot grid, on a block boundary) in that step, the one-token rest of
    a prompt too (in the step's group of one-token rows)."""
    engine = make(model, qwen_tokenizer_dir, max_num_batched_tokens=64)
    shared = list(range(1, 45))
    tails = [[150, 160, 170], [151, 161, 171], [152], [153, 163]]
    prompts = [shared + tail for tail in tails]
    before, first_step, step = engine.stats.num_computed_prompt_tokens, {}, 0
    ids = {engine.add_request(p, PARAMS): i for i, p in enumerate(prompts)}
    got = {i: [] for i in range(4)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[ids[out.request_id]] += out.token_ids
            first_step.setdefault(ids[out.request_id], step)
        step += 1
    assert [got[i] for i in range(4)] == [reference(p) for p in prompts]
    # The first computes all 47 tokens, the others only their tails, all in the first step.
    assert engine.stats.num_computed_prompt_tokens - before == 47 + 3 + 1 + 2
    assert len(set(first_step.values())) == 1
    stats = engine.get_stats()["state_cache"]
    assert stats["restores"] == 3 and stats["restored_tokens"] == 3 * 44
    assert stats["deferred_admissions"] == 0
    assert_no_leaks(engine)


def test_a_request_waits_a_step_for_the_snapshot_of_a_running_prefill(model, qwen_tokenizer_dir,
                                                                      reference):
    """The first prompt's last token runs alone (a one-token row: its snapshot at 48 is
    usable from the next step on): the second waits for it instead of resuming at 40."""
    engine = make(model, qwen_tokenizer_dir, max_num_batched_tokens=47)
    first = list(range(1, 49))
    second = first + [150, 160, 170]
    before = engine.stats.num_computed_prompt_tokens
    got = drive(engine, [first, second])
    assert [got[0], got[1]] == [reference(first), reference(second)]
    assert engine.stats.num_computed_prompt_tokens - before == 48 + 3
    stats = engine.get_stats()["state_cache"]
    assert stats["deferred_admissions"] >= 1 and stats["restored_tokens"] == 48
    assert_no_leaks(engine)


def test_preemption_and_abort_free_the_state_slot(model, qwen_tokenizer_dir, reference):
    engine = make(model, qwen_tokenizer_dir, num_kv_blocks=14)  # 56 token slots for 4 x 22
    prompts = [list(range(10 * i + 1, 10 * i + 11)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = drive(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [got[i] for i in range(4)] == [reference(p, 12) for p in prompts]
    assert engine.get_stats()["state_cache"]["restores"] > 0  # a rerun resumed its own state
    assert_no_leaks(engine)

    kept = engine.add_request(prompts[0], PARAMS)
    dropped = engine.add_request(list(range(200, 220)), PARAMS)
    while engine.get_stats()["state_cache"]["slots_used"] < 2:
        engine.step()
    assert engine.abort_request(dropped)
    assert engine.get_stats()["state_cache"]["slots_used"] == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.abort_request(kept) is False
    assert_no_leaks(engine)


def test_no_slot_or_snapshot_leaks_under_a_mixed_load(model, qwen_tokenizer_dir, reference):
    engine = make(model, qwen_tokenizer_dir, num_kv_blocks=40, max_state_snapshots=6,
                  max_num_batched_tokens=24)
    rng = random.Random(0)
    heads = [list(range(1, 25)), list(range(50, 70)), [9, 9, 9]]
    live: dict[str, tuple[list[int], int]] = {}
    got: dict[str, list[int]] = {}
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            prompt = rng.choice(heads)[: rng.randint(1, 24)] + [rng.randint(100, 255)
                                                                  for _ in range(rng.randint(0, 9))]
            n = rng.randint(1, 8)
            rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n,
                                                            ignore_eos=True))
            live[rid], got[rid] = (prompt, n), []
        if live and rng.random() < 0.05:
            rid = rng.choice(sorted(live))
            engine.abort_request(rid)
            live.pop(rid)
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            got[out.request_id] += out.token_ids
            if out.finished and out.request_id in live:
                prompt, n = live.pop(out.request_id)
                assert got[out.request_id] == reference(prompt, n)
        assert engine.get_stats()["state_cache"]["snapshots"] <= 6
    while engine.has_unfinished_requests():
        engine.step()
    assert not live
    assert engine.get_stats()["state_cache"]["restores"] > 0
    assert_no_leaks(engine)


def test_snapshots_go_with_their_blocks(model, qwen_tokenizer_dir):
    engine = make(model, qwen_tokenizer_dir)
    computed(engine, list(range(1, 30)))
    assert engine.get_stats()["state_cache"]["snapshots"] > 0
    engine.block_manager.reset_prefix_cache()  # evicts every cached block
    stats = engine.get_stats()["state_cache"]
    assert stats["snapshots"] == 0 and stats["slots_free"] == stats["slots"]


def test_a_snapshot_interval_off_the_block_grid_is_refused(model, qwen_tokenizer_dir):
    with pytest.raises(ValueError, match="multiple of block_size"):
        make(model, qwen_tokenizer_dir, state_snapshot_interval=6)


def test_a_recurrent_layer_after_the_pruned_last_attention_layer_fails_clearly(
        qwen_tokenizer_dir):
    engine = make(ToyHybridLM("RAAR"), qwen_tokenizer_dir)
    engine.add_request([1, 2, 3], PARAMS)
    outs = [o for _ in range(3) for o in engine.step()]
    assert outs[0].finish_reason == "error" and "output_rows" in outs[0].error


def test_an_attention_only_model_has_no_state_pool(tiny_qwen3_dir):
    from nano_qwen3_mlx import LLM

    with LLM(str(tiny_qwen3_dir), num_kv_blocks=32, block_size=4) as llm:
        assert llm.engine.states is None and llm.engine.runner.states is None
        llm.generate_single("Hello", PARAMS)
        assert "state_cache" not in llm.engine.get_stats()


def test_an_idle_shrink_rebuilds_the_state_pool_and_keeps_serving(model, qwen_tokenizer_dir,
                                                                  reference):
    engine = make(model, qwen_tokenizer_dir, num_kv_blocks=None, kv_cache_gb=0.001)
    prompts = [list(range(1, 60)), list(range(70, 130))]
    drive(engine, prompts)
    grown = engine.cache.num_blocks
    assert grown > engine.pool.initial_blocks and engine.get_stats()["state_cache"]["snapshots"]
    assert engine.shrink_if_idle(now=0.0) is False  # the idle clock starts
    assert engine.shrink_if_idle(now=1e9)
    stats = engine.get_stats()["state_cache"]
    assert stats["snapshots"] == 0 and stats["slots_free"] == stats["slots"]
    assert engine.runner.states is engine.state_cache
    assert computed(engine, prompts[0])[:2] == (reference(prompts[0]), len(prompts[0]))
    assert_no_leaks(engine)


def test_a_chat_turn_resumes_before_the_previous_generation_prompt(model, qwen_tokenizer_dir,
                                                                   reference):
    """Qwen3.5 opens <think> in the generation prompt; the next turn renders the reply
    without it, so the shared prefix ends inside the previous generation prompt."""
    engine = make(model, qwen_tokenizer_dir, state_snapshot_interval=16)
    im_start, assistant, newline, think = 250, 251, 252, 253  # toy ids for the template's
    engine.states.turn_tokens = {im_start}
    history = list(range(1, 23))  # 22 tokens: system + user messages
    first = history + [im_start, assistant, newline, think]
    computed(engine, first)
    second = history + [im_start, assistant, newline, 40, 41, 42, im_start, 43, 44,
                        im_start, assistant, newline, think]
    assert computed(engine, second) == (reference(second), len(second) - 22, 22)
    assert_no_leaks(engine)


def test_the_state_pool_counts_in_the_memory_cap(model, qwen_tokenizer_dir, caplog):
    budget = 40_000  # bytes: room for 17 of the toy's 1,152-byte states in half of it
    engine = make(model, qwen_tokenizer_dir, num_kv_blocks=None, kv_cache_gb=budget / 1e9,
                  max_num_seqs=32)
    states = engine.get_stats()["state_cache"]
    assert states["bytes_per_slot"] == 1152
    assert engine.scheduler.max_num_seqs == 17 and "max_num_seqs 32 lowered to 17" in caplog.text
    assert states["cap_slots"] == 17 + states["max_snapshots"]
    assert engine.kv_cap_bytes + engine.state_cap_bytes <= budget
    assert engine.pool.cap_blocks >= 2
