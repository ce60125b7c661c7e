"""Speculative decoding (n-gram prompt lookup) inside the packed step: the same greedy tokens
as without it, the same sampled distribution at T > 0, no KV block leaks, clean fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.speculative import SpecState, Speculator, propose_ngram
from tests.checkpoints import TINY_QWEN3, write_checkpoint

# Three tokens get a large bias: the model chooses among them (its own logits decide which),
# so the text repeats n-grams and drafts are proposed, accepted and rejected.
FEW = [101, 202, 303]
BIAS = {t: 40.0 for t in FEW}
PROMPTS = [FEW * 3, [101, 202, 303, 101, 202], [303, 303, 101], FEW[::-1] * 2]


def run(llm: LLM, prompts, params: list[SamplingParams]) -> list[dict]:
    """Every prompt with its params through one engine; finished outputs by prompt index."""
    engine, got = llm.engine, {}
    ids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, params))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            rec = got.setdefault(ids[out.request_id], {"tokens": [], "text": "", "logprobs": []})
            rec["tokens"] += out.token_ids
            rec["text"] += out.text
            rec["logprobs"] += out.logprobs or []
            rec["finish"] = out.finish_reason
    return [got[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory, qwen_tokenizer_dir):
    """The tiny random Qwen3 with a 1024-token vocabulary: the sampler's per-row work (noise,
    softmax over the vocabulary) stays small, so many samples are cheap."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-spec"), qwen_tokenizer_dir,
                            base={**TINY_QWEN3, "vocab_size": 1024})


@pytest.fixture(scope="module")
def engines(small_vocab_dir):
    tiny_qwen3_dir = small_vocab_dir
    opts = dict(num_kv_blocks=128, block_size=4, max_num_seqs=8, device="cpu")
    with LLM(str(tiny_qwen3_dir), **opts) as plain, \
            LLM(str(tiny_qwen3_dir), speculative="ngram", num_speculative_tokens=4, **opts) as spec:
        yield plain, spec


def test_propose_ngram_continues_the_longest_earlier_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]
    assert propose_ngram([5, 6, 7, 8], 3) == []  # no suffix occurred before
    assert propose_ngram([1, 2, 3, 4, 1, 2], 0) == []
    # A short loop: the latest match with k tokens after it, not the one before the end.
    assert propose_ngram([7] * 8, 3) == [7, 7, 7]
    # The longest suffix wins over a more recent shorter one.
    assert propose_ngram([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3], 1) == [4]


def test_adaptive_k_shrinks_on_misses_and_backs_off():
    spec, seq = Speculator(4), type("S", (), {"spec": None})()
    spec.verified(seq, 4, 4, 5)
    assert seq.spec.k == 4
    spec.verified(seq, 4, 1, 2)
    assert seq.spec.k == 2
    spec.verified(seq, 2, 0, 1)  # a miss: one draft next time
    assert seq.spec.k == 1
    spec.verified(seq, 1, 0, 1)  # k would be 0: pause instead, longer each time
    assert (seq.spec.k, seq.spec.skip, seq.spec.backoff) == (1, 16, 32)
    spec.verified(seq, 1, 0, 1)  # the rate is low now: pauses grow
    assert (seq.spec.skip, seq.spec.backoff) == (32, 64)
    spec.verified(seq, 1, 1, 2)  # a lucky hit: no shorter pauses yet
    assert seq.spec.backoff == 64
    for _ in range(3):
        spec.verified(seq, 1, 1, 2)
    assert (seq.spec.k, seq.spec.backoff) == (4, 16)  # a good rate again ends the back-off
    assert isinstance(seq.spec, SpecState)
    assert spec.stats.as_dict()["acceptance_rate"] == pytest.approx(9 / 16)


@pytest.mark.parametrize("extra", [
    {}, {"logit_bias": BIAS}, {"logit_bias": BIAS, "logprobs": 2},
    {"logit_bias": BIAS, "max_tokens": 3}, {"logit_bias": BIAS, "stop": "from the text"},
])
def test_greedy_tokens_are_the_ones_without_speculation(engines, extra):
    plain, spec = engines
    if extra.get("stop"):  # a stop string the greedy text reaches mid-way
        text = run(plain, PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=24,
                                                       logit_bias=BIAS, ignore_eos=True)])[0]["text"]
        extra = extra | {"stop": [text[9:12]]}
    params = [SamplingParams(temperature=0, ignore_eos=True, **({"max_tokens": 24} | extra))] * len(PROMPTS)
    stats = spec.engine.speculator.stats
    before, drafted = stats.accepted, stats.drafted
    want, got = run(plain, PROMPTS, params), run(spec, PROMPTS, params)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert [g["finish"] for g in got] == [w["finish"] for w in want]
    for g, w in zip(got, want):
        assert len(g["tokens"]) <= params[0].max_tokens
        if params[0].logprobs is not None:
            assert len(g["logprobs"]) == len(g["tokens"])
            assert [r["token_id"] for r in g["logprobs"]] == g["tokens"]
            assert [r["logprob"] for r in g["logprobs"]] == pytest.approx(
                [r["logprob"] for r in w["logprobs"]], abs=1e-4)
            assert all(len(r["top_logprobs"]) == 2 for r in g["logprobs"])
    if "logit_bias" in extra and params[0].max_tokens > 3:  # drafts were accepted and rejected
        assert spec.engine.speculator.stats.accepted > before
        assert stats.drafted - drafted > stats.accepted - before
    if "stop" in extra:
        assert got[0]["finish"] == "stop" and len(got[0]["tokens"]) < 24
    assert spec.engine.get_stats()["kv_cache"]["num_used_blocks"] == 0


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}


def _chi2_same(a: list[tuple], b: list[tuple]) -> tuple[float, int]:
    """Two-sample chi-square statistic (and degrees of freedom) over the outcomes seen."""
    keys = sorted(set(a) | set(b))
    table = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]], float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum()), len(keys) - 1


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.8}])
def test_sampled_distribution_is_the_one_without_speculation(engines, filters):
    plain, spec = engines
    n, prompt = 800, FEW * 2
    # T = 5 flattens the model's preferences among the three biased tokens.
    params = SamplingParams(temperature=5.0, max_tokens=5, ignore_eos=True, logit_bias=BIAS,
                            **filters)
    stats = spec.engine.speculator.stats
    before = (stats.drafted, stats.accepted)
    want = [tuple(r["tokens"]) for r in run(plain, [prompt] * n, [params] * n)]
    got = [tuple(r["tokens"]) for r in run(spec, [prompt] * n, [params] * n)]
    drafted, accepted = stats.drafted - before[0], stats.accepted - before[1]
    assert 0 < accepted < drafted  # drafts were both accepted and rejected
    for pos in (1, 2, 3, 4):  # each later position, and the last two together
        chi2, df = _chi2_same([t[pos] for t in want], [t[pos] for t in got])
        assert chi2 < CHI2_CRIT[df], (pos, chi2, df)
    chi2, df = _chi2_same([t[3:] for t in want], [t[3:] for t in got])
    assert chi2 < CHI2_CRIT[df], (chi2, df)


def test_no_block_leaks_with_aborts_and_preemption(small_vocab_dir):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logit_bias=BIAS)
    check_aborts_and_preemption(small_vocab_dir, params, speculative="ngram")


def check_aborts_and_preemption(model_dir, params: SamplingParams, **speculation) -> None:
    """A pool of 14 blocks (preemption), one request aborted mid-way: the others give their
    tokens without speculation, drafts were accepted, and every block is back."""
    opts = dict(num_kv_blocks=14, block_size=4, max_num_seqs=4, device="cpu",
                max_num_batched_tokens=16)
    prompts = PROMPTS + [FEW * 2, FEW]
    with LLM(str(model_dir), **opts) as plain:
        want = [r["tokens"] for r in run(plain, prompts, [params] * len(prompts))]
    with LLM(str(model_dir), **speculation, **opts) as llm:
        engine = llm.engine
        ids = [engine.add_request(p, params) for p in prompts]
        got, step = {i: [] for i in ids}, 0
        while engine.has_unfinished_requests():
            if step == 6:
                engine.abort_request(ids[1])
            for out in engine.step():
                got[out.request_id] += out.token_ids
            step += 1
        stats = engine.get_stats()
        assert stats["requests"]["preemptions"] > 0
        assert stats["speculative"]["accepted_tokens"] > 0
        assert stats["kv_cache"]["num_used_blocks"] == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        for i, rid in enumerate(ids):
            if i != 1:  # the aborted one stopped early
                assert got[rid] == want[i]


@pytest.fixture(scope="module")
def full_vocab_engines(tiny_qwen3_dir):
    """Grammars need the model's vocabulary to cover the tokenizer's."""
    opts = dict(num_kv_blocks=64, block_size=4, max_num_seqs=4, device="cpu")
    with LLM(str(tiny_qwen3_dir), **opts) as plain, \
            LLM(str(tiny_qwen3_dir), speculative="ngram", **opts) as spec:
        yield plain, spec


def test_a_step_of_many_decode_rows_does_not_speculate(small_vocab_dir):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logit_bias=BIAS)
    with LLM(str(small_vocab_dir), speculative="ngram", max_num_seqs=16, device="cpu") as llm:
        run(llm, [FEW * 3] * 9, [params] * 9)  # 9 rows decode together, to the end
        assert llm.engine.speculator.stats.rows == 0
        run(llm, [FEW * 3] * 8, [params] * 8)
        assert llm.engine.speculator.stats.rows > 0


def test_grammar_penalty_and_seeded_rows_speculate_in_one_batch(full_vocab_engines):
    plain, spec = full_vocab_engines
    prompts = [FEW * 3] * 4
    params = [SamplingParams(temperature=0, max_tokens=12, regex="(ab|cd)+", logit_bias=BIAS),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=BIAS,
                             repetition_penalty=1.3),
              SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True, logit_bias=BIAS,
                             seed=5),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias=BIAS)]
    stats = spec.engine.speculator.stats
    rows = stats.rows
    want, got = run(plain, prompts, params), run(spec, prompts, params)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert [g["finish"] for g in got] == [w["finish"] for w in want]
    assert stats.rows > rows  # each kind alone: tests/test_speculative_rows.py


def test_speculative_options_are_checked(tiny_qwen3_dir):
    with pytest.raises(Exception, match="speculative"):
        LLM(str(tiny_qwen3_dir), speculative="medusa")
    with pytest.raises(Exception, match="num_speculative_tokens"):
        LLM(str(tiny_qwen3_dir), speculative="ngram", num_speculative_tokens=0)


def test_a_large_step_speculates_only_while_acceptance_is_good():
    from nano_qwen3_mlx.engine.scheduler import ScheduledBatch
    from nano_qwen3_mlx.engine.sequence import Sequence

    spec, batch = Speculator(4), ScheduledBatch()
    for i in range(5):  # five decode rows: above the small-batch size
        seq = Sequence(i, f"r{i}", [1, 2, 3, 1, 2], SamplingParams())
        seq.num_computed_tokens = 4  # its last token is this step's one
        batch.add(seq, 1)
    assert spec.wants(batch)
    spec.rate = 0.1  # drafts have mostly been rejected lately
    tries = [spec.wants(batch) for _ in range(64)]
    assert tries.count(True) == 2 and tries.index(True) == 31  # a probe every 32 steps
    small = ScheduledBatch(seqs=batch.seqs[:4], num_new_tokens=[1] * 4, samples=[True] * 4)
    assert spec.wants(small)  # few rows: each sequence's own rate decides
