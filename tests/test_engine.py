"""The batching engine: batched == one-at-a-time == mlx-lm, continuous batching,
preemption, abort, prefix caching, paged == dense attention."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as lm_cache
from mlx_lm.models import qwen3 as lm_qwen3

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.block_manager import BlockManager
from nano_qwen3_mlx.engine.kv_cache import PagedKVCache
from nano_qwen3_mlx.engine.model_runner import ModelRunner
from nano_qwen3_mlx.engine.scheduler import ScheduledBatch
from nano_qwen3_mlx.engine.sequence import Sequence
from nano_qwen3_mlx.models.base import DenseCache

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [
    "The quick brown fox", "Hello", "In 1492, Columbus sailed", "def fibonacci(n):",
    "一二三四五六七八九十", "Once upon a time there was a very long prompt that keeps going on and on",
    "2 + 2 =", "Paris is the capital of",
]


@pytest.fixture(scope="module")
def llm(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=16) as llm:
        yield llm


def mlx_lm_greedy(path, prompt_ids, n):
    config = json.loads((path / "config.json").read_text())
    model = lm_qwen3.Model(lm_qwen3.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(mx.load(str(path / "model.safetensors"))).items()))
    cache, x, out = lm_cache.make_prompt_cache(model), mx.array([prompt_ids]), []
    for _ in range(n):
        x = mx.argmax(model(x, cache=cache)[:, -1:], axis=-1)
        out.append(x.item())
    return out


def test_batched_equals_one_at_a_time_equals_mlx_lm(llm, tiny_qwen3_dir):
    batched = [r["token_ids"] for r in llm.generate(PROMPTS, GREEDY)]
    singles = [llm.generate_single(p, GREEDY)["token_ids"] for p in PROMPTS]
    assert batched == singles
    for prompt, tokens in zip(PROMPTS, batched):
        assert tokens == mlx_lm_greedy(tiny_qwen3_dir, llm.tokenizer.encode(prompt), 12)
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_token_id_prompts_and_result_shape(llm):
    ids = llm.tokenizer.encode("Hello")
    result = llm.generate([ids], GREEDY)[0]
    assert result["token_ids"] == llm.generate_single("Hello", GREEDY)["token_ids"]
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    assert result["finish_reason"] == "length" and result["request_id"]
    assert result["prompt_token_ids"] == ids
    assert llm.generate_single("Hello", GREEDY)["prompt_token_ids"] == ids
    assert result["generated_text"] == llm.tokenizer.decode(result["token_ids"], skip_special_tokens=True)


def test_requests_arriving_while_others_decode(llm):
    expected = {p: llm.generate_single(p, GREEDY)["token_ids"] for p in PROMPTS}
    engine, got = llm.engine, {}
    ids = {engine.add_request(p, GREEDY): p for p in PROMPTS[:3]}
    steps = 0
    while engine.has_unfinished_requests() or len(ids) < len(PROMPTS):
        if steps in (3, 7, 11) and len(ids) < len(PROMPTS):  # join mid-decode
            for p in PROMPTS[len(ids):len(ids) + 2]:
                ids[engine.add_request(p, GREEDY)] = p
        for out in engine.step():
            got.setdefault(ids[out.request_id], []).extend(out.token_ids)
        steps += 1
    assert got == expected


def test_preemption_in_tiny_pool_keeps_greedy_output(tiny_qwen3_dir, llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [llm.generate_single(p, params)["token_ids"] for p in PROMPTS]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=10, block_size=4, max_num_batched_tokens=16) as small:
        got = [r["token_ids"] for r in small.generate(PROMPTS, params)]
        stats = small.get_stats()
    assert got == expected
    assert stats["requests"]["preemptions"] > 0
    assert stats["kv_cache"]["num_used_blocks"] == 0


def test_abort_mid_stream_frees_every_block(llm):
    stream = llm.generate_stream("Tell me a long story", SamplingParams(temperature=0, max_tokens=200))
    for i, chunk in enumerate(stream):
        assert not chunk["finished"]
        if i == 4:
            break
    stream.close()
    stats = llm.get_stats()
    assert stats["kv_cache"]["num_used_blocks"] == 0
    assert stats["requests"]["running"] == 0 and stats["requests"]["aborted"] >= 1


def test_prefix_cache_skips_shared_prefix_and_keeps_output(tiny_qwen3_dir):
    prefix = "You are a helpful assistant. " * 12
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, enable_prefix_caching=False) as plain:
        expected = plain.generate_single(prefix + "Second question?", params)["token_ids"]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128) as cached:
        cached.generate_single(prefix + "First question?", params)
        before = cached.get_stats()["tokens"]["prefill_computed"]
        result = cached.generate_single(prefix + "Second question?", params)
        stats = cached.get_stats()
    prompt_len = result["usage"]["prompt_tokens"]
    computed = stats["tokens"]["prefill_computed"] - before
    assert computed <= prompt_len - 64, (computed, prompt_len)
    kv = stats["kv_cache"]
    assert kv["prefix_cache_hits"] * kv["block_size"] >= 64  # whole cached blocks (16 or 64 tokens)
    assert result["token_ids"] == expected


def test_paged_attention_equals_dense(tiny_qwen3_dir, llm):
    """Chunked prefill of three sequences through the paged pool == a dense cache each."""
    model = llm.engine.model
    cache = PagedKVCache(2, 32, 4, 2, 32, mx.float32)
    bm, runner = BlockManager(32, 4), ModelRunner(model, cache, llm.engine.sampler)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[3:6]]
    seqs = [Sequence(i, str(i), ids, GREEDY) for i, ids in enumerate(prompts)]
    last = {}
    while any(s.num_computed_tokens < len(s.token_ids) for s in seqs):
        batch = ScheduledBatch()
        for s in seqs:
            n = min(5, len(s.token_ids) - s.num_computed_tokens)
            if n:
                bm.append_slots(s, n)
                batch.add(s, n)
                s.num_computed_tokens += n
        rows, hidden = runner.forward(batch, None)  # the rows whose chunk ends their prompt
        for row, i in enumerate(rows):
            last[batch.seqs[i].seq_id] = np.array(model.compute_logits(hidden[row]))
    for s, ids in zip(seqs, prompts):
        dense = np.array(model(mx.array([ids]), DenseCache(2))[0, -1])
        np.testing.assert_allclose(last[s.seq_id], dense, atol=1e-4, rtol=1e-4)


def test_exception_in_a_step_fails_only_that_step(tiny_qwen3_dir, monkeypatch):
    """A step that raises fails its own requests; later requests run; no block leaks."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        expected = llm.generate_single("after the fault", params)["token_ids"]
        engine, real_run, calls = llm.engine, llm.engine.runner.run, {"n": 0}

        def flaky_run(batch, prev):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected fault")
            return real_run(batch, prev)

        monkeypatch.setattr(engine.runner, "run", flaky_run)
        failed = llm.generate(["first victim", "second victim"], params)
        assert [r["finish_reason"] for r in failed] == ["error", "error"]
        assert "injected fault" in failed[0]["error"]
        assert llm.generate_single("after the fault", params)["token_ids"] == expected
        stats = llm.get_stats()
    assert stats["kv_cache"]["num_used_blocks"] == 0
    assert stats["requests"]["errors"] == 2


def test_one_bad_prompt_in_a_batch_runs_none(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", [], "also fine"], GREEDY)
    stats = llm.get_stats()
    assert stats["requests"]["running"] == 0 and stats["requests"]["waiting"] == 0
    assert stats["kv_cache"]["num_used_blocks"] == 0


def test_packed_steps_stay_within_the_token_budget_and_mix_prefill_with_decode(tiny_qwen3_dir, llm):
    """A long prompt arriving while a short one decodes: every step carries the decode and
    at most the budget's tokens; the long prompt's chunks ride along, nothing stalls."""
    prompts = ["short", "long " * 300]
    expected = [llm.generate_single(p, GREEDY)["token_ids"] for p in prompts]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, max_num_batched_tokens=256) as small:
        engine, steps = small.engine, []
        real_run = engine.runner.run

        def spy(batch, prev):
            steps.append((batch.num_tokens, sorted(batch.num_new_tokens)))
            return real_run(batch, prev)

        engine.runner.run = spy
        got = [r["token_ids"] for r in small.generate(prompts, GREEDY)]
    assert got == expected
    assert all(tokens <= 256 for tokens, _ in steps), steps
    mixed = [n for _, n in steps if n[0] == 1 and n[-1] > 1]
    assert len(mixed) >= 1, steps  # a decode and a prefill chunk in one step


def test_requests_in_the_same_step_share_a_prefix(tiny_qwen3_dir):
    """n copies of one long prompt admitted together compute its blocks once."""
    prompt = "Shared system prompt. " * 20 + "Question?"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128, enable_prefix_caching=False) as plain:
        expected = plain.generate_single(prompt, params)["token_ids"]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=128) as llm:
        results = llm.generate([prompt] * 4, params)
        stats = llm.get_stats()
    prompt_len = results[0]["usage"]["prompt_tokens"]
    assert [r["token_ids"] for r in results] == [expected] * 4
    # Each follower computes at most the part of a block past the shared whole blocks.
    bs = stats["kv_cache"]["block_size"]
    assert stats["tokens"]["prefill_computed"] < prompt_len + 3 * bs, stats["tokens"]
    assert stats["kv_cache"]["num_used_blocks"] == 0


def test_preemption_during_chunked_prefill_with_priorities(tiny_qwen3_dir, llm):
    """Long prompts in chunks, a pool too small for all, mixed priorities: same greedy output."""
    prompts = [f"{i} " + "word " * (20 + 7 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [llm.generate_single(p, params)["token_ids"] for p in prompts]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=24, block_size=4, max_num_batched_tokens=32) as small:
        engine, got = small.engine, {}
        ids = {engine.add_request(p, params, priority=(i * 5) % 3): i for i, p in enumerate(prompts)}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(ids[out.request_id], []).extend(out.token_ids)
        stats = small.get_stats()
    assert [got[i] for i in range(len(prompts))] == expected
    assert stats["requests"]["preemptions"] > 0
    assert stats["kv_cache"]["num_used_blocks"] == 0
