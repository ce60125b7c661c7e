"""What the load test sends: its configuration and the random good and malformed requests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum "
         "strange songs about rivers mountains tea bread clocks and distant stars").split()


@dataclass
class LoadConfig:
    """The load's size and mix (every field is a ``--flag`` of ``loadtest.py``)."""

    requests: int = 100
    clients: int = 8
    duration: float = 60.0
    max_tokens: int = 32
    max_prompt_words: int = 48
    stream_share: float = 0.5
    disconnect_share: float = 0.15
    bad_share: float = 0.15
    request_timeout: float = 60.0
    settle_s: float = 15.0
    memory_tolerance_mb: float = 64.0
    api_key: str | None = None
    seed: int = 0


@dataclass
class Job:
    """One request to send and what to expect of it."""

    kind: str  # chat | completion | bad
    body: Any  # dict, or raw bytes for bad JSON
    stream: bool = False
    drop_after: int | None = None  # SSE events to read before disconnecting
    path: str = "/v1/chat/completions"
    expect: tuple[int, ...] = ()  # statuses a bad request may get


def _prompt(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def make_job(rng: random.Random, cfg: LoadConfig, max_model_len: int) -> Job:
    """A random request: malformed, dropped mid-stream or plain, as the shares say."""
    roll = rng.random()
    if roll < cfg.bad_share:
        return _bad_job(rng, max_model_len)
    max_words = max(1, min(cfg.max_prompt_words, max_model_len // 6))
    params = {"max_tokens": rng.randint(1, cfg.max_tokens),
              "temperature": rng.choice([0, 0, 0.7, 1.0]), "seed": rng.randrange(1000)}
    if rng.random() < 0.1:
        params["n"] = 2
    disconnect = roll < cfg.bad_share + cfg.disconnect_share
    stream = disconnect or rng.random() < cfg.stream_share
    if stream:
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    drop = rng.randint(1, max(1, params["max_tokens"])) if disconnect else None
    if disconnect:
        params["max_tokens"] = max(params["max_tokens"], 8)
        params["ignore_eos"] = True  # long enough that the drop lands mid-stream
    if rng.random() < 0.5:
        body = {"messages": [{"role": "user", "content": _prompt(rng, max_words)}], **params}
        return Job("chat", body, stream, drop)
    body = {"prompt": _prompt(rng, max_words), **params}
    return Job("completion", body, stream, drop, path="/v1/completions")


def _bad_job(rng: random.Random, max_model_len: int) -> Job:
    chat, comp = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "hi"}]
    choices = [
        (chat, b'{"messages": [{"role": "user", "content": "hi"}', (400,)),  # truncated JSON
        (chat, b"\xff\xfe\x00garbage", (400,)),  # not UTF-8
        (chat, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', (400,)),
        (chat, {"messages": "hi", "max_tokens": "10"}, (400,)),  # wrong types
        (chat, {"messages": user, "temperature": -1}, (400,)),
        (chat, {"messages": []}, (400,)),
        (chat, {"messages": user, "max_tokens": 10**12}, (400,)),
        (chat, {"model": "gpt-4-unknown", "messages": user}, (404,)),
        (comp, {"prompt": "hello " * (max_model_len + 8), "max_tokens": 4}, (400,)),  # too long
        (comp, {"prompt": [10**9]}, (400,)),
        (comp, {"prompt": "x", "n": 0}, (400,)),
        (comp, [1, 2, 3], (400,)),
    ]
    path, body, expect = rng.choice(choices)
    return Job("bad", body, path=path, expect=expect)
