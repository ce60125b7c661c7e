"""An agent-like replay with a restart in the middle: the disk tier against no tier and
``mlx_lm.server``.

One long system prompt (an agent's instructions and tools) and a conversation that grows by
a user message and the previous answer on every call; after call ``--restart-after`` the
server is killed (``kill -9``) and started again on the same folder. Three servers, one
after the other, on the same random-weight checkpoint (the real Qwen3 tokenizer), each with
the same step size: ours with the disk tier, ours without it, and ``mlx_lm.server`` (its
prompt cache on, started as ``nano-qwen3 bench --suite chat`` starts it). Per server: total
prompt tokens computed (``prompt_tokens - cached_tokens`` from each reply's usage) and total
TTFT, and the same for the calls after the restart.

    python scripts/bench_agent_replay.py --checkpoint /tmp/kv-ckpt --system-words 4000

Before the kill, ours with the tier is given until its write queue is empty (``/stats``):
a crash within a second of a call loses that call's newest blocks, not correctness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

import nano_qwen3_mlx  # noqa: F401  (the optimised BLAS first)
from nano_qwen3_mlx.bench.chat import ChatPlan, chat, server_command, words
from nano_qwen3_mlx.bench.servers import free_port, healthy
from nano_qwen3_mlx.bench.shapes import kept_checkpoint
from nano_qwen3_mlx.blas import subprocess_env

SERVERS = ("ours_tier", "ours_no_tier", "mlx_lm")


class Server:
    """One server process that can be killed and started again with the same command."""

    def __init__(self, kind: str, model: Path, plan: ChatPlan, cache_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command("mlx_lm" if kind == "mlx_lm" else "ours", model, self.port, plan)
        if kind == "ours_tier":
            self.cmd += ["--prefix-cache-dir", str(cache_dir), "--prefix-cache-disk-gb", "20"]
        self.tier = kind == "ours_tier"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=subprocess_env())
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise SystemExit(f"error: {self.cmd[2]} did not start")
            time.sleep(0.25)

    async def drain_writes(self, session: aiohttp.ClientSession) -> None:
        """Until the tier's write queue is empty and the folder stops growing."""
        last = None
        while True:
            async with session.get(f"{self.url}/stats") as resp:
                disk = (await resp.json())["disk_cache"]
            if not disk["writes_pending"] and disk["bytes"] == last:
                return
            last = disk["bytes"]
            await asyncio.sleep(1.0)

    def kill9(self) -> None:
        os.kill(self.proc.pid, 9)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def replay(server: Server, args: argparse.Namespace) -> list[dict]:
    """The calls on one server: per call prompt tokens, computed tokens, TTFT."""
    system = {"role": "system", "content": words(args.system_words, seed=10_000)}
    history: list[dict[str, str]] = []
    rows = []
    timeout = aiohttp.ClientTimeout(total=7200)
    # No kept-alive connections: the server they went to is killed in the middle.
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        for call in range(args.calls):
            if call == args.restart_after:
                if server.tier:
                    await server.drain_writes(session)
                server.kill9()
                server.start()
            history.append({"role": "user", "content": words(args.turn_words, seed=call)})
            reply = await chat(session, server.url, [system, *history], args.answer_tokens)
            history.append({"role": "assistant", "content": reply.content})
            rows.append({"call": call + 1, "prompt_tokens": reply.prompt_tokens,
                         "computed": reply.computed_tokens, "ttft_s": reply.ttft_s})
            print(f"  call {call + 1}: {reply.prompt_tokens} prompt tokens, "
                  f"{reply.computed_tokens} computed, TTFT {reply.ttft_s:.2f} s", flush=True)
    return rows


def totals(rows: list[dict], restart_after: int) -> dict:
    after = rows[restart_after:]
    return {"computed": sum(r["computed"] for r in rows),
            "ttft_s": sum(r["ttft_s"] for r in rows),
            "computed_after_restart": sum(r["computed"] for r in after),
            "ttft_after_restart_s": sum(r["ttft_s"] for r in after),
            "first_after_restart": {"computed": after[0]["computed"], "ttft_s": after[0]["ttft_s"]}
            if after else None,
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("bench-results/kv-ckpt"))
    ap.add_argument("--shape", default="kv")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--system-words", type=int, default=8000, help="~ one token per word")
    ap.add_argument("--turn-words", type=int, default=150)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--restart-after", type=int, default=10)
    ap.add_argument("--step-tokens", type=int, default=2048,
                    help="our --max-num-batched-tokens = mlx_lm.server's --prefill-step-size")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--cache-dir", type=Path, default=Path("bench-results/agent-replay-cache"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/agent_replay.json"))
    args = ap.parse_args()
    kept_checkpoint(args.shape, args.dtype, args.checkpoint)
    plan = ChatPlan(clients=1, step_tokens=args.step_tokens)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                    "load_average_start": os.getloadavg()}
    for kind in args.servers.split(","):
        shutil.rmtree(args.cache_dir, ignore_errors=True)
        print(f"{kind}:", flush=True)
        server = Server(kind, args.checkpoint, plan, args.cache_dir)
        server.start()
        try:
            rows = asyncio.run(replay(server, args))
        finally:
            server.stop()
        report[kind] = {"calls": rows, **totals(rows, args.restart_after)}
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("server          computed  total TTFT  | after the restart: computed  TTFT   first call")
    for kind in args.servers.split(","):
        r = report[kind]
        first = r["first_after_restart"] or {"computed": 0, "ttft_s": float("nan")}
        print(f"{kind:14} {r['computed']:9d} {r['ttft_s']:10.1f} s | {r['computed_after_restart']:18d} "
              f"{r['ttft_after_restart_s']:6.1f} s {first['ttft_s']:6.2f} s ({first['computed']})")
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")


if __name__ == "__main__":
    main()
