#!/usr/bin/env python3
"""The hybrid prefix cache's snapshot spacing: memory against recompute.

For each ``state_snapshot_interval``, on a random checkpoint of bench shape ``hybrid`` (or
``--model DIR``): the cost of taking snapshots while a prompt prefills (its TTFT against the
largest interval), the snapshots it keeps and their bytes, and what a request sharing a
``--shared``-token prefix then recomputes and how long that takes.

    python scripts/bench_snapshot_interval.py --prompt-len 2048 --shared 1900
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.bench.shapes import random_checkpoint

ONE_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def measure(path: Path, interval: int, prompt_len: int, shared: int) -> dict[str, float]:
    first = list(range(1000, 1000 + prompt_len))
    second = first[:shared] + list(range(90_000, 90_000 + prompt_len - shared))
    with LLM(str(path), state_snapshot_interval=interval, enable_prefix_caching=True) as llm:
        llm.generate([list(range(5, 40))], ONE_TOKEN)  # warm-up: kernels built
        t0 = time.perf_counter()
        llm.generate([first], ONE_TOKEN)
        cold_s = time.perf_counter() - t0
        state = llm.get_stats()["state_cache"]
        before = llm.get_stats()["tokens"]["prefill_computed"]
        t0 = time.perf_counter()
        llm.generate([second], ONE_TOKEN)
        hit_s = time.perf_counter() - t0
        recomputed = llm.get_stats()["tokens"]["prefill_computed"] - before
    return {"interval": interval, "cold_s": cold_s, "snapshots": state["snapshots"],
            "snapshot_mb": state["snapshot_bytes"] / 2**20, "recomputed": recomputed,
            "hit_s": hit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--shared", type=int, default=1900)
    parser.add_argument("--intervals", default="64,128,256,512,1024")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_checkpoint("hybrid", "float32", Path(tmp))
        rows = [measure(path, int(i), args.prompt_len, args.shared)
                for i in args.intervals.split(",")]
    base = rows[-1]["cold_s"]
    print(f"prompt {args.prompt_len} tokens, second request shares {args.shared}\n")
    print("| interval | cold prefill s | vs largest | snapshots kept | MiB | recomputed on a hit | hit s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['interval']} | {r['cold_s']:.2f} | {r['cold_s'] / base:.2f}x | {r['snapshots']} | "
              f"{r['snapshot_mb']:.1f} | {r['recomputed']} | {r['hit_s']:.2f} |")


if __name__ == "__main__":
    main()
