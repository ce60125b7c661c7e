"""Multi-turn prefix reuse: a chat that resends its history prefills only what changed.

Expectations are derived from the token lists, not hard-coded: the previous turn leaves in
the prefix cache the KV of every token it computed (prompt and generated tokens alike: full
blocks by hash, the last partial block too), and a match that ends inside a block is copied
token by token, so turn k+1 recomputes exactly its tokens past what it shares.
"""

from __future__ import annotations

import pytest

from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams

BS = 16
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def expected_computed(prompt: list[int], reusable: int) -> int:
    """Prompt tokens a token-granular prefix cache must run, given ``reusable`` leading
    tokens with KV in the cache (at least one token always runs: its logits are sampled)."""
    return len(prompt) - min(reusable, len(prompt) - 1)


@pytest.fixture()
def llm(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=BS) as llm:
        yield llm


def run(llm: LLM, prompt: list[int], params: SamplingParams = PARAMS) -> tuple[list[int], int, int]:
    """(generated token ids, prompt tokens the engine prefilled for them, the prompt tokens
    its final output says came from the cache)."""
    engine = llm.engine
    before = engine.stats.num_computed_prompt_tokens
    request_id = engine.add_request(prompt, params)
    tokens, cached = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == request_id and out.finish_reason != "error"
            tokens += out.token_ids
            cached = out.num_cached_tokens
    return tokens, engine.stats.num_computed_prompt_tokens - before, cached


def test_continuation_reuses_prompt_and_generated_tokens(llm):
    first = list(range(1000, 1000 + 3 * BS + 5))
    generated, computed, cached = run(llm, first)
    assert computed == len(first) and cached == 0
    second = first + generated + list(range(5000, 5000 + 2 * BS + 3))
    # The last generated token was sampled but never run, so its KV does not exist.
    _, computed, cached = run(llm, second)
    reusable = len(first) + len(generated) - 1
    assert computed == expected_computed(second, reusable) == len(second) - reusable
    assert cached == reusable
    assert reusable % BS  # the reuse ended inside a block: the token-granular part was used


@pytest.mark.parametrize("source", ["full block", "freed partial block"])
def test_prefix_ending_mid_block_computes_only_new_tokens_and_keeps_output(tiny_qwen3_dir, llm, source):
    """The copied KV is right: greedy tokens equal a run without any prefix caching.

    ``full block``: the match ends inside a full block of the first request's prompt.
    ``freed partial block``: it ends inside the first request's last, partial block.
    """
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = [(7 * i) % 1500 + 200 for i in range(2 * BS + 3)]
    generated, _, _ = run(llm, first, params)
    if source == "full block":
        shared = BS + 9
        second = first[:shared] + list(range(3000, 3000 + BS + 4))
    else:  # the finished request's KV ends 2 * BS + 3 + 7 tokens in: its partial block
        shared = len(first) + 5
        second = first + generated[:5] + list(range(3000, 3000 + 9))
        assert shared % BS > len(first) % BS  # inside the partial block, past the prompt
    hits_before = llm.engine.block_manager.num_partial_hits
    tokens, computed, cached = run(llm, second, params)
    assert computed == len(second) - shared and cached == shared
    assert llm.engine.block_manager.num_partial_hits == hits_before + 1
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=BS,
             enable_prefix_caching=False) as plain:
        expected, computed, cached = run(plain, second, params)
    assert computed == len(second) and cached == 0
    assert tokens == expected
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_qwen3_chat_prefills_only_the_new_turn(llm):
    """Qwen3's template drops the (empty) think block of earlier answers from the history,
    so a turn shares the previous prompt up to ``<|im_start|>assistant\\n`` and no more:
    every turn computes exactly the tokens after that, its new turn."""
    tok = llm.engine.tokenizer
    think = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    messages = [{"role": "system", "content": "You are terse. " * 12}]
    seen: list[list[int]] = []  # every earlier prompt and its answer, as the cache saw them
    prev_prompt: list[int] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: " + "why is the sky blue? " * (turn + 3)})
        prompt = tok.apply_chat_template(messages, enable_thinking=False, tokenize=True)
        generated, computed, cached = run(llm, prompt)
        if turn:
            assert prev_prompt[len(prev_prompt) - len(think):] == think
            shared = max(shared_prefix(s, prompt) for s in seen)
            # The template drops the think block (and the answer after it cannot move up);
            # a "\n" may merge with the answer's first characters.
            assert len(prev_prompt) - len(think) - 1 <= shared <= len(prev_prompt) - len(think)
            assert computed == len(prompt) - shared and cached == shared
        else:
            assert computed == len(prompt) and cached == 0
        messages.append({"role": "assistant", "content": tok.decode(generated)})
        seen.append(prompt + generated)
        prev_prompt = prompt


def test_requests_admitted_together_never_copy_a_block_the_step_is_still_writing(tiny_qwen3_dir, llm):
    """Identical prompts of whole blocks in one step: the first one's last block is sealed as
    its chunk is scheduled, but its KV is written after the step's copies, so the others
    must not copy from it (they share whole blocks and compute the rest)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [(11 * i) % 900 + 300 for i in range(3 * BS)]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=BS,
             enable_prefix_caching=False) as plain:
        expected = plain.generate_single(prompt, params)["token_ids"]
    results = llm.generate([prompt] * 3, params)
    assert [r["token_ids"] for r in results] == [expected] * 3
    assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


def test_a_finishing_token_whose_step_was_dropped_is_not_reused(tiny_qwen3_dir, llm):
    """Penalties make the engine read the step in flight before running the next one, which
    drops the row of a sequence that just finished: its stop token never ran. A later prompt
    continuing past it must compute that token, not copy KV that was never written."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.1)
    prompt = [(5 * i) % 700 + 400 for i in range(BS + 3)]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=BS,
             enable_prefix_caching=False) as plain:
        generated = plain.generate_single(prompt, params)["token_ids"]
        stop = next(i for i, t in enumerate(generated) if i >= 3 and t not in generated[:i])
        second = prompt + generated[:stop + 1] + list(range(2000, 2006))
        expected = plain.generate_single(second, params)["token_ids"]
    stopped, _, _ = run(llm, prompt, params.clone(stop_token_ids=[generated[stop]]))
    assert stopped == generated[:stop + 1]
    tokens, computed, cached = run(llm, second, params)
    assert cached == len(prompt) + stop  # everything but the stop token itself
    assert tokens == expected
