#!/usr/bin/env python3
"""Decode step time with the BLAS thread policy of ``engine/split_linear.py`` and without it.

    python scripts/bench_blas_threads.py [SHAPE=kv] [BATCH=8] [CONTEXT=2048] [ROUNDS=10]

Loads a random checkpoint of the bench shape (kept under ``bench-results/checkpoints``),
prefills ``BATCH`` prompts of ``CONTEXT`` tokens, then alternates, round by round in the same
process and on the same sequences, three decode steps with OpenBLAS on its own threads
(``MAX_ROWS = 0``: the policy off) and three with the policy on (steps of 2 to 64 rows
single-threaded, their products of 2 MiB weights or more split over the streams; a batch of
one keeps OpenBLAS's threads either way: the policy measured slower there); the first
step of each round is not timed (the switch). Prints the median step of each. The
engine-level comparison with mlx-lm is ``nano-qwen3 bench`` (README, "Decode attention").
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
from nano_qwen3_mlx import blas
from nano_qwen3_mlx.bench.shapes import kept_checkpoint, make_prompts
from nano_qwen3_mlx.engine import split_linear
from nano_qwen3_mlx.llm import LLM
from nano_qwen3_mlx.sampling_params import SamplingParams

POLICY = {"OpenBLAS threads (policy off)": 0, "few-row steps single-threaded": split_linear.MAX_ROWS}


def main() -> None:
    args = sys.argv[1:] + [None] * 4
    shape, batch = args[0] or "kv", int(args[1] or 8)
    context, rounds = int(args[2] or 2048), int(args[3] or 10)
    folder = kept_checkpoint(shape, "float32", Path("bench-results/checkpoints") / shape)
    gen = 3 * len(POLICY) * rounds + 16
    llm = LLM(str(folder), max_num_seqs=batch, block_size=64,
              num_kv_blocks=batch * (context + gen + 64) // 64 + 2 * batch + 8)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    for i, prompt in enumerate(make_prompts(batch, context)):
        engine.add_request(prompt, params, request_id=str(i))
    while not all(s.num_completion_tokens > 2 for s in engine._seqs.values()):
        engine.step()
    times: dict[str, list[float]] = {name: [] for name in POLICY}
    for _ in range(rounds):
        for name, max_rows in POLICY.items():
            split_linear.MAX_ROWS = max_rows
            engine.step()
            for _ in range(2):
                start = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - start)
    print(f"{shape} shape, {batch} x {context} tokens, BLAS {blas.blas_info().name}, "
          f"{rounds} rounds:")
    for name, ts in times.items():
        print(f"  {name}: median decode step {statistics.median(ts) * 1e3:.1f} ms")
    llm.close()


if __name__ == "__main__":
    main()
