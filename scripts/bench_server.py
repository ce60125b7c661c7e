#!/usr/bin/env python3
"""Server load benchmark: N concurrent streaming chat clients against `nano-qwen3 serve` and
against `mlx_lm.server`, on the same checkpoint, prompts, max_tokens and machine.

    python scripts/bench_server.py --shape small --clients 8 --max-tokens 32

Both servers run on loopback, one after the other, each as a subprocess on a free port,
each warmed up with one request first. Every client sends one streaming chat request
(temperature 0, `stream_options.include_usage`) and all N start together; a round's
aggregate tok/s is the completion tokens of all clients over the round's wall time, TTFT is
the time to each stream's first generated text. The rounds (`--rounds`) are pooled. Prints a
markdown table with ours/mlx-lm ratios and writes the numbers as JSON. Without `--model`
a random-weight Qwen3 checkpoint of `--shape` is written to a temporary folder (speed does
not depend on the weights' values).

Thinking is off by default (`chat_template_kwargs.enable_thinking=false` for both servers):
random weights tend to emit only whitespace, which a Qwen3 reasoning parser holds back (up
to 64 characters) until it knows whether a `<think>` block starts, so TTFT would measure
that wait rather than the server. `--thinking` turns it back on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from serverproc import exit_on_sigterm, free_port, percentile, running, serve_command

from nano_qwen3_mlx.bench.chat import WORDS, chat


@dataclass
class ServerResult:
    server: str
    clients: int
    rounds: int
    completion_tokens: int = 0
    wall_s: float = 0.0
    tok_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    failed: int = 0
    ttfts: list[float] = field(default_factory=list, repr=False)


# ---- servers ------------------------------------------------------------------------------
def server_command(name: str, model: Path, port: int, args: argparse.Namespace) -> list[str]:
    if name == "nano-qwen3":
        return serve_command(str(model), port, ["--max-num-seqs", str(max(args.clients_list)),
                                                "--kv-cache-gb", str(args.kv_cache_gb)])
    return [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING",
            "--decode-concurrency", str(max(args.clients_list))]


# ---- clients ------------------------------------------------------------------------------
def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def stream_chat(session: aiohttp.ClientSession, url: str, prompt: str,
                      max_tokens: int, thinking: bool) -> tuple[float | None, int]:
    """One streaming chat request: (seconds to the first generated text, completion tokens)."""
    reply = await chat(session, url, [{"role": "user", "content": prompt}], max_tokens, thinking)
    return reply.ttft_s, reply.completion_tokens


async def run_round(url: str, prompts: list[str], max_tokens: int, timeout_s: float,
                    thinking: bool = False) -> tuple[float, list[float], int, int]:
    """All prompts at once; (wall seconds, TTFTs, completion tokens, failures)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=len(prompts) + 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()
        results = await asyncio.gather(
            *(stream_chat(session, url, p, max_tokens, thinking) for p in prompts),
            return_exceptions=True,
        )
        wall = time.monotonic() - start
    ok = [r for r in results if not isinstance(r, BaseException)]
    for r in results:
        if isinstance(r, BaseException):
            print(f"  request failed: {type(r).__name__}: {r}", file=sys.stderr)
    return wall, [t for t, _ in ok if t is not None], sum(n for _, n in ok), len(results) - len(ok)


def bench_one(name: str, url: str, args: argparse.Namespace) -> list[ServerResult]:
    asyncio.run(run_round(url, make_prompts(1, args.prompt_words, 999), args.max_tokens,
                          args.timeout, args.thinking))  # warm-up
    results = []
    for n in args.clients_list:
        res = ServerResult(name, n, args.rounds)
        for r in range(args.rounds):
            prompts = make_prompts(n, args.prompt_words, seed=1000 * n + r)
            wall, ttfts, tokens, failed = asyncio.run(
                run_round(url, prompts, args.max_tokens, args.timeout, args.thinking))
            res.wall_s += wall
            res.completion_tokens += tokens
            res.failed += failed
            res.ttfts += ttfts
        res.tok_s = res.completion_tokens / res.wall_s if res.wall_s else 0.0
        res.ttfts.sort()
        res.ttft_p50_s, res.ttft_p99_s = percentile(res.ttfts, 50), percentile(res.ttfts, 99)
        print(f"  {name}: {n} clients, {res.tok_s:.1f} tok/s, TTFT p50 "
              f"{res.ttft_p50_s * 1000:.0f} ms", file=sys.stderr)
        results.append(res)
    return results


# ---- report -------------------------------------------------------------------------------
def markdown(results: list[ServerResult], args: argparse.Namespace, model: str) -> str:
    lines = [
        f"Server load: {model}, streaming chat, max_tokens {args.max_tokens}, prompt "
        f"{args.prompt_words} words, temperature 0, thinking {'on' if args.thinking else 'off'}, "
        f"{args.rounds} round(s) per size",
        "",
        "| server | clients | tokens | tok/s | TTFT p50 | TTFT p99 | failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.server} | {r.clients} | {r.completion_tokens} | {r.tok_s:.1f} | "
                     f"{r.ttft_p50_s * 1000:.0f} ms | {r.ttft_p99_s * 1000:.0f} ms | {r.failed} |")
    by_key = {(r.server, r.clients): r for r in results}
    ratios = []
    for n in args.clients_list:
        ours, peer = by_key.get(("nano-qwen3", n)), by_key.get(("mlx_lm.server", n))
        if ours and peer and peer.tok_s and ours.ttft_p50_s:
            ratios.append(f"| {n} | {ours.tok_s / peer.tok_s:.2f}x | "
                          f"{ours.ttft_p50_s / peer.ttft_p50_s:.2f}x | "
                          f"{ours.ttft_p99_s / peer.ttft_p99_s:.2f}x |")
    if ratios:
        lines += ["", "| clients | tok/s ours ÷ mlx-lm (higher is better) | TTFT p50 ours ÷ "
                  "mlx-lm (lower is better) | TTFT p99 ours ÷ mlx-lm |", "|---:|---:|---:|---:|",
                  *ratios]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from nano_qwen3_mlx.bench import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local checkpoint dir both servers load")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES),
                   help="random checkpoint shape when no --model is given")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--clients", default="8", help="comma-separated concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--thinking", action="store_true", help="leave Qwen3 thinking on")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="for nano-qwen3 serve")
    p.add_argument("--servers", default="nano-qwen3,mlx_lm.server")
    p.add_argument("--timeout", type=float, default=600.0, help="per round, seconds")
    p.add_argument("--out", default="bench-results/bench_server.json")
    args = p.parse_args(argv)
    args.clients_list = [int(c) for c in args.clients.split(",") if c.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.clients_list or min(args.clients_list) < 1 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be positive")
    if set(args.server_list) - {"nano-qwen3", "mlx_lm.server"}:
        p.error("--servers: nano-qwen3 and/or mlx_lm.server")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, label = Path(args.model), args.model
        else:
            from nano_qwen3_mlx.bench import random_checkpoint

            model = random_checkpoint(args.shape, args.dtype, Path(tmp))
            label = f"random {args.shape} Qwen3 ({args.dtype})"
        results: list[ServerResult] = []
        for name in args.server_list:
            port = free_port()
            print(f"starting {name} on 127.0.0.1:{port} ...", file=sys.stderr)
            with running(server_command(name, model, port, args), port, stop_s=30) as url:
                results += bench_one(name, url, args)
    table = markdown(results, args, label)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": label, "args": {k: v for k, v in vars(args).items()},
                               "results": [asdict(r) for r in results], "table": table},
                              indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
