"""Tokenizer tests: transformers is the oracle for chat templates and encode/decode."""

from __future__ import annotations

import codecs
import json
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nano_qwen3_mlx.tokenizer import CHATML_TEMPLATE, StopMatcher, Tokenizer

IM_END, ENDOFTEXT = 151645, 151643
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather <now> & later",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
CHATS = {
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour. 你好 😀"},
    ],
    "thinking_history": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ],
    "tool_calls": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'},
                },
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 24}'},
        {"role": "assistant", "content": "Paris 21°C, Nice 24°C."},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen_tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture
def tok_dir_copy(qwen_tokenizer_dir: Path, tmp_path: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_tokenizer_dir / name, tmp_path / name)
    return tmp_path


# ---- chat template ------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("extra", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_template_matches_transformers(
    tok, hf_tok, chat, add_generation_prompt, extra, with_tools
):
    messages, tools = CHATS[chat], [WEATHER_TOOL] if with_tools else None
    ours = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra
    )
    theirs = hf_tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
    )
    assert ours == theirs


def test_chat_template_tokenize_matches_transformers(tok, hf_tok):
    messages = CHATS["tool_calls"]
    ours = tok.apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=True, enable_thinking=False
    )
    theirs = hf_tok.apply_chat_template(
        messages,
        tools=[WEATHER_TOOL],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        enable_thinking=False,
    )
    assert ours == list(theirs)
    assert ours[-1] != IM_END and IM_END in ours


def test_content_parts_are_joined(tok):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(
        [{"role": "user", "content": "a\nb"}]
    )
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
        )


def test_null_content_on_tool_call_turn_renders_like_empty(tok):
    with_none = [dict(m, content=None) if m.get("tool_calls") else m for m in CHATS["tool_calls"]]
    assert tok.apply_chat_template(with_none) == tok.apply_chat_template(CHATS["tool_calls"])


def test_template_raise_exception_is_value_error(qwen_tokenizer_dir):
    backend = Tokenizer.from_pretrained(qwen_tokenizer_dir).backend
    tok = Tokenizer(backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ValueError, match="no system role"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_default_chatml_template(qwen_tokenizer_dir):
    tok = Tokenizer(Tokenizer.from_pretrained(qwen_tokenizer_dir).backend)
    assert not tok.has_chat_template and tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_jinja_file_wins(tok_dir_copy):
    (tok_dir_copy / "chat_template.jinja").write_text(
        "{{ messages[0]['content'] | tojson }}{{ bos_token }}"
    )
    tok = Tokenizer.from_pretrained(tok_dir_copy)
    assert tok.has_chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "<é>"}]) == '"<é>"'  # no bos: None


# ---- encode / decode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!  two  spaces\n",
        "你好，世界。日本語のテキスト",
        "emoji 😀👨‍👩‍👧 ok",
        "<|im_start|>user\nx<|im_end|>",
    ],
)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 151669
    assert tok.bos_token_id is None and tok.pad_token_id == ENDOFTEXT
    assert tok.token_to_str(tok.encode(" hello")[0]) == " hello"
    assert tok.token_to_str(IM_END) == "<|im_end|>"


def test_add_bos_token(qwen_tokenizer_dir):
    backend = Tokenizer.from_pretrained(qwen_tokenizer_dir).backend
    tok = Tokenizer(backend, bos_token="<|endoftext|>", add_bos_token=True)
    assert tok.encode("hi")[0] == ENDOFTEXT
    assert tok.encode("hi", add_special_tokens=False)[0] != ENDOFTEXT
    assert tok.encode("<|endoftext|>hi").count(ENDOFTEXT) == 1  # no double BOS


# ---- EOS ids and loading errors -------------------------------------------------------------------


def test_eos_from_tokenizer_config(tok):
    assert tok.eos_token_ids == [IM_END]


def test_eos_union_with_config_files(tok_dir_copy):
    (tok_dir_copy / "config.json").write_text(json.dumps({"eos_token_id": ENDOFTEXT}))
    (tok_dir_copy / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [IM_END, ENDOFTEXT, 7]})
    )
    assert Tokenizer.from_pretrained(tok_dir_copy).eos_token_ids == [IM_END, ENDOFTEXT, 7]


def test_missing_dir_names_file(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer\.json") as err:
        Tokenizer.from_pretrained(tmp_path / "nope")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
def test_corrupt_file_names_file(tok_dir_copy, name):
    (tok_dir_copy / name).write_text('{"model": ')
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as err:
        Tokenizer.from_pretrained(tok_dir_copy)
    assert "\n" not in str(err.value)


# ---- incremental detokenizer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tricky_ids(tok) -> list[int]:
    """Single-byte tokens (split multi-byte chars) plus ids of CJK/emoji text and special tokens."""
    byte_ids = [i for t, i in tok.backend.get_vocab().items() if len(t) == 1]
    text_ids = tok.encode("你好世界 😀🎉👨‍👩‍👧 naïve café 日本語 Ελληνικά <think>\n</think>")
    return sorted(set(byte_ids + text_ids + [IM_END, ENDOFTEXT]))


def test_detokenizer_emoji_split_across_tokens(tok):
    ids = tok.encode("a😀b")
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.finalize() == "a😀b"
    assert "\ufffd" not in "".join(pieces)


def test_detokenizer_window_stays_small(tok):
    # O(1) per token: only the tokens since the previous piece are re-decoded.
    ids = tok.encode("streaming 😀 text, 你好. " * 200) + [IM_END] * 50
    detok = tok.detokenizer(skip_special_tokens=True)
    out = ""
    for i in ids:
        out += detok.add(i)
        assert len(detok._ids) <= 8
    assert out + detok.finalize() == tok.decode(ids, skip_special_tokens=True)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), skip=st.booleans())
def test_detokenizer_matches_full_decode(tok, tricky_ids, data, skip):
    token = st.one_of(st.sampled_from(tricky_ids), st.integers(0, tok.vocab_size - 1))
    ids = data.draw(st.lists(token, max_size=40), label="ids")
    full = tok.decode(ids, skip_special_tokens=skip)
    detok, out, fed = tok.detokenizer(skip_special_tokens=skip), "", 0
    while fed < len(ids):
        n = data.draw(st.integers(1, 4), label="chunk")
        out += detok.add(ids[fed : fed + n] if n > 1 else ids[fed])
        fed = min(fed + n, len(ids))
        assert full.startswith(out)  # nothing emitted is ever replaced later (no premature U+FFFD)
        so_far = tok.decode(ids[:fed], skip_special_tokens=skip)
        if not so_far.endswith("\ufffd"):
            assert out == so_far  # nothing is held back without need
    # The end drops a character cut before its last byte (one U+FFFD), nothing else.
    cut = full.endswith("\ufffd") and tok.ends_mid_character(ids)
    assert out + detok.finalize() == (full[:-1] if cut else full)


def _utf8_prefix(data: bytes) -> str:
    """Reference: the text of ``data`` less an incomplete character at its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(data, final=False)


def test_detokenizer_drops_a_character_cut_at_the_end(tok):
    ids = tok.encode("ok 🎉")  # the emoji spans three byte-level tokens
    assert [tok.token_bytes(i) for i in ids] == [b"ok", b" \xf0\x9f", b"\x8e", b"\x89"]
    for cut, expected in ((2, "ok "), (3, "ok "), (4, "ok 🎉")):
        detok = tok.detokenizer()
        streamed = "".join(detok.add(i) for i in ids[:cut])
        assert streamed + detok.finalize() == expected


def test_detokenizer_keeps_a_replacement_char_the_model_wrote(tok):
    for text in ("x\ufffd", "\ufffd", "a\ufffd\ufffd"):
        ids = tok.encode(text)
        detok = tok.detokenizer()
        streamed = "".join(detok.add(i) for i in ids)
        assert streamed + detok.finalize() == text


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(st.characters(codec="utf-8"), max_size=30), data=st.data())
def test_streamed_text_is_the_reply_cut_at_any_token(tok, text, data):
    """A reply cut after any token (max_tokens): the pieces streamed then the flush make the
    text of the bytes so far, less a cut character; no U+FFFD the text did not have."""
    ids = tok.encode(text)
    cut = data.draw(st.integers(0, len(ids)), label="cut")
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids[:cut]]
    final = "".join(pieces) + detok.finalize()
    assert final == _utf8_prefix(b"".join(tok.token_bytes(i) for i in ids[:cut]))
    assert tok.decode(ids).startswith(final)
    assert ("\ufffd" in final) <= ("\ufffd" in text)


# ---- stop matcher ---------------------------------------------------------------------------------


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Reference: the stop that completes first; on a tie, the longest."""
    for end in range(len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if stop and text[:end].endswith(stop):
                return end - len(stop), stop
    return None


def _feed_in_chunks(
    matcher: StopMatcher, text: str, cuts: list[int], expected: str
) -> tuple[str, str | None]:
    out, matched, bounds = "", None, [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    for a, b in pairwise(bounds):
        piece, matched = matcher.feed(text[a:b])
        out += piece
        assert expected.startswith(out)
    return out, matched


@settings(max_examples=300, deadline=None)
@given(
    text=st.text("abc \n", max_size=30),
    stops=st.lists(st.text("abc \n", min_size=1, max_size=4), min_size=1, max_size=3),
    plant=st.tuples(st.integers(0, 2), st.integers(0, 30)),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matcher_any_split(text, stops, plant, cuts):
    which, pos = plant
    text = text[:pos] + stops[which % len(stops)] + text[pos:]
    start, stop = _first_stop(text, stops)
    matcher = StopMatcher(stops)
    out, matched = _feed_in_chunks(matcher, text, cuts, text[:start])
    assert (out, matched) == (text[:start], stop)
    assert matcher.feed("more") == ("", stop) and matcher.flush() == ""


@settings(max_examples=200, deadline=None)
@given(
    text=st.text("abc \n", max_size=30),
    stops=st.lists(st.text("abcxy", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matcher_without_match_flushes_everything(text, stops, cuts):
    stops = [s + "x" for s in stops]  # 'x' never occurs in text: no match, but partial prefixes do
    matcher = StopMatcher(stops)
    out, matched = _feed_in_chunks(matcher, text, cuts, text)
    assert matched is None and out + matcher.flush() == text


def test_stop_matcher_holds_partial_prefix():
    matcher = StopMatcher(["</s>", ""])
    assert matcher.feed("hi <") == ("hi ", None)
    assert matcher.feed("/") == ("", None)
    assert matcher.feed("x") == ("</x", None)
    assert matcher.feed("ok</") == ("ok", None)
    assert matcher.feed("s>tail") == ("", "</s>")
    assert matcher.matched == "</s>"


def test_reply_cut_by_max_tokens_mid_emoji_ends_clean(tiny_qwen3_dir):
    """Through the engine: a regex forces "ok 🎉🎉" (the first emoji spans three tokens);
    max_tokens cuts it after each token. Streamed and whole replies agree, with no U+FFFD."""
    from nano_qwen3_mlx import LLM, SamplingParams

    expected = ["ok", "ok ", "ok ", "ok 🎉", "ok 🎉🎉"]
    with LLM(str(tiny_qwen3_dir), num_kv_blocks=64) as llm:
        for max_tokens, text in enumerate(expected, start=1):
            params = SamplingParams(regex="ok 🎉🎉", max_tokens=max_tokens, temperature=0)
            streamed = "".join(c["text"] for c in llm.generate_stream("Hi", params))
            assert streamed == llm.generate_single("Hi", params)["generated_text"] == text
