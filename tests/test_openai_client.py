"""The official ``openai`` client against ``nano-qwen3 serve`` in a subprocess on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import openai  # a dev dependency: a missing client must fail, not skip
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def _start_server(model_dir, *extra_args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "NUM_KV_BLOCKS": "256", "MAX_MODEL_LEN": "512"}
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--model", str(model_dir),
           "--port", str(port), "--max-num-seqs", "16", "--served-model-name", "tiny",
           "--log-level", "warning", *extra_args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


@contextlib.contextmanager
def serving(model_dir, *extra_args: str) -> Iterator[str]:
    """``nano-qwen3 serve`` in a subprocess for the block; yields its base URL."""
    proc, url = _start_server(model_dir, *extra_args)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_qwen3_dir):
    with serving(tiny_qwen3_dir) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat(client):
    resp = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens <= 8
    again = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == resp.choices[0].message.content


def test_chat_stream(client):
    kwargs = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
              "temperature": 0, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    full = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions(client):
    resp = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                     temperature=0)
    stream = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == resp.choices[0].text


def test_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_sigterm_lets_in_flight_streams_finish(tiny_qwen3_dir):
    proc, url = _start_server(tiny_qwen3_dir)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="tiny", prompt="Count", max_tokens=48,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
