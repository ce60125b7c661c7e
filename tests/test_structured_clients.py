"""Real structured-output clients against ``nano-qwen3 serve`` with the demo model
(SmolLM2-135M, whose chat template has no tools section): openai ``.parse``, LangChain
``with_structured_output`` (json_schema and function_calling) and instructor ``Mode.TOOLS``
all return a validated object."""

from __future__ import annotations

import instructor
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.test_openai_client import _start_server

pytestmark = pytest.mark.slow
ASK = [{"role": "user", "content": "Alice is 30 years old. Extract her name and age."}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    proc, url = _start_server(smollm2_gguf)
    try:
        yield f"{url}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_parse(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Person,
                                               temperature=0, max_tokens=60)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("method", [None, "function_calling"])
def test_langchain_with_structured_output(server, method):
    llm = ChatOpenAI(model="tiny", base_url=server, api_key="unused", temperature=0,
                     max_tokens=60, max_retries=0)
    kwargs = {"method": method} if method else {}
    person = llm.with_structured_output(Person, **kwargs).invoke(ASK)
    assert isinstance(person, Person)


def test_instructor_tools_mode(server):
    client = instructor.from_openai(openai.OpenAI(base_url=server, api_key="unused", max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    person = client.chat.completions.create(model="tiny", messages=ASK, response_model=Person,
                                            temperature=0, max_tokens=60, max_retries=0)
    assert isinstance(person, Person)
