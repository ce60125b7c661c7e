"""One grammar from the first generated token: Qwen3's optional thinking block, free inside,
then the structure; thinking budgets; grammars that fail. On the tiny random checkpoint with
the real Qwen3 tokenizer (``<think>`` / ``</think>`` are single tokens), thinking on."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.engine.grammar import thinking_grammar
from nano_qwen3_mlx.parsers import parse_tool_calls
from nano_qwen3_mlx.structured import ToolSpec, tool_call_grammar
from tests.test_grammar import SCHEMAS

OPEN, CLOSE = 151667, 151668
USER = [{"role": "user", "content": "Give me JSON."}]
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_qwen3_dir):
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=1024, block_size=16, max_num_seqs=64) as llm:
        yield llm


def thinking_tokens(token_ids: list[int], opened_in_prompt: bool = False) -> int:
    """Tokens between the block's open (the prompt's, or the first generated) and close."""
    if not opened_in_prompt and OPEN not in token_ids:
        return 0
    start = 0 if opened_in_prompt else token_ids.index(OPEN) + 1
    end = token_ids.index(CLOSE) if CLOSE in token_ids else len(token_ids)
    return end - start


@settings(max_examples=3, deadline=None, phases=[Phase.generate],  # no shrinking: each run is slow
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schemas=st.lists(SCHEMAS, min_size=4, max_size=4), budget=st.integers(0, 6),
       seed=st.integers(0, 1000))
def test_chat_with_thinking_on_answers_the_schema_after_a_bounded_block(llm, schemas, budget, seed):
    # Half the rows are pushed into a thinking block, half kept out of it: both validate.
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=80, json_schema=s,
                             thinking_budget=budget, logit_bias={OPEN: 100.0 if i % 2 else -100.0})
              for i, s in enumerate(schemas)]
    prompt = llm.tokenizer.apply_chat_template(USER, tokenize=True)  # thinking on: no <think> yet
    results = llm.generate([prompt] * 4, params)
    for i, (schema, r) in enumerate(zip(schemas, results)):
        if i % 2:
            assert thinking_tokens(r["token_ids"]) <= budget
        else:
            assert OPEN not in r["token_ids"]
        content = r["generated_text"].split("</think>")[-1].lstrip("\n")
        if r["finish_reason"] == "stop":
            jsonschema.validate(json.loads(content), schema)
        else:  # a random model may fill a big array of objects: max_tokens ends it
            assert r["finish_reason"] == "length" and content[:1] in "{[\"-0123456789tfn"


def test_llm_chat_splits_the_reasoning_and_validates_the_answer(llm):
    params = SamplingParams(temperature=0, max_tokens=40, json_schema=CITY, thinking_budget=3,
                            logit_bias={OPEN: 100.0})
    r = llm.chat(USER, params)
    assert r["reasoning_content"] is not None and r["finish_reason"] == "stop"
    assert json.loads(r["content"])["city"] in ("Paris", "Rome")


def test_prompt_that_opened_think_keeps_the_thinking_free(llm):
    ids = llm.tokenizer.apply_chat_template(USER, tokenize=True)
    ids += llm.tokenizer.encode("<think>\n", add_special_tokens=False)
    free = llm.generate_single(ids, SamplingParams(temperature=0, max_tokens=6))
    forced = llm.generate_single(ids, SamplingParams(temperature=0, max_tokens=60, json_schema=CITY,
                                                     thinking_budget=6))
    # The thinking is exactly what the model writes unconstrained; then the answer validates.
    assert forced["token_ids"][:6] == free["token_ids"] and forced["token_ids"][6] == CLOSE
    assert thinking_tokens(forced["token_ids"], opened_in_prompt=True) == 6
    assert json.loads(forced["generated_text"].split("</think>")[1])["city"] in ("Paris", "Rome")


def test_forced_tool_calls_follow_the_thinking_block(llm):
    grammar = tool_call_grammar(llm.tokenizer, [ToolSpec("get_weather", CITY, strict=True)],
                                parallel=False)
    prompt = llm.tokenizer.apply_chat_template(USER, tokenize=True)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, grammar=grammar,
                             thinking_budget=4, logit_bias={OPEN: 50.0}) for i in range(6)]
    for r in llm.generate([prompt] * 6, params):
        assert r["finish_reason"] == "stop" and thinking_tokens(r["token_ids"]) <= 4
        _, calls = parse_tool_calls(r["generated_text"].split("</think>")[1])
        assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Rome")


@pytest.mark.parametrize("opened", [False, True])
def test_budget_alone_closes_the_thinking_exactly(llm, opened):
    """Budgets 0..8 in one batch (the sampler reads the token in flight only near a budget's
    end): each block holds exactly its budget, then </think>; no block opens once it is spent
    (the bias pushes <think> at every step), so a zero budget outside a block means none."""
    ids = llm.tokenizer.apply_chat_template(USER, tokenize=True)
    if opened:
        ids += llm.tokenizer.encode("<think>\n", add_special_tokens=False)
    params = [SamplingParams(temperature=1.0, seed=5 + b, max_tokens=30, thinking_budget=b,
                             logit_bias={} if opened else {OPEN: 100.0}) for b in range(9)]
    for budget, r in enumerate(llm.generate([ids] * 9, params)):
        assert thinking_tokens(r["token_ids"], opened) == budget
        ids_out = r["token_ids"]
        assert ids_out.count(CLOSE) == (budget > 0 or opened)
        assert OPEN not in (ids_out[ids_out.index(CLOSE) + 1:] if CLOSE in ids_out else ids_out)


def test_thinking_text_never_spells_the_close_tag(llm):
    """Inside the block, ``</think>`` written with ordinary tokens is refused (the reasoning
    split would take it for the close); only the ``</think>`` token closes the block."""
    matcher = llm.engine.grammars._compiled("grammar", thinking_grammar('start: "ok"', OPEN, CLOSE))
    tok = llm.tokenizer.backend
    pieces = [tok.encode(text).ids for text in ("a </", "think", ">")]
    spelt = matcher.deep_copy()
    assert spelt.consume_token(OPEN) and all(spelt.consume_token(t) for t in pieces[0] + pieces[1])
    assert not spelt.consume_token(pieces[2][0])
    closed = matcher.deep_copy()
    assert all(closed.consume_token(t) for t in [OPEN, *pieces[0], *pieces[1], CLOSE])
    assert all(closed.consume_token(t) for t in tok.encode("ok").ids) and closed.is_accepting()


def test_a_grammar_that_cannot_go_on_ends_with_an_error_or_length(llm):
    never = SamplingParams(temperature=0, max_tokens=8, grammar='start: "a" start')
    r = llm.generate_single("Q", never)
    assert r["finish_reason"] == "error" and r["error"].startswith("grammar failed: ")
    r = llm.generate_single("Q", never.clone(max_tokens=1))
    assert r["finish_reason"] == "length"


def test_thinking_mode_follows_the_prompt(llm):
    grammars, tok = llm.engine.grammars, llm.tokenizer
    chat = tok.apply_chat_template(USER, tokenize=True)
    auto = SamplingParams()
    assert grammars.thinking_mode(auto, chat) == "optional"
    assert grammars.thinking_mode(auto, chat + tok.encode("<think>\n")) == "inside"
    assert grammars.thinking_mode(auto, tok.apply_chat_template(
        USER, tokenize=True, enable_thinking=False)) == "none"
    assert grammars.thinking_mode(auto, tok.encode("Q")) == "none"
    assert grammars.thinking_mode(SamplingParams(grammar_thinking="optional"), tok.encode("Q")) \
        == "optional"
