"""Multi-turn prefix reuse: a chat that resends its history prefills only what changed.

Expectations are derived from the token lists, not hard-coded: the previous turn leaves in
the prefix cache every full block whose KV it computed (prompt and generated tokens alike),
so turn k+1 recomputes exactly its tokens past the last whole block of what it shares.
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
    """Prompt tokens a block-granular prefix cache must run, given ``reusable`` leading
    tokens with KV in the cache (at least one token always runs: its logits are sampled)."""
    return len(prompt) - min(reusable, len(prompt) - 1) // BS * BS


@pytest.fixture()
def llm(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=256, block_size=BS) as llm:
        yield llm


def run_turn(llm: LLM, prompt: list[int]) -> tuple[list[int], int]:
    """(generated token ids, prompt tokens the engine prefilled for them)."""
    before = llm.engine.stats.num_computed_prompt_tokens
    [result] = llm.generate([prompt], PARAMS)
    return result["token_ids"], llm.engine.stats.num_computed_prompt_tokens - before


def test_continuation_reuses_prompt_and_generated_blocks(llm):
    first = list(range(1000, 1000 + 3 * BS + 5))
    generated, computed = run_turn(llm, first)
    assert computed == len(first)
    second = first + generated + list(range(5000, 5000 + 2 * BS + 3))
    # The last generated token was sampled but never run, so its KV does not exist.
    _, computed = run_turn(llm, second)
    assert computed == expected_computed(second, len(first) + len(generated) - 1)
    assert computed < len(second) - len(first)  # generated tokens' blocks were reused too


def test_qwen3_chat_prefills_only_the_new_turn(llm):
    """Qwen3's template drops the (empty) think block of earlier answers from the history,
    so a turn shares the previous prompt up to ``<|im_start|>assistant\\n`` and no more."""
    tok = llm.engine.tokenizer
    think = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    messages = [{"role": "system", "content": "You are terse. " * 12}]
    prev_prompt: list[int] = []
    prev: list[int] = []  # the previous prompt and its answer's tokens, as the cache saw them
    for turn in range(4):
        messages.append({"role": "user", "content": f"Question {turn}: " + "why is the sky blue? " * (turn + 3)})
        prompt = tok.apply_chat_template(messages, enable_thinking=False, tokenize=True)
        generated, computed = run_turn(llm, prompt)
        shared = shared_prefix(prev, prompt)
        if turn:
            assert prev_prompt[len(prev_prompt) - len(think):] == think
            # The template drops the think block (and the answer after it cannot move up);
            # a "\n" may merge with the answer's first characters.
            assert len(prev_prompt) - len(think) - 1 <= shared <= len(prev_prompt) - len(think)
            assert computed == expected_computed(prompt, shared)
            assert len(prompt) - shared <= computed < len(prompt) - shared + BS
        else:
            assert computed == len(prompt)
        messages.append({"role": "assistant", "content": tok.decode(generated)})
        prev_prompt, prev = prompt, prompt + generated
