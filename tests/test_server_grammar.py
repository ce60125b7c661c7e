"""Structured output over HTTP on the real AsyncLLM with the tiny random Qwen3 checkpoint:
response_format, guided_* fields, forced tool calls, tools the template cannot render, and
bad schemas (400, the server keeps serving)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app
from nano_qwen3_mlx.server.openai.constraints import with_tools_in_system

pytestmark = pytest.mark.asyncio(loop_scope="module")
USER = [{"role": "user", "content": "Give me a person."}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
NEWLINE = 198  # "\n" in Qwen3's vocabulary
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"enum": ["Paris", "Rome"]}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_qwen3_dir):
    config = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=256, max_num_seqs=16,
                          max_model_len=512)
    async with AsyncLLM(config=config) as llm:
        app = create_app(server_config=ServerConfig(served_model_name="tiny"), engine=llm)
        async with TestClient(TestServer(app)) as client:
            yield client


async def post(client, path: str, body: dict, status: int = 200) -> dict:
    resp = await client.post(path, json=body)
    assert resp.status == status, await resp.text()
    return await resp.json()


async def chat(client, status: int = 200, **body) -> dict:
    body = {"messages": USER, "temperature": 1.0, "seed": 3, "max_tokens": 40, **NO_THINK, **body}
    return await post(client, "/v1/chat/completions", body, status)


async def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON, "strict": True}}
    out = await chat(client, response_format=fmt, n=3)
    for choice in out["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    out = await chat(client, response_format={"type": "json_object"}, max_tokens=60)
    if out["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    else:
        assert out["choices"][0]["message"]["content"].startswith("{")


async def test_with_thinking_on_the_structure_follows_the_thinking_block(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": PERSON}}
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, "response_format": fmt}
    # Thinking on (Qwen3's default). Kept out of the block, the random model answers at once;
    # pushed into it, the budget closes it and the answer still validates.
    out = await post(client, "/v1/chat/completions", {**body, "logit_bias": {"151667": -100}})
    assert out["choices"][0]["message"]["reasoning_content"] is None
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), PERSON)
    out = await post(client, "/v1/chat/completions",
                     {**body, "logit_bias": {"151667": 100}, "thinking_budget": 5})
    assert out["choices"][0]["message"]["reasoning_content"]
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), PERSON)


async def test_completions_guided_fields_and_streaming(client):
    base = {"prompt": "Answer:", "temperature": 1.0, "seed": 1, "max_tokens": 12}
    out = await post(client, "/v1/completions", {**base, "guided_choice": ["yes", "no"]})
    assert out["choices"][0]["text"] in ("yes", "no")
    out = await post(client, "/v1/completions", {**base, "guided_regex": "[0-9]{4}"})
    assert out["choices"][0]["text"].isdigit() and len(out["choices"][0]["text"]) == 4
    lark = 'start: "(" /[a-c]{2}/ ")"'
    out = await post(client, "/v1/completions", {**base, "guided_grammar": lark})
    assert out["choices"][0]["text"][0] == "(" and out["choices"][0]["text"][-1] == ")"
    body = {**base, "max_tokens": 40, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}}
    resp = await client.post("/v1/completions", json=body)
    events = [e[6:] for e in (await resp.text()).split("\n\n") if e.startswith("data: ")]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    jsonschema.validate(json.loads(text), PERSON)


async def test_tool_choice_required_and_named_force_valid_calls(client):
    schemas = {"get_weather": WEATHER, "add": ADD}
    for choice in ("required", {"type": "function", "function": {"name": "add"}}):
        out = await chat(client, tools=[WEATHER, ADD], tool_choice=choice, n=4,
                         parallel_tool_calls=False)
        for c in out["choices"]:
            assert c["finish_reason"] == "tool_calls"
            (call,) = c["message"]["tool_calls"]
            name = call["function"]["name"]
            assert choice == "required" or name == "add"
            params = schemas[name]["function"]["parameters"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), params)


async def test_a_named_tool_choice_is_exactly_one_call(client):
    # OpenAI forces exactly one call of the named function (as vLLM does), also where
    # parallel calls are allowed: the grammar then ends, and so does the reply. The bias
    # makes the model write "\n" (the start of a next call) wherever it may.
    choice = {"type": "function", "function": {"name": "add"}}
    out = await chat(client, tools=[WEATHER, ADD], tool_choice=choice, n=4, max_tokens=300,
                     logit_bias={str(NEWLINE): 100})
    for c in out["choices"]:
        assert c["finish_reason"] == "tool_calls"
        (call,) = c["message"]["tool_calls"]
        assert call["function"]["name"] == "add" and not c["message"]["content"]


async def test_forced_tool_call_streams_as_tool_call_deltas(client):
    body = {"messages": USER, "temperature": 0, "max_tokens": 40, **NO_THINK, "stream": True,
            "tools": [ADD], "tool_choice": "required"}
    resp = await client.post("/v1/chat/completions", json=body)
    events = [json.loads(e[6:]) for e in (await resp.text()).split("\n\n")
              if e.startswith("data: {")]
    calls = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["add"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tools_are_rendered_when_the_template_cannot(client, tiny_qwen3_dir):
    # Qwen3's template renders tools; our fallback must write the same text it does.
    from nano_qwen3_mlx.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_qwen3_dir)
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    tools = [WEATHER, ADD]
    native = tok.apply_chat_template(messages, tools=tools, enable_thinking=False)
    fallback = tok.apply_chat_template(with_tools_in_system(messages, tools), enable_thinking=False)
    assert fallback == native
    plain = Tokenizer(tok.backend, eos_token_ids=tok.eos_token_ids)  # ChatML: no tools section
    assert "get_weather" not in plain.apply_chat_template(messages, tools=tools)
    assert "get_weather" in plain.apply_chat_template(with_tools_in_system(messages, tools))


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}},
     "response_format", "Invalid type: objectx"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be text, json_object or json_schema"),
    ({"guided_regex": "[a-"}, "guided_regex", "invalid regex"),
    ({"guided_json": {"type": "string", "format": "nope"}}, "guided_json", "Unknown format"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one of"),
    ({"tool_choice": "required"}, "tool_choice", "requires `tools`"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
      "tool_choice": "required"}, "tools", "invalid grammar"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
])
async def test_bad_constraints_are_400s_naming_the_problem(client, body, param, message):
    out = await chat(client, status=400, **body)
    assert out["error"]["param"] == param and message in out["error"]["message"]
    out = await chat(client, response_format={"type": "json_object"}, max_tokens=4)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


async def test_grammar_that_cannot_finish_is_length(client):
    out = await post(client, "/v1/completions", {"prompt": "x", "max_tokens": 3,
                                                  "guided_regex": "[0-9]{50}"})
    assert out["choices"][0]["finish_reason"] == "length"


async def test_grammar_that_fails_mid_generation_is_an_error_never_stop(client):
    body = {"prompt": "x", "max_tokens": 8, "guided_grammar": 'start: "a" start'}
    out = await post(client, "/v1/completions", body, status=400)
    assert out["error"]["message"].startswith("grammar failed: ")
    out = await post(client, "/v1/completions", {**body, "max_tokens": 1})
    assert out["choices"][0]["finish_reason"] == "length"
    # It fails on the first token: a stream has sent nothing yet, so it is the same 400.
    out = await post(client, "/v1/completions", {**body, "stream": True}, status=400)
    assert out["error"]["message"].startswith("grammar failed: ")
