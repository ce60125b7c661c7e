"""Chat workloads over HTTP: a multi-turn chat that resends its history, and clients that
share a long system prompt; ``nano-qwen3 serve`` against ``mlx_lm.server`` (prompt cache on).

Both servers run on loopback as subprocesses, one after the other, on the same checkpoint.
Requests are streamed, greedy, thinking off (``enable_thinking=false``: the prompt ends in an
empty ``<think></think>`` and Qwen3's template drops it from the history on the next turn).
Prefill tokens computed per request: ours from ``/stats`` (``tokens.prefill_computed``,
before and after), mlx-lm's from ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .metrics import mean, percentile, ratio
from .servers import free_port, mlx_lm_server_command, running, serve_command

WORDS = ("river stone cloud lamp garden window silver morning quiet engine paper orange "
         "forest signal bridge letter winter candle market harbor").split()
SERVERS = ("ours", "mlx_lm")


@dataclass(slots=True)
class Reply:
    ttft_s: float | None  # to the first generated text (None: none came)
    content: str
    prompt_tokens: int
    completion_tokens: int
    computed_tokens: int | None  # prefill tokens the server ran (None: it does not say)


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               max_tokens: int, thinking: bool = False) -> Reply:
    """One streamed greedy chat request (also ``scripts/bench_server.py``'s client)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": thinking}}
    start, first, parts, pieces, usage = time.perf_counter(), None, [], 0, {}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if any(v for k, v in delta.items() if k != "role"):  # content or reasoning
                    pieces += 1
                    first = first if first is not None else time.perf_counter() - start
                parts.append(delta.get("content") or "")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    prompt = usage.get("prompt_tokens", 0)
    return Reply(first, "".join(parts), prompt, usage.get("completion_tokens", pieces),
                 None if cached is None else prompt - cached)


async def engine_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """This engine's ``/stats`` (None from a server without it)."""
    async with session.get(f"{url}/stats") as resp:
        return await resp.json() if resp.status == 200 else None


async def poll_stats(session: aiohttp.ClientSession, url: str,
                     ready: Callable[[dict[str, Any]], bool], interval: float,
                     timeout: float = 30) -> dict[str, Any] | None:
    """``/stats`` once ``ready`` holds for it (after ``timeout`` s, the last one read); None
    from a server without it."""
    deadline = time.monotonic() + timeout
    while (stats := await engine_stats(session, url)) is not None:
        if ready(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(interval)
    return None


async def prefill_computed(session: aiohttp.ClientSession, url: str, finished: int) -> int | None:
    """Prompt tokens this engine prefilled so far, once ``finished`` requests are counted
    (the server refreshes its stats snapshot just after it answers)."""
    stats = await poll_stats(session, url, lambda s: s["requests"]["finished"] >= finished, 0.02)
    return None if stats is None else stats["tokens"]["prefill_computed"]


class _Settled:
    """True once nothing is queued or running and the finished count held for ``hold_s``."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s, self.last, self.since = hold_s, None, time.monotonic()

    def __call__(self, stats: dict[str, Any]) -> bool:
        reqs = stats["requests"]
        key = (reqs["finished"], reqs["running"], reqs["waiting"])
        if key != self.last:
            self.last, self.since = key, time.monotonic()
        idle = reqs["running"] == 0 and reqs["waiting"] == 0
        return idle and time.monotonic() - self.since >= self.hold_s


async def settled_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """``/stats`` once nothing is queued or running and the finished count held for 0.3 s:
    the snapshot is refreshed only every 0.25 s or so, and one taken while the previous
    request was ending, not yet counted as finished, made the next request's "after" read
    return at once and its computed tokens 0."""
    return await poll_stats(session, url, _Settled(0.3), 0.05)


async def measured(session, url, requests: list[list[dict[str, str]]], max_tokens: int):
    """Send ``requests`` together; (replies, prefill tokens computed for all of them)."""
    stats = await settled_stats(session, url)
    replies = await asyncio.gather(*(chat(session, url, m, max_tokens) for m in requests))
    if stats is None:
        return replies, sum(r.computed_tokens or 0 for r in replies)
    after = await prefill_computed(session, url, stats["requests"]["finished"] + len(requests))
    total = after - stats["tokens"]["prefill_computed"]
    if len(replies) == 1:
        replies[0].computed_tokens = total
    return replies, total


@dataclass(slots=True)
class ChatPlan:
    """The chat workloads' sizes (defaults: the issue's 10 turns, 8 clients, 2,000 tokens)."""

    turns: int = 10
    turn_words: int = 120  # each user turn; the history grows by it plus the answer
    answer_tokens: int = 32
    clients: int = 8
    system_words: int = 2000  # one token per word with these words
    client_words: int = 30
    client_tokens: int = 8
    step_tokens: int = 2048  # our max_num_batched_tokens = mlx_lm.server's --prefill-step-size


def template_reuse(tokenizer, plan: ChatPlan, answers: list[str]) -> list[int]:
    """Per turn, the tokens it shares with the previous turn's prompt: the most a prefix
    cache can reuse when the template rewrites the previous answer (Qwen3 drops its
    ``<think>`` block), whatever the cache's granularity."""
    prompts, shared = [], []
    for k in range(len(answers)):
        ids = prompt_ids(tokenizer, _history(plan, answers[:k]))
        if prompts:
            prev = prompts[-1]
            shared.append(next((i for i, (a, b) in enumerate(zip(prev, ids)) if a != b),
                               min(len(prev), len(ids))))
        else:
            shared.append(0)
        prompts.append(ids)
    return shared


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids both servers build for ``messages`` (Hugging Face template, thinking off)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         enable_thinking=False, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _history(plan: ChatPlan, answers: list[str]) -> list[dict[str, str]]:
    messages = []
    for k, answer in enumerate(answers):
        messages += [{"role": "user", "content": words(plan.turn_words, seed=k)},
                     {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": words(plan.turn_words, seed=len(answers))}]


async def multi_turn(url: str, plan: ChatPlan, progress=print) -> tuple[list[dict[str, Any]], list[str]]:
    """A ``plan.turns``-turn chat; per turn: prompt tokens, prefill computed, TTFT."""
    rows, answers = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for _ in range(plan.turns):
            (reply,), _ = await measured(session, url, [_history(plan, answers)], plan.answer_tokens)
            answers.append(reply.content)
            progress(f"  turn {len(answers)}: {reply.prompt_tokens} prompt tokens, "
                     f"{reply.computed_tokens} computed, TTFT {reply.ttft_s or math.nan:.2f} s")
            rows.append(asdict(reply) | {"content": None})
    return rows, answers


async def shared_system(url: str, plan: ChatPlan, progress=print) -> list[dict[str, Any]]:
    """Two rounds of ``plan.clients`` concurrent clients with one long system prompt: cold
    (nothing cached) and warm (the system prompt was seen in the round before)."""
    system = {"role": "system", "content": words(plan.system_words, seed=10_000)}
    rounds = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        for name, seed in (("cold", 20_000), ("warm", 30_000)):
            reqs = [[system, {"role": "user", "content": words(plan.client_words, seed + i)}]
                    for i in range(plan.clients)]
            replies, computed = await measured(session, url, reqs, plan.client_tokens)
            ttfts = [r.ttft_s for r in replies if r.ttft_s is not None]
            rounds.append({"round": name, "ttft_mean_s": mean(ttfts), "ttft_p50_s": percentile(ttfts, 50),
                           "ttft_max_s": max(ttfts, default=float("nan")), "prompt_tokens": sum(r.prompt_tokens for r in replies),
                           "prefill_computed": computed,
                           "failed": sum(1 for r in replies if not r.prompt_tokens)})
            progress(f"  {name} round: {computed} computed, mean TTFT {rounds[-1]['ttft_mean_s']:.2f} s")
    return rounds


async def _warm_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        await chat(session, url, [{"role": "user", "content": "warm up"}], 2)


def server_command(server: str, model: Path, port: int, plan: ChatPlan) -> list[str]:
    if server == "ours":
        # No request timeout: on a slow CPU a cold 8 x 2,000-token round takes many minutes.
        return serve_command(str(model), port, ["--max-num-seqs", str(plan.clients),
                                                "--request-timeout", "36000",
                                                "--max-num-batched-tokens", str(plan.step_tokens)])
    return mlx_lm_server_command(str(model), port, ["--decode-concurrency", str(plan.clients),
                                                    "--prompt-concurrency", str(plan.clients),
                                                    "--prefill-step-size", str(plan.step_tokens)])


def run(model: Path, plan: ChatPlan, progress=print) -> dict[str, Any]:
    """Both workloads on both servers (mlx-lm first); the report's ``chat`` section."""
    from transformers import AutoTokenizer

    out: dict[str, Any] = {"plan": asdict(plan)}
    for server in ("mlx_lm", "ours"):
        port = free_port()
        progress(f"chat: starting {server} on 127.0.0.1:{port}")
        with running(server_command(server, model, port, plan), port, stop_s=30) as url:
            asyncio.run(_warm_up(url))
            turns, answers = asyncio.run(multi_turn(url, plan, progress)) if plan.turns else ([], [])
            out[server] = {"turns": turns, "shared_system": asyncio.run(shared_system(url, plan, progress))}
        out[server]["template_reuse"] = template_reuse(AutoTokenizer.from_pretrained(str(model)), plan, answers)
        progress(f"chat: {server} done")
    out["ratios"] = _ratios(out)
    return out


def _ratios(out: dict[str, Any]) -> dict[str, Any]:
    ours, peer = out["ours"], out["mlx_lm"]
    return {
        "turn_ttft": [ratio(a["ttft_s"], b["ttft_s"]) for a, b in zip(ours["turns"], peer["turns"])],
        "shared_system_ttft_mean": {a["round"]: ratio(a["ttft_mean_s"], b["ttft_mean_s"])
                                    for a, b in zip(ours["shared_system"], peer["shared_system"])},
    }
