#!/usr/bin/env python3
"""Load test for the OpenAI-compatible server: loopback only, bounded in requests and time.

    python scripts/loadtest.py --model tests/tiny-qwen3 --requests 300 --clients 16
    python scripts/loadtest.py --url http://127.0.0.1:8000 --requests 200 --duration 120

M concurrent clients mix streaming and non-streaming chat and text completions with random
prompt and ``max_tokens`` lengths; a share of the streams is dropped mid-stream at a random
point and a share of the requests is malformed (bad JSON, wrong types, unknown model, a
prompt longer than the context, ...). At the end ``/stats`` must show nothing running or
waiting, no used KV block (cached prefix blocks are fine) and MLX active memory back near
the baseline taken before the load. Exit status 1 when any check fails.

Bounds: at most ``--requests`` requests, none started after ``--duration`` seconds, each
cut off after ``--request-timeout`` seconds, then at most ``--settle-s`` seconds of polling.
Only loopback URLs are accepted.

With ``--model`` (and no ``--url``) the script starts ``nano-qwen3 serve`` itself on a free
loopback port and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum "
         "strange songs about rivers mountains tea bread clocks and distant stars").split()


@dataclass
class LoadConfig:
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
class Report:
    sent: int = 0
    completed: int = 0
    aborted: int = 0  # dropped mid-stream by the client, on purpose
    failed: int = 0  # a good request that did not complete (non-2xx, error event, broken stream)
    rejected_busy: int = 0  # 429: allowed under load, but counted
    bad_sent: int = 0
    bad_rejected: int = 0  # a bad request answered 4xx with OpenAI error JSON (as designed)
    bad_accepted: int = 0  # a bad request that did not get a proper 4xx
    statuses: dict[str, int] = field(default_factory=dict)
    errors_by_status: dict[str, int] = field(default_factory=dict)
    num_5xx: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    tok_s: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    peak_running: int = 0
    peak_active_mb: float = 0.0
    mlx_peak_mb: float = 0.0
    baseline_active_mb: float = 0.0
    final_active_mb: float = 0.0
    final_used_blocks: int | None = None
    final_cached_blocks: int | None = None
    final_running: int | None = None
    final_waiting: int | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # a few failure descriptions

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


# ---- requests -----------------------------------------------------------------------------
@dataclass
class Job:
    kind: str  # chat | completion | bad
    body: Any  # dict, or raw bytes for bad JSON
    stream: bool = False
    drop_after: int | None = None  # SSE events to read before disconnecting
    path: str = "/v1/chat/completions"
    expect: tuple[int, ...] = ()  # statuses a bad request may get


def _prompt(rng: random.Random, max_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))


def make_job(rng: random.Random, cfg: LoadConfig, max_model_len: int) -> Job:
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


# ---- one request --------------------------------------------------------------------------
async def _send(session: aiohttp.ClientSession, url: str, job: Job, report: Report,
                ttfts: list[float], cfg: LoadConfig) -> None:
    report.sent += 1
    kwargs: dict[str, Any] = {"headers": {"Content-Type": "application/json"}}
    if cfg.api_key:
        kwargs["headers"]["Authorization"] = f"Bearer {cfg.api_key}"
    kwargs["data"] = job.body if isinstance(job.body, bytes) else json.dumps(job.body)
    start = time.monotonic()
    try:
        async with session.post(url + job.path, **kwargs) as resp:
            _count(report.statuses, resp.status)
            if resp.status >= 400:
                _count(report.errors_by_status, resp.status)
            if resp.status >= 500:
                report.num_5xx += 1
            if job.kind == "bad":
                await _check_bad(resp, job, report)
            elif resp.status == 429:
                report.rejected_busy += 1
                await resp.read()
            elif resp.status != 200:
                _fail(report, f"{job.kind} -> {resp.status}: {(await resp.text())[:200]}")
            elif job.stream:
                await _read_stream(resp, job, report, ttfts, start)
            else:
                data = await resp.json()
                report.completion_tokens += data["usage"]["completion_tokens"]
                report.completed += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        _fail(report, f"{job.kind} {job.path}: {type(exc).__name__}: {exc}"[:200])


async def _check_bad(resp: aiohttp.ClientResponse, job: Job, report: Report) -> None:
    report.bad_sent += 1
    try:
        body = await resp.json(content_type=None)
        good_shape = set(body["error"]) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        good_shape = False
    if resp.status in job.expect and good_shape:
        report.bad_rejected += 1
    else:
        report.bad_accepted += 1
        report.samples.append(f"bad request {str(job.body)[:60]!r} -> {resp.status}")


async def _read_stream(resp: aiohttp.ClientResponse, job: Job, report: Report,
                       ttfts: list[float], start: float) -> None:
    events, first, usage, done = 0, None, None, False
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            done = True
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            _fail(report, f"error event: {chunk['error'].get('message')}")
            return
        events += 1
        if first is None and _has_output(chunk):
            first = time.monotonic() - start
        usage = chunk.get("usage") or usage
        if job.drop_after is not None and events >= job.drop_after:
            resp.close()  # walk away mid-stream: the server must abort and free the blocks
            report.aborted += 1
            return
    if first is not None:
        ttfts.append(first)
    if not done or usage is None:
        _fail(report, "stream ended without usage or [DONE]")
        return
    report.completion_tokens += usage["completion_tokens"]
    report.completed += 1


def _has_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
            return True
        if choice.get("finish_reason"):
            return True
    return False


def _count(counter: dict[str, int], status: int) -> None:
    counter[str(status)] = counter.get(str(status), 0) + 1


def _fail(report: Report, message: str) -> None:
    report.failed += 1
    if len(report.samples) < 10:
        report.samples.append(message)


# ---- the run ------------------------------------------------------------------------------
def check_loopback(url: str) -> None:
    """Refuse anything but a loopback address: this tool must not load anyone else's server."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: {url} is not a loopback address")


async def get_json(session: aiohttp.ClientSession, url: str, path: str,
                   cfg: LoadConfig) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    async with session.get(url + path, headers=headers) as resp:
        resp.raise_for_status()
        return await resp.json()


async def run_load(url: str, cfg: LoadConfig) -> Report:
    """Send the load, then check ``/stats``; the report's ``checks`` say what passed."""
    check_loopback(url)
    report, ttfts = Report(), []
    rng = random.Random(cfg.seed)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    connector = aiohttp.TCPConnector(limit=cfg.clients * 2)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = await get_json(session, url, "/v1/models", cfg)
        max_model_len = models["data"][0].get("max_model_len") or 2048
        stats = await wait_idle(session, url, cfg)
        report.baseline_active_mb = _mb(stats["memory"]["active_bytes"])
        jobs = iter([make_job(rng, cfg, max_model_len) for _ in range(cfg.requests)])
        deadline = time.monotonic() + cfg.duration
        monitor = asyncio.create_task(_monitor(session, url, cfg, report))
        start = time.monotonic()
        try:
            await asyncio.gather(*(_client(session, url, jobs, deadline, report, ttfts, cfg)
                                   for _ in range(cfg.clients)))
        finally:
            report.wall_s = time.monotonic() - start
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        final = await wait_idle(session, url, cfg, report.baseline_active_mb)
    _summarize(report, ttfts, final, cfg)
    return report


async def _client(session, url, jobs, deadline, report, ttfts, cfg) -> None:
    for job in jobs:  # the shared iterator bounds the count, the deadline bounds the time
        if time.monotonic() >= deadline:
            return
        await _send(session, url, job, report, ttfts, cfg)


async def _monitor(session, url, cfg, report) -> None:
    while True:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, KeyError):
            stats = await get_json(session, url, "/stats", cfg)
            report.peak_running = max(report.peak_running, stats["requests"]["running"])
            report.peak_active_mb = max(report.peak_active_mb,
                                        _mb(stats["memory"]["active_bytes"]))
        await asyncio.sleep(0.25)


async def wait_idle(session, url, cfg: LoadConfig, baseline_mb: float | None = None) -> dict:
    """Poll ``/stats`` (refreshed lazily by the engine) until idle, or ``settle_s`` passed."""
    deadline = time.monotonic() + cfg.settle_s
    while True:
        stats = await get_json(session, url, "/stats", cfg)
        if _is_idle(stats, baseline_mb, cfg) or time.monotonic() >= deadline:
            return stats
        await asyncio.sleep(0.1)


def _is_idle(stats: dict, baseline_mb: float | None, cfg: LoadConfig) -> bool:
    req, kv = stats["requests"], stats["kv_cache"]
    idle = req["running"] == 0 and req["waiting"] == 0 and kv["num_used_blocks"] == 0
    if baseline_mb is not None:
        idle = idle and _mb(stats["memory"]["active_bytes"]) <= baseline_mb + cfg.memory_tolerance_mb
    return idle


def _summarize(report: Report, ttfts: list[float], final: dict, cfg: LoadConfig) -> None:
    report.tok_s = report.completion_tokens / report.wall_s if report.wall_s else 0.0
    if ttfts:
        ttfts.sort()
        report.ttft_p50_s = _pct(ttfts, 50)
        report.ttft_p99_s = _pct(ttfts, 99)
    req, kv, mem = final["requests"], final["kv_cache"], final["memory"]
    report.final_running, report.final_waiting = req["running"], req["waiting"]
    report.final_used_blocks = kv["num_used_blocks"]
    report.final_cached_blocks = kv.get("num_cached_blocks")
    report.final_active_mb = _mb(mem["active_bytes"])
    report.mlx_peak_mb = _mb(mem.get("peak_bytes", 0))
    good = report.sent - report.bad_sent
    report.checks = {
        "no 5xx": report.num_5xx == 0,
        "every good request completed or was dropped by design":
            report.failed == 0 and report.completed + report.aborted + report.rejected_busy == good,
        "every bad request got a 4xx with OpenAI error JSON": report.bad_accepted == 0,
        "nothing running or waiting": req["running"] == 0 and req["waiting"] == 0,
        "no used KV blocks (prefix cache aside)": kv["num_used_blocks"] == 0,
        "memory back to baseline":
            report.final_active_mb <= report.baseline_active_mb + cfg.memory_tolerance_mb,
    }


def _pct(values: list[float], p: float) -> float:
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def _mb(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


def format_report(report: Report) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    lines = [
        f"sent {report.sent} in {report.wall_s:.1f} s: completed {report.completed}, "
        f"aborted (client drops) {report.aborted}, failed {report.failed}, "
        f"429 {report.rejected_busy}, bad requests {report.bad_sent} "
        f"({report.bad_rejected} rejected with 4xx)",
        f"statuses {dict(sorted(report.statuses.items()))}; errors by status "
        f"{dict(sorted(report.errors_by_status.items()))}; 5xx {report.num_5xx}",
        f"{report.completion_tokens} completion tokens, {report.tok_s:.1f} tok/s; "
        f"TTFT p50 {ms(report.ttft_p50_s)}, p99 {ms(report.ttft_p99_s)}",
        f"after: running {report.final_running}, waiting {report.final_waiting}, used blocks "
        f"{report.final_used_blocks} (cached prefix blocks {report.final_cached_blocks}); "
        f"active memory {report.baseline_active_mb} MiB before, {report.final_active_mb} MiB "
        f"after, peak seen {report.peak_active_mb} MiB (MLX peak {report.mlx_peak_mb} MiB); "
        f"peak running {report.peak_running}",
    ]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in report.checks.items()]
    lines += [f"  sample failure: {s}" for s in report.samples[:10]]
    return "\n".join(lines)


# ---- starting a server --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, extra_args: list[str], startup_s: float = 300.0):
    """``nano-qwen3 serve`` on a free loopback port for the duration of the block."""
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"error: the server exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise SystemExit("error: the server did not become healthy")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, LoadConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="start `nano-qwen3 serve --model MODEL` on loopback")
    p.add_argument("--serve-args", default="", help="extra `serve` flags, e.g. '--max-num-seqs 16'")
    p.add_argument("--json", help="also write the report as JSON to this file")
    d = LoadConfig()
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        kind = type(value) if value is not None else str
        p.add_argument(flag, type=kind, default=value if name != "api_key" else
                       os.environ.get("API_KEY"))
    args = p.parse_args(argv)
    cfg = LoadConfig(**{k: getattr(args, k) for k in asdict(d)})
    if cfg.requests < 1 or cfg.clients < 1 or cfg.duration <= 0:
        p.error("--requests, --clients and --duration must be positive")
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a server this script started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(serve(args.model, shlex.split(args.serve_args)))
        report = asyncio.run(run_load(url.rstrip("/"), cfg))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report) | {"ok": report.ok}, f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
