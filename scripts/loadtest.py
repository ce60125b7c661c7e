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
import json
import os
import random
import shlex
import sys
import time
from dataclasses import asdict
from typing import Any

import aiohttp
from loadjobs import Job, LoadConfig, make_job
from loadreport import Report, format_report, mb, summarize
from serverproc import check_loopback, exit_on_sigterm, free_port, running, serve_command


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
        report.baseline_active_mb = mb(stats["memory"]["active_bytes"])
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
    summarize(report, ttfts, final, cfg.memory_tolerance_mb)
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
                                        mb(stats["memory"]["active_bytes"]))
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
        idle = idle and mb(stats["memory"]["active_bytes"]) <= baseline_mb + cfg.memory_tolerance_mb
    return idle


def _serve(model: str, extra_args: list[str]):
    port = free_port()
    return running(serve_command(model, port, extra_args), port)


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
    exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(_serve(args.model, shlex.split(args.serve_args)))
        report = asyncio.run(run_load(url.rstrip("/"), cfg))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(report) | {"ok": report.ok}, f, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
