"""The prefix cache's disk tier, measured on ``nano-qwen3 serve`` subprocesses.

1. TTFT of one long prompt: cold, then after ``kill -9`` and a restart (its blocks come
   from disk), with the share of the prompt reported as cached.
2. A decoding stream's inter-token gaps while another long prompt arrives: on a server
   without the tier (the prompt is prefilled), on one with an empty tier (prefilled, and
   its blocks written meanwhile), and on a restarted one with it (its blocks load from disk).

    python scripts/bench_disk_tier.py --checkpoint /tmp/kv-ckpt --prompt-len 8000

The checkpoint is written once (random weights of ``--shape``, the real Qwen3 tokenizer).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (the optimised BLAS first)
from nano_qwen3_mlx.bench.servers import free_port, healthy, serve_command
from nano_qwen3_mlx.bench.shapes import kept_checkpoint
from nano_qwen3_mlx.blas import subprocess_env


class Server:
    def __init__(self, model: Path, args: list[str]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            serve_command(str(model), self.port, ["--served-model-name", "m", *args]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
        self.url = f"http://127.0.0.1:{self.port}"
        while not healthy(self.url):
            if self.proc.poll() is not None:
                raise SystemExit("error: the server did not start")
            time.sleep(0.2)

    def stream(self, ids: list[int], max_tokens: int) -> tuple[list[float], int]:
        """Token arrival times (perf_counter) and the cached prompt tokens of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        body = {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        times, cached = [time.perf_counter()], 0
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        conn.close()
        return times, cached

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/stats")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data

    def wait_written(self) -> None:
        """Until the folder stops growing (/stats is a snapshot up to 0.25 s old)."""
        last = None
        while (disk := self.stats()["disk_cache"])["writes_pending"] or disk["bytes"] != last:
            last = disk["bytes"]
            time.sleep(1.0)

    def kill9(self) -> None:
        os.kill(self.proc.pid, 9)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def ttft(server: Server, ids: list[int]) -> tuple[float, int]:
    times, cached = server.stream(ids, 1)
    return times[1] - times[0], cached


def gaps_while_arriving(server: Server, long_ids: list[int], stream_ids: list[int]
                        ) -> tuple[list[float], list[float], float, int]:
    """A stream decodes 200 tokens; after 40 the long prompt arrives. The stream's gaps
    before and after the arrival, the long prompt's TTFT and cached tokens."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(s=server.stream(stream_ids, 200)))
    thread.start()
    time.sleep(0.5)
    while True:  # wait for the stream to be decoding
        stats = server.stats()
        if stats["tokens"]["generated"] >= 40:
            break
        time.sleep(0.05)
    start = time.perf_counter()
    long_ttft, cached = ttft(server, long_ids)
    thread.join()
    times = result["s"][0]
    pairs = list(zip(times[1:], times[2:]))
    return ([b - a for a, b in pairs if b < start], [b - a for a, b in pairs if a >= start],
            long_ttft, cached)


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("bench-results/kv-ckpt"))
    ap.add_argument("--shape", default="kv")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=8000)
    ap.add_argument("--cache-dir", type=Path, default=Path("bench-results/disk-tier-cache"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/disk_tier.json"))
    args = ap.parse_args()
    kept_checkpoint(args.shape, args.dtype, args.checkpoint)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    rng = random.Random(0)
    long_ids = [rng.randrange(1000, 100000) for _ in range(args.prompt_len)]
    other_ids = [rng.randrange(1000, 100000) for _ in range(args.prompt_len)]  # the arriving one
    stream_ids = [rng.randrange(1000, 100000) for _ in range(64)]
    tier = ["--prefix-cache-dir", str(args.cache_dir), "--prefix-cache-disk-gb", "20"]
    report: dict = {"prompt_len": args.prompt_len, "shape": args.shape, "dtype": args.dtype,
                    "load_average_start": os.getloadavg()}

    base = Server(args.checkpoint, [])  # no tier: the long prompt arriving is prefilled
    before, report["no_tier_gaps"], report["no_tier_long_ttft_s"], _ = \
        gaps_while_arriving(base, other_ids, stream_ids)
    report["itl_p50_no_arrival_s"] = sorted(before)[len(before) // 2]
    base.stop()

    first = Server(args.checkpoint, tier)
    report["cold_ttft_s"], _ = ttft(first, long_ids)
    first.wait_written()
    # The arriving prompt prefilled as without the tier, its blocks written meanwhile.
    _, report["tier_write_gaps"], report["tier_write_long_ttft_s"], _ = \
        gaps_while_arriving(first, other_ids, stream_ids)
    first.wait_written()
    report["write_stats"] = first.stats()["disk_cache"]  # engine_write_s: the tier's share
    report["bytes_on_disk"] = first.stats()["disk_cache"]["bytes"]
    first.kill9()

    again = Server(args.checkpoint, tier)
    report["restart_ttft_s"], report["restart_cached_tokens"] = ttft(again, long_ids)
    report["restart_load_s"] = again.stats()["disk_cache"]["load_s"]  # the reader thread's
    report["ram_hit_ttft_s"], _ = ttft(again, long_ids)  # the floor: the same prompt from RAM
    again.kill9()
    again = Server(args.checkpoint, tier)  # once more, to load from disk beside a stream
    _, report["tier_gaps"], report["tier_long_ttft_s"], report["tier_long_cached"] = \
        gaps_while_arriving(again, other_ids, stream_ids)
    report["disk_stats"] = again.stats()["disk_cache"]
    again.stop()

    report["ttft_ratio"] = report["restart_ttft_s"] / report["cold_ttft_s"]
    report["cached_share"] = report["restart_cached_tokens"] / args.prompt_len
    report["itl_p99_no_tier_s"], report["itl_p99_tier_s"] = \
        p99(report["no_tier_gaps"]), p99(report["tier_gaps"])
    report["itl_p99_tier_writes_s"] = p99(report["tier_write_gaps"])
    report["itl_p99_ratio_writes"] = report["itl_p99_tier_writes_s"] / report["itl_p99_no_tier_s"]
    report["itl_p99_ratio_loads"] = report["itl_p99_tier_s"] / report["itl_p99_no_tier_s"]
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"TTFT {args.prompt_len} tokens: cold {report['cold_ttft_s']:.2f} s, after kill -9 and "
          f"restart {report['restart_ttft_s']:.3f} s ({report['ttft_ratio']:.3f}x), cached "
          f"{report['restart_cached_tokens']} ({report['cached_share']:.1%}); files read in "
          f"{report['restart_load_s']:.2f} s; from RAM {report['ram_hit_ttft_s']:.3f} s")
    print(f"stream inter-token p50 before the arrival {report['itl_p50_no_arrival_s'] * 1e3:.1f} ms; "
          f"p99 while the prompt arrives: no tier (prefill) "
          f"{report['itl_p99_no_tier_s'] * 1e3:.1f} ms, tier (prefill + writes) "
          f"{report['itl_p99_tier_writes_s'] * 1e3:.1f} ms ({report['itl_p99_ratio_writes']:.2f}x), "
          f"tier (disk load) {report['itl_p99_tier_s'] * 1e3:.1f} ms "
          f"({report['itl_p99_ratio_loads']:.2f}x); its TTFT {report['no_tier_long_ttft_s']:.2f} s, "
          f"{report['tier_write_long_ttft_s']:.2f} s, {report['tier_long_ttft_s']:.3f} s")
    writes = report["write_stats"]
    print(f"the writes' time on the engine thread: {writes['engine_write_s']:.2f} s in all, "
          f"{writes['engine_write_max_s'] * 1e3:.0f} ms in the longest step")
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")


if __name__ == "__main__":
    main()
