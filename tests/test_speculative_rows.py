"""Speculation on the rows that once decoded one token at a time: grammars and thinking
budgets (drafts checked against the constraint, one mask per sampled position), penalties,
``min_tokens`` and seeds (per-position processing), and hybrid models (the state after each
draft kept in scratch slots, the accepted one copied back). Each gives the tokens it gives
without speculation, batched, and leaks no KV block or state slot."""

from __future__ import annotations

import pytest

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.speculative import MAX_SPEC_ROWS
from tests.test_hybrid_engine import assert_no_leaks
from tests.test_speculative import BIAS, FEW, run

GRAMMAR_PROMPT_TEXT = "ab cd ab cd ab xy ab cd ab"


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from nano_qwen3_mlx.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def engines(tiny_qwen3_dir):
    """Grammars need the model's vocabulary to cover the tokenizer's."""
    opts = dict(num_kv_blocks=96, block_size=4, max_num_seqs=8, device="cpu")
    with LLM(str(tiny_qwen3_dir), **opts) as plain, \
            LLM(str(tiny_qwen3_dir), speculative="ngram", **opts) as spec:
        yield plain, spec


def grammar_case(tokenizer) -> tuple[list[int], dict[int, float]]:
    """A prompt whose n-grams draft both allowed tokens ("ab", " cd") and one the grammar
    below forbids (" xy"), and a bias that makes the model repeat them."""
    prompt = tokenizer.encode(GRAMMAR_PROMPT_TEXT)
    return prompt, {t: 40.0 for t in set(prompt)}


def compare(engines, prompts, params) -> list[dict]:
    """Run with and without speculation; the same tokens, texts and finish reasons. Returns
    the speculating run's outputs; asserts that rows speculated (every row of ``params`` is
    of the kind under test)."""
    plain, spec = engines
    stats = spec.engine.speculator.stats
    rows = stats.rows
    want, got = run(plain, prompts, params), run(spec, prompts, params)
    for g, w in zip(got, want):
        assert (g["tokens"], g["text"], g["finish"]) == (w["tokens"], w["text"], w["finish"])
    assert stats.rows > rows
    assert spec.engine.get_stats()["kv_cache"]["num_used_blocks"] == 0
    return got


def test_walking_drafts_cuts_at_a_forbidden_token_and_leaves_the_matcher(tokenizer):
    from nano_qwen3_mlx.engine.grammar import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, 151936)
    state = compiler.new_state(SamplingParams(regex="(ab| cd)+!"), [1])
    ab, cd, bang = (tokenizer.encode(t)[0] for t in ("ab", " cd", "!"))
    xy = tokenizer.encode(" xy")[0]
    kept, masks, accepting = state.walk_drafts([ab, cd, xy, ab], 151936)
    assert kept == [ab, cd] and masks.shape[0] == 3 and accepting == [False] * 3

    def allowed(row, token):
        return bool((int(row.view("uint32")[token // 32]) >> (token % 32)) & 1)

    assert allowed(masks[0], ab) and allowed(masks[2], bang) and not allowed(masks[2], xy)
    assert not allowed(masks[0], bang)  # "!" needs a word before it
    kept, masks, accepting = state.walk_drafts([cd, bang, ab], 151936)
    assert kept == [cd, bang] and accepting == [False, False, True]  # complete after "!"
    # Rolled back: the sequence's own tokens still start from the grammar's beginning.
    assert state.advance(ab) is False and state.advance(bang) is True and not state.failed


@pytest.mark.parametrize("constraint", [
    {"regex": "(ab| ab| cd)+"},
    {"choice": ["ab cd ab cd ab cd ab cd ab", "ab cd ab xy ab cd ab xy"]},
    {"json_schema": {"type": "object", "properties": {"k": {"type": "string"}}}},
])
def test_greedy_tokens_with_a_grammar_are_the_ones_without_speculation(engines, tokenizer,
                                                                       constraint):
    prompt, bias = grammar_case(tokenizer)
    params = SamplingParams(temperature=0, max_tokens=16, logit_bias=bias, **constraint)
    got = compare(engines, [prompt, prompt[1:], prompt[:-1]], [params] * 3)
    assert all(g["finish"] != "error" for g in got)


def test_greedy_tokens_with_a_thinking_budget_are_the_ones_without_speculation(engines,
                                                                               tokenizer):
    think, close = (tokenizer.backend.token_to_id(t) for t in ("<think>", "</think>"))
    prompt, bias = grammar_case(tokenizer)
    bias = bias | {think: 50.0}  # the model opens a block, thinks the biased words, then must close
    params = SamplingParams(temperature=0, max_tokens=20, logit_bias=bias, ignore_eos=True,
                            thinking_budget=6, grammar_thinking="optional")
    got = compare(engines, [prompt, prompt[2:]], [params] * 2)
    for g in got:  # <think> (biased, so thought too) until the budget forces </think>
        assert g["tokens"][:8] == [think] * 7 + [close] and think not in g["tokens"][8:]


@pytest.mark.parametrize("extra", [
    {"repetition_penalty": 1.3}, {"frequency_penalty": 0.4, "presence_penalty": 0.3},
    {"min_tokens": 9},
])
def test_greedy_tokens_with_penalties_and_min_tokens_are_the_ones_without(engines, extra):
    eos = engines[0].engine.tokenizer.eos_token_ids[0]
    bias = BIAS | ({eos: 45.0} if "min_tokens" in extra else {})  # EOS wins once allowed
    params = SamplingParams(temperature=0, max_tokens=18, logit_bias=bias,
                            ignore_eos="min_tokens" not in extra, **extra)
    got = compare(engines, [FEW * 3, FEW[::-1] * 2, [101, 202, 303, 101, 202]], [params] * 3)
    if "min_tokens" in extra:
        assert all(len(g["tokens"]) == 10 and g["finish"] == "stop" for g in got)


def test_seeded_sampling_gives_the_same_tokens_with_speculation(engines):
    params = [SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, logit_bias=BIAS,
                             seed=s) for s in (1, 2, 3)]
    got = compare(engines, [FEW * 3] * 3, params)
    assert len({tuple(g["tokens"]) for g in got}) == 3


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}


@pytest.mark.slow
def test_sampled_distribution_with_a_grammar_is_the_one_without(tiny_qwen3_dir, tokenizer):
    from tests.test_speculative import _chi2_same

    prompt, bias = grammar_case(tokenizer)
    # T = 4 spreads the choice over the biased words; the grammar forbids " xy" among them.
    params = SamplingParams(temperature=4.0, max_tokens=4, logit_bias=bias,
                            regex="(ab| ab| cd)+", ignore_eos=True)
    opts = dict(num_kv_blocks=160, block_size=4, max_num_seqs=8, device="cpu")
    n = 240
    with LLM(str(tiny_qwen3_dir), **opts) as plain:
        want = [tuple(r["tokens"]) for r in run(plain, [prompt] * n, [params] * n)]
    with LLM(str(tiny_qwen3_dir), speculative="ngram", **opts) as spec:
        got = [tuple(r["tokens"]) for r in run(spec, [prompt] * n, [params] * n)]
        stats = spec.engine.speculator.stats
        assert 0 < stats.accepted < stats.drafted
    xy = tokenizer.encode(" xy")[0]
    assert all(xy not in t for t in got)
    for pos in (1, 2, 3):
        chi2, df = _chi2_same([t[pos] for t in want], [t[pos] for t in got])
        assert chi2 < CHI2_CRIT[df], (pos, chi2, df)


# ---- hybrid models ------------------------------------------------------------------------
HYBRID_PROMPTS = [FEW * 3, [101, 202, 303, 101, 202], [303, 303, 101], FEW[::-1] * 2,
                  list(range(60, 80)) + FEW * 2, list(range(10, 24))]


def hybrid_pair(make, **options):
    plain, spec = make(**options), make(speculative="ngram", num_speculative_tokens=4, **options)
    return plain, spec


def drive_both(plain, spec, prompts, params):
    from tests.test_hybrid_engine import drive

    want, got = drive(plain, prompts, params), drive(spec, prompts, params)
    assert [got[i] for i in range(len(prompts))] == [want[i] for i in range(len(prompts))]
    stats = spec.get_stats()["speculative"]
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]  # accepted and rolled back
    assert_no_leaks(spec)
    return got


@pytest.mark.parametrize("num_kv_blocks", [256, 18])  # 18: preemption mid-generation
def test_toy_hybrid_greedy_tokens_are_the_ones_without_speculation(qwen_tokenizer_dir,
                                                                   num_kv_blocks):
    from tests.toy_hybrid import ToyHybridLM, toy_engine

    model = ToyHybridLM()

    def make(**options):
        return toy_engine(model, qwen_tokenizer_dir, block_size=4, state_snapshot_interval=8,
                          num_kv_blocks=num_kv_blocks, max_num_batched_tokens=16,
                          max_num_seqs=4, device="cpu", **options)

    plain, spec = hybrid_pair(make)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                            logit_bias={t % 256: 40.0 for t in FEW})
    prompts = [[t % 256 for t in p] for p in HYBRID_PROMPTS]
    drive_both(plain, spec, prompts, params)
    if num_kv_blocks == 18:
        assert spec.scheduler.num_preemptions > 0


@pytest.fixture(scope="module")
def qwen3_5_make(tmp_path_factory, qwen_tokenizer_dir):
    """Engines on a tiny random Qwen3.5 checkpoint (Gated DeltaNet + attention, full vocab)."""
    from nano_qwen3_mlx.config import EngineConfig
    from nano_qwen3_mlx.engine.llm_engine import LLMEngine
    from tests.checkpoints import write_hybrid_checkpoint

    path = write_hybrid_checkpoint(tmp_path_factory.mktemp("qwen3_5"), qwen_tokenizer_dir,
                                   "qwen3_5")

    def make(**options):
        return LLMEngine(EngineConfig(model=str(path), block_size=4, state_snapshot_interval=8,
                                      max_num_batched_tokens=16, max_num_seqs=4, device="cpu",
                                      **({"num_kv_blocks": 20} | options)))
    return make


def test_qwen3_5_greedy_tokens_are_the_ones_without_speculation(qwen3_5_make):
    plain, spec = hybrid_pair(qwen3_5_make)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=BIAS)
    drive_both(plain, spec, HYBRID_PROMPTS[:5], params)
    assert spec.scheduler.num_preemptions > 0


def test_qwen3_5_with_a_grammar_gives_the_tokens_without_speculation(qwen3_5_make, tokenizer):
    """Both rollbacks at once: the grammar's matcher and the recurrent state."""
    plain, spec = hybrid_pair(qwen3_5_make, num_kv_blocks=64)
    prompt, bias = grammar_case(tokenizer)
    params = SamplingParams(temperature=0, max_tokens=16, logit_bias=bias, regex="(ab| ab| cd)+")
    got = drive_both(plain, spec, [prompt, prompt[1:], prompt[:-1]], params)
    xy = tokenizer.encode(" xy")[0]
    assert all(xy not in tokens for tokens in got.values())


def test_the_draft_slots_count_in_the_state_pool_cap(qwen_tokenizer_dir):
    from tests.toy_hybrid import ToyHybridLM, toy_engine

    model = ToyHybridLM()
    opts = dict(block_size=4, state_snapshot_interval=8, num_kv_blocks=64, device="cpu")
    plain = toy_engine(model, qwen_tokenizer_dir, **opts)
    spec = toy_engine(model, qwen_tokenizer_dir, speculative="ngram", num_speculative_tokens=3,
                      **opts)
    extra = MAX_SPEC_ROWS * 3
    assert spec.states.cap_slots == plain.states.cap_slots + extra
    assert spec.state_cap_bytes == plain.state_cap_bytes + extra * plain.states.bytes_per_slot


def test_a_failed_speculating_step_gives_back_its_scratch_slots(qwen_tokenizer_dir, monkeypatch):
    from tests.toy_hybrid import ToyHybridLM, toy_engine

    engine = toy_engine(ToyHybridLM(), qwen_tokenizer_dir, speculative="ngram", block_size=4,
                        state_snapshot_interval=8, num_kv_blocks=64, device="cpu")
    real_run, seen = engine.runner.run, {"slots": 0}

    def flaky_run(batch, prev):
        if any(batch.num_drafts):  # the first speculating step: its scratch slots are taken
            seen["slots"] = sum(len(s.draft_slots) for s in batch.seqs)
            raise RuntimeError("injected fault")
        return real_run(batch, prev)

    monkeypatch.setattr(engine.runner, "run", flaky_run)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logit_bias={t % 256: 40.0 for t in FEW})
    engine.add_request([t % 256 for t in FEW * 3], params)
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            finish = out.finish_reason or finish
    assert finish == "error" and seen["slots"] > 0
    assert_no_leaks(engine)


def test_qwen3_5_with_a_draft_model_gives_its_tokens(qwen3_5_make, tiny_qwen3_dir):
    """A hybrid model drafted by an attention-only model of its vocabulary: the draft's KV
    follows the target's block ids, the target's state rolls back to each accepted prefix."""
    plain = qwen3_5_make(num_kv_blocks=256)
    spec = qwen3_5_make(num_kv_blocks=256, speculative="draft", draft_model=str(tiny_qwen3_dir),
                        num_speculative_tokens=3)
    from tests.test_hybrid_engine import drive

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias=BIAS)
    want, got = drive(plain, HYBRID_PROMPTS[:4], params), drive(spec, HYBRID_PROMPTS[:4], params)
    assert got == want
    # A random draft is rejected (it sees no logit_bias): every verification rolls back.
    assert spec.get_stats()["speculative"]["draft_tokens"] > 0
    assert_no_leaks(spec)
