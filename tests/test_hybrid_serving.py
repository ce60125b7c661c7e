"""The hybrid models (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) end to end: the real model code on
the real engine (packed steps, state pool, snapshots) against mlx-lm, and the server with the
real ``openai`` and ``anthropic`` clients on a Qwen3.5-style checkpoint (XML tool calls,
thinking opened by the template)."""

from __future__ import annotations

import json
import time
import urllib.request

import anthropic  # dev dependencies: a missing client must fail, not skip
import jsonschema
import mlx.core as mx
import openai
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step

from nano_qwen3_mlx import LLM, SamplingParams
from tests.checkpoints import write_hybrid_checkpoint
from tests.qwen35_template import QWEN35_TEMPLATE
from tests.test_openai_client import serving

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# Three prompts of different lengths: with a 64-token step budget they prefill over several
# packed steps, beside each other's chunks and decodes.
PROMPTS = [list(range(1000, 1150)), list(range(3000, 3040)), list(range(5000, 5090))]


def with_template(path):
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN35_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def hybrid_dir(request, tmp_path_factory, qwen_tokenizer_dir):
    path = tmp_path_factory.mktemp(request.param)
    return write_hybrid_checkpoint(path, qwen_tokenizer_dir, family=request.param, layout="hf")


def mlx_lm_greedy(path, prompt: list[int], n: int) -> list[int]:
    model, _ = mlx_lm_load(str(path))
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(token) for (token, _), _ in zip(steps, range(n))]


def test_engine_greedy_equals_mlx_lm_batched_and_alone(hybrid_dir):
    with LLM(str(hybrid_dir), max_num_batched_tokens=64) as llm:
        batched = [r["token_ids"] for r in llm.generate(PROMPTS, GREEDY)]
        stats = llm.get_stats()
    assert stats["state_cache"]["slots_used"] == 0  # every slot back after the batch
    for prompt, tokens in zip(PROMPTS, batched):
        assert tokens == mlx_lm_greedy(hybrid_dir, prompt, 12)


def test_a_prefix_hit_resumes_from_a_snapshot_and_equals_a_cold_run(hybrid_dir):
    shared = list(range(2000, 2300))
    first, second = shared + [7, 8, 9], shared + list(range(400, 460))
    with LLM(str(hybrid_dir), state_snapshot_interval=64) as cold:
        expected = cold.generate([second], GREEDY)[0]["token_ids"]
    with LLM(str(hybrid_dir), state_snapshot_interval=64) as llm:
        llm.generate([first], GREEDY)
        before = llm.get_stats()["tokens"]["prefill_computed"]
        result = llm.generate([second], GREEDY)[0]
        computed = llm.get_stats()["tokens"]["prefill_computed"] - before
    assert result["token_ids"] == expected
    # Reused to within one snapshot interval of the 300 shared tokens.
    assert len(second) - 300 <= computed <= len(second) - 300 + 64


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"enum": ["Paris", "Rome"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                         "parameters": SCHEMA}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen_tokenizer_dir):
    path = write_hybrid_checkpoint(tmp_path_factory.mktemp("qwen35-server"), qwen_tokenizer_dir)
    with serving(with_template(path)) as url:
        yield url


def idle_stats(url: str) -> dict:
    """``/stats`` once nothing runs (it refreshes lazily)."""
    for _ in range(100):
        with urllib.request.urlopen(f"{url}/stats") as resp:
            stats = json.load(resp)
        if not stats["requests"]["running"] and not stats["kv_cache"]["num_used_blocks"]:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


@pytest.mark.slow
def test_openai_client_on_a_hybrid_model(server):
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    reply = oai.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8
    # The template opened <think>: everything so far is reasoning, split off as such.
    assert reply.choices[0].message.model_extra["reasoning_content"]
    stream = oai.chat.completions.create(model="tiny", messages=USER, max_tokens=8,
                                         temperature=0, stream=True)
    assert sum(1 for chunk in stream if chunk.choices) >= 8
    forced = oai.chat.completions.create(
        model="tiny", messages=USER, tools=[TOOL], tool_choice="required", max_tokens=80,
        temperature=0, parallel_tool_calls=False,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    (call,) = forced.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMA)
    assert type(args["days"]) is int  # typed by the schema, not left a string
    parsed = oai.chat.completions.create(
        model="tiny", messages=USER, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    jsonschema.validate(json.loads(parsed.choices[0].message.content), SCHEMA)
    vectors = oai.embeddings.create(model="tiny", input=["a text", "another text"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64
    state = idle_stats(server)["state_cache"]
    assert state["slots_used"] == 0 and state["snapshots"] > 0  # no slot leaked; prefixes kept


@pytest.mark.slow
def test_anthropic_client_on_a_hybrid_model(server):
    claude = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    msg = claude.messages.create(model="tiny", max_tokens=8, messages=USER,
                                 extra_body={"temperature": 0})
    assert msg.usage.output_tokens == 8
    tool = {"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}
    forced = claude.messages.create(model="tiny", max_tokens=80, messages=USER, tools=[tool],
                                    tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                    extra_body={"temperature": 0})
    assert forced.stop_reason == "tool_use"
    jsonschema.validate(forced.content[-1].input, SCHEMA)


def test_a_shared_system_message_is_reused_to_its_end(hybrid_dir):
    """Clients that share only a system prompt (shorter than a snapshot interval) resume
    after it: the state is snapshotted where the prompt's second message starts."""
    system = "<|im_start|>system\n" + "You are a terse assistant. " * 12 + "<|im_end|>\n"
    prompts = [f"{system}<|im_start|>user\nquestion {k}<|im_end|>\n<|im_start|>assistant\n"
               for k in ("one", "two")]
    with LLM(str(hybrid_dir)) as llm:
        system_tokens = len(llm.engine.tokenizer.encode(system))
        assert system_tokens < llm.engine.config.state_snapshot_interval
        first = llm.generate([prompts[0]], GREEDY)[0]
        before = llm.get_stats()["tokens"]["prefill_computed"]
        second = llm.generate([prompts[1]], GREEDY)[0]
        computed = llm.get_stats()["tokens"]["prefill_computed"] - before
    assert computed == second["usage"]["prompt_tokens"] - system_tokens
    assert first["usage"]["prompt_tokens"] == second["usage"]["prompt_tokens"]
