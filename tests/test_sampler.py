"""Batched sampler: masks (top-k / top-p / min-p), biases, penalties, seeds, logprobs.

Many draws are taken at once by repeating one logits row over a large batch of unseeded
sequences, so each hypothesis example checks hundreds of samples in a single call.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.engine.sampler import Sampler
from nano_qwen3_mlx.engine.sequence import Sequence
from nano_qwen3_mlx.sampling_params import SamplingParams

EOS = 3
DRAWS = 256
_ids = itertools.count()

SEEDS = st.integers(0, 2**32 - 1)
VOCABS = st.integers(64, 1000)
TEMPERATURES = st.floats(0.3, 2.0)
FAST = settings(max_examples=25, deadline=None)


def make_seq(
    params: SamplingParams, token_ids: list[int] | None = None, num_prompt_tokens: int = 0
) -> Sequence:
    seq_id, tokens = next(_ids), [5, 6, 7] if token_ids is None else token_ids
    return Sequence(
        seq_id, f"req-{seq_id}", list(tokens), params, num_prompt_tokens=num_prompt_tokens
    )


def random_logits(seed: int, rows: int, vocab: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def sample_many(logits_row: np.ndarray, params: SamplingParams, n: int = DRAWS) -> np.ndarray:
    """``n`` independent draws for one logits row (one unseeded sequence per draw)."""
    sampler = Sampler([EOS])
    batch = mx.array(np.repeat(logits_row[None], n, axis=0))
    out = sampler(batch, [make_seq(params) for _ in range(n)])
    return np.array(out.token_ids)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


# ---- greedy -----------------------------------------------------------------------------
@FAST
@given(seed=SEEDS, vocab=VOCABS, rows=st.integers(1, 8))
def test_greedy_rows_are_argmax(seed, vocab, rows):
    """temperature=0 picks the argmax of each row."""
    logits = random_logits(seed, rows, vocab)
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(rows)]
    out = Sampler([EOS])(mx.array(logits), seqs)
    assert np.array(out.token_ids).tolist() == logits.argmax(-1).tolist()


@FAST
@given(seed=SEEDS, vocab=VOCABS, pattern=st.lists(st.booleans(), min_size=2, max_size=8))
def test_mixed_batch_keeps_greedy_rows_exact(seed, vocab, pattern):
    """Greedy rows stay argmax when batched with sampled rows (with filters and seeds)."""
    logits = random_logits(seed, len(pattern), vocab)
    sampled = SamplingParams(temperature=1.5, top_k=10, top_p=0.9, seed=seed)
    seqs = [make_seq(SamplingParams(temperature=0) if g else sampled) for g in pattern]
    ids = np.array(Sampler([EOS])(mx.array(logits), seqs).token_ids)
    for row, is_greedy in enumerate(pattern):
        if is_greedy:
            assert ids[row] == logits[row].argmax()


# ---- masks ------------------------------------------------------------------------------
@FAST
@given(seed=SEEDS, vocab=VOCABS, k=st.integers(1, 20), temperature=TEMPERATURES)
def test_top_k_never_samples_outside_top_k(seed, vocab, k, temperature):
    """Every draw with top_k=k is one of the k largest logits."""
    row = random_logits(seed, 1, vocab, scale=0.5)[0]  # flat, so the tail would be hit
    top = set(np.argsort(-row)[:k].tolist())
    ids = sample_many(row, SamplingParams(temperature=temperature, top_k=k))
    assert set(ids.tolist()) <= top


@FAST
@given(seed=SEEDS, vocab=VOCABS, top_p=st.floats(0.05, 0.95), temperature=TEMPERATURES)
def test_top_p_never_samples_outside_the_nucleus(seed, vocab, top_p, temperature):
    """Draws lie in the smallest prefix of sorted tokens whose mass reaches top_p."""
    row = random_logits(seed, 1, vocab, scale=2.0)[0]
    probs = softmax(row / temperature)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < top_p + 1e-5].tolist())  # tolerance for float32 sums
    ids = sample_many(row, SamplingParams(temperature=temperature, top_p=top_p))
    assert set(ids.tolist()) <= nucleus


@FAST
@given(seed=SEEDS, vocab=VOCABS, min_p=st.floats(0.01, 0.9), temperature=TEMPERATURES)
def test_min_p_masks_tokens_below_min_p_times_max(seed, vocab, min_p, temperature):
    """No draw has probability below min_p times the most likely token's probability."""
    row = random_logits(seed, 1, vocab, scale=1.5)[0]
    probs = softmax(row / temperature)
    allowed = set(np.flatnonzero(probs >= min_p * probs.max() * (1 - 1e-5)).tolist())
    ids = sample_many(row, SamplingParams(temperature=temperature, min_p=min_p))
    assert set(ids.tolist()) <= allowed


def test_sampled_rows_do_explore():
    """Sanity check for the mask tests: unfiltered sampling over flat logits varies."""
    ids = sample_many(np.zeros(64, np.float32), SamplingParams(temperature=1.0))
    assert len(set(ids.tolist())) > 20


def test_unfiltered_row_is_not_masked_by_a_filtered_neighbour():
    """A row without top-k/top-p keeps every token even when batched with a top-k row."""
    logits = mx.array(random_logits(0, 2, 1000, scale=10.0))
    seqs = [make_seq(SamplingParams(top_k=5)), make_seq(SamplingParams())]
    filtered = Sampler([EOS])._filter(logits, seqs)
    assert not mx.any(mx.isinf(filtered[1])).item()


# ---- biases and penalties -----------------------------------------------------------------
@FAST
@given(seed=SEEDS, vocab=VOCABS, data=st.data())
def test_huge_logit_bias_forces_the_token(seed, vocab, data):
    """A +1e9 logit bias makes that token the only outcome, greedy or sampled."""
    token = data.draw(st.integers(0, vocab - 1))
    temperature = data.draw(st.sampled_from([0.0, 0.7, 2.0]))
    row = random_logits(seed, 1, vocab)[0]
    params = SamplingParams(temperature=temperature, top_p=0.9, logit_bias={token: 1e9})
    assert set(sample_many(row, params, n=32).tolist()) == {token}


def penalized_reference(
    row: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams
) -> np.ndarray:
    """vLLM's penalties on one row: repetition over prompt+output, presence and frequency
    over output only."""
    out = row.astype(np.float64).copy()
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed=SEEDS,
    prompt=st.lists(st.integers(0, 19), min_size=1, max_size=8),
    output=st.lists(st.integers(0, 19), max_size=8),
    repetition=st.floats(0.5, 2.0),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
)
def test_penalties_match_vllm_reference(seed, prompt, output, repetition, presence, frequency):
    """With a 20-token vocabulary, top-20 logprobs show the whole processed distribution."""
    row = random_logits(seed, 1, 20)[0]
    params = SamplingParams(
        temperature=0, repetition_penalty=repetition, presence_penalty=presence,
        frequency_penalty=frequency, logprobs=20,
    )
    seq = make_seq(params, prompt + output, num_prompt_tokens=len(prompt))
    out = Sampler([EOS])(mx.array(row[None]), [seq])
    expected = log_softmax(penalized_reference(row, prompt, output, params))
    got = np.full(20, np.nan)
    got[np.array(out.top_ids[0])] = np.array(out.top_logprobs[0])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert int(out.token_ids[0]) == int(np.argmax(expected))


# ---- seeds ------------------------------------------------------------------------------
def seeded_run(
    seed: int, logits: np.ndarray, position: int, batch: int, steps: int = 8
) -> list[int]:
    """Tokens drawn for one seeded sequence over ``steps`` steps at ``position`` in a batch."""
    sampler = Sampler([EOS])
    seeded = make_seq(SamplingParams(temperature=1.0, seed=seed))
    tokens = []
    for _ in range(steps):
        seqs = [make_seq(SamplingParams(temperature=1.0)) for _ in range(batch)]
        seqs[position] = seeded
        out = sampler(mx.array(np.repeat(logits[None], batch, axis=0)), seqs)
        tokens.append(int(out.token_ids[position]))
    return tokens


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS, position=st.integers(0, 3))
def test_same_seed_same_tokens_whatever_the_batch(seed, position):
    """A seeded row draws the same tokens alone and at any position in a batch of four."""
    logits = np.zeros(500, np.float32)  # flat: every draw is decided by the noise
    alone = seeded_run(seed, logits, 0, 1)
    mx.random.seed(seed + 1)  # the global generator must not matter
    assert seeded_run(seed, logits, position, 4) == alone


def test_different_seeds_give_different_tokens():
    """Two seeds over flat logits (almost surely) draw different token streams."""
    logits = np.zeros(1000, np.float32)
    runs = {tuple(seeded_run(seed, logits, 0, 1)) for seed in range(5)}
    assert len(runs) == 5


# ---- logprobs ---------------------------------------------------------------------------
@FAST
@given(seed=SEEDS, vocab=VOCABS, n=st.integers(0, 20), temperature=st.sampled_from([0.0, 1.0]))
def test_logprobs_are_log_softmax_of_processed_logits(seed, vocab, n, temperature):
    """The chosen token's logprob and the top-n list come from log_softmax of the logits
    after logit_bias; top-n is sorted descending and exactly the n best tokens."""
    row = random_logits(seed, 1, vocab)[0]
    bias = {1: 2.5, 2: -4.0}
    params = SamplingParams(temperature=temperature, logprobs=n, logit_bias=bias)
    out = Sampler([EOS])(mx.array(row[None]), [make_seq(params)])
    processed = row.astype(np.float64).copy()
    for token, b in bias.items():
        processed[token] += b
    expected = log_softmax(processed)
    chosen = int(out.token_ids[0])
    assert float(out.logprobs[0]) == pytest.approx(expected[chosen], abs=1e-4)
    if n == 0:
        assert out.top_ids is None
        return
    top_ids, top_lps = np.array(out.top_ids[0]), np.array(out.top_logprobs[0])
    assert top_ids.shape == (n,)
    assert np.all(np.diff(top_lps) <= 0)
    assert set(top_ids.tolist()) == set(np.argsort(-expected)[:n].tolist())
    np.testing.assert_allclose(top_lps, expected[top_ids], atol=1e-4)


def test_logprobs_per_row_n_in_a_batch():
    """Rows asking for fewer top logprobs get their own best tokens first in a wider array."""
    logits = random_logits(7, 3, 128)
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=n)) for n in (2, 5, None)]
    out = Sampler([EOS])(mx.array(logits), seqs)
    assert out.top_ids.shape == (3, 5)
    for row, n in ((0, 2), (1, 5)):
        assert np.array(out.top_ids[row, :n]).tolist() == np.argsort(-logits[row])[:n].tolist()


# ---- min_tokens -------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_blocks_eos_until_reached(temperature):
    """EOS ids are never sampled before min_tokens completion tokens, and allowed after."""
    eos_ids = [3, 9]
    row = np.full(64, -30.0, np.float32)
    row[eos_ids] = 50.0  # EOS would win every time unless its logit is removed entirely
    sampler = Sampler(eos_ids)
    params = SamplingParams(temperature=temperature, min_tokens=2)
    early = [make_seq(params, [1, 2, 4], num_prompt_tokens=2) for _ in range(DRAWS)]
    out = sampler(mx.array(np.repeat(row[None], DRAWS, axis=0)), early)
    assert not set(np.array(out.token_ids).tolist()) & set(eos_ids)
    done = make_seq(params, [1, 2, 4, 5], num_prompt_tokens=2)
    assert int(sampler(mx.array(row[None]), [done]).token_ids[0]) in eos_ids


def test_top_p_runs_on_renormalised_top_k():
    """With top_k and top_p together the nucleus is taken within the top-k (vLLM order)."""
    logits = mx.log(mx.array([[0.4, 0.3, 0.2, 0.1]]))
    seq = Sequence(0, "0", [1], SamplingParams(top_k=2, top_p=0.5))
    kept = Sampler([])._filter(logits, [seq])
    # top-2 renormalised: 0.571, 0.429 -> the nucleus at p=0.5 is the first token only
    assert np.isfinite(np.array(kept[0])).tolist() == [True, False, False, False]
