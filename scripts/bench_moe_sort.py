"""Time one MoE block's experts (``SwitchGLU``) per step size, tokens sorted by expert or not.

Answers two questions for ``models/switch_layers.py``: from how many routed (token, expert)
pairs does sorting pay (``SORT_THRESHOLD``), and do the rows of a batched decode step share
expert weight reads (time per token falling as the batch grows) on this backend.

    python scripts/bench_moe_sort.py [--experts 64 --top-k 8 --hidden 512 --moe-hidden 256]
"""

from __future__ import annotations

import argparse
import time

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx

from nano_qwen3_mlx.models import switch_layers
from nano_qwen3_mlx.models.switch_layers import SwitchGLU


def time_block(block: SwitchGLU, tokens: int, k: int, experts: int, sort: bool, reps: int) -> float:
    """Median seconds of one forward over ``tokens`` tokens routed to random experts."""
    x = mx.random.normal((tokens, block.gate_proj.weight.shape[-1]))
    scores = mx.random.uniform(shape=(tokens, experts))
    indices = mx.argpartition(scores, kth=-k, axis=-1)[:, -k:]
    mx.eval(x, indices)
    switch_layers.SORT_THRESHOLD = 0 if sort else 10**12
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        mx.eval(block(x, indices))
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times) // 2 - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-hidden", type=int, default=256)
    parser.add_argument("--tokens", default="1,2,4,8,16,32,128,512")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    mx.random.seed(0)
    block = SwitchGLU(args.hidden, args.moe_hidden, args.experts)
    mx.eval(block.parameters())
    print(f"device {mx.default_device()}, {args.experts} experts, top-{args.top_k}, "
          f"hidden {args.hidden}, expert hidden {args.moe_hidden}")
    print(f"{'tokens':>7} {'pairs':>6} {'unsorted ms':>12} {'sorted ms':>10} {'sorted/unsorted':>16} "
          f"{'us/token (unsorted)':>20}")
    for n in [int(t) for t in args.tokens.split(",")]:
        plain = time_block(block, n, args.top_k, args.experts, False, args.reps)
        ordered = time_block(block, n, args.top_k, args.experts, True, args.reps)
        print(f"{n:>7} {n * args.top_k:>6} {plain * 1e3:>12.2f} {ordered * 1e3:>10.2f} "
              f"{ordered / plain:>16.2f} {plain / n * 1e6:>20.0f}")


if __name__ == "__main__":
    main()
