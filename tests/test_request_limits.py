"""Limits a client meets, through the official SDKs against ``nano-qwen3 serve`` (tiny random
Qwen3, a 64-token context): a 400 names the client's own field and says the limit."""

from __future__ import annotations

import anthropic
import openai
import pytest

from nano_qwen3_mlx import SamplingParams
from nano_qwen3_mlx.errors import InvalidRequestError
from nano_qwen3_mlx.sampling_params import MAX_STOP_SEQUENCES
from tests.test_openai_client import serving

LONG = "word " * 200  # far over the 64-token context
USER = [{"role": "user", "content": "Hi"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tiny_qwen3_dir):
    with serving(tiny_qwen3_dir, "--max-model-len", "64") as url:
        yield url


def _bad_request(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


def test_prompt_over_context_names_each_apis_prompt_field(oai, claude):
    chat = _bad_request(lambda: oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": LONG}], max_tokens=4))
    completion = _bad_request(lambda: oai.completions.create(model="tiny", prompt=LONG,
                                                             max_tokens=4))
    response = _bad_request(lambda: oai.responses.create(model="tiny", input=LONG,
                                                         max_output_tokens=16))
    assert (chat.param, completion.param, response.param) == ("messages", "prompt", "input")
    for err in (chat, completion, response):
        assert "maximum context length is 64" in err.message
    with pytest.raises(anthropic.BadRequestError, match="maximum context length is 64"):
        claude.messages.create(model="tiny", max_tokens=4,
                               messages=[{"role": "user", "content": LONG}])


def test_max_tokens_over_context_names_each_apis_max_tokens_field(oai):
    chat = _bad_request(lambda: oai.chat.completions.create(model="tiny", messages=USER,
                                                            max_tokens=100))
    response = _bad_request(lambda: oai.responses.create(model="tiny", input="Hi",
                                                         max_output_tokens=100))
    assert (chat.param, response.param) == ("max_tokens", "max_output_tokens")


def test_too_many_stop_strings_say_the_limit(oai, claude):
    stops = [f"s{i}" for i in range(1000)]
    said = f"at most {MAX_STOP_SEQUENCES} stop sequences, got 1000"
    errors = [
        _bad_request(lambda: oai.chat.completions.create(model="tiny", messages=USER,
                                                         max_tokens=4, stop=stops)),
        _bad_request(lambda: oai.completions.create(model="tiny", prompt="Hi", max_tokens=4,
                                                    stop=stops)),
        _bad_request(lambda: oai.responses.create(model="tiny", input="Hi",
                                                  max_output_tokens=16,
                                                  extra_body={"stop": stops})),
    ]
    for err in errors:
        assert err.param == "stop" and err.body["message"] == f"stop: {said}"
    with pytest.raises(anthropic.BadRequestError, match=f"stop_sequences: {said}"):
        claude.messages.create(model="tiny", max_tokens=4, messages=USER, stop_sequences=stops)


def test_the_most_stop_strings_are_accepted_everywhere(oai, claude):
    stops = [f"zz{i}" for i in range(MAX_STOP_SEQUENCES)]
    oai.chat.completions.create(model="tiny", messages=USER, max_tokens=2, stop=stops,
                                extra_body=NO_THINK)
    oai.completions.create(model="tiny", prompt="Hi", max_tokens=2, stop=stops)
    oai.responses.create(model="tiny", input="Hi", max_output_tokens=16,
                         extra_body={"stop": stops})
    claude.messages.create(model="tiny", max_tokens=2, messages=USER, stop_sequences=stops)


def test_responses_stop_string_ends_the_reply(oai):
    full = oai.responses.create(model="tiny", input="Hi", max_output_tokens=24,
                                temperature=0, reasoning={"effort": "none"}).output_text
    words = full.split()
    assert len(words) > 2, full
    stop = words[len(words) // 2]
    cut = oai.responses.create(model="tiny", input="Hi", max_output_tokens=24, temperature=0,
                               reasoning={"effort": "none"}, extra_body={"stop": [stop]})
    assert cut.output_text == full[:full.index(stop)]


def test_sampling_params_names_stop_past_the_limit():
    SamplingParams(stop=["x"] * MAX_STOP_SEQUENCES)
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_SEQUENCES} stop sequences, "
                                                  "got 65") as info:
        SamplingParams(stop_sequences=["x"] * 65)
    assert info.value.field == "stop"
