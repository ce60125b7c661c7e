"""Where one batched decode step's time goes, for this engine and for mlx-lm.

usage: python scripts/bench_decode_parts.py [CONTEXT=2048] [BATCH=8] [SHAPE=kv] [KV_DTYPE=float32] [BLOCK]

``KV_DTYPE`` (``int8``, ``int4``): the step estimate uses our attention over a quantized pool
(``decode_gather_qmm``, ``--kv-cache-dtype``); mlx-lm's stays float32. ``BLOCK``: tokens per
KV block (default: the engine's default on this backend, ``default_block_size()``).

Times, with the bench shape's sizes (``nano_qwen3_mlx.bench.SHAPES``, float32):

- the output layer, ``(B, hidden) @ embed.T`` over Qwen3's 151,936-token vocabulary (tied
  embeddings, logits only for the rows that sample): mlx-lm's MLX matmul; ours as a decode
  step runs it on a CPU with OpenBLAS (one row: the library's ``sgemv``; several: OpenBLAS
  on one thread, the vocabulary split over the streams);
- the rest of a layer (q/k/v/o projections and the MLP): the same in both engines;
- one layer's decode attention: ours reads the paged pool in place
  (``engine.paged_attention.decode_attention``, on CPU one stream per core; also timed on one
  stream, as before the split), mlx-lm runs SDPA
  over its contiguous per-sequence cache (allocated in steps of 256 positions, read as a
  slice). Both are timed over all the shape's layers, each with its own cache, as in a step,
  so no layer finds its K/V in the CPU's caches from the call before (a single layer's
  34 MB at 512 x 8 would partly stay there and read faster than memory).

It then adds them into a step per engine, prints the most ours could gain if its attention
took no time at all (on a machine where the output layer dominates, no attention design
reaches a large decode ratio), and, for a float32 and an int8 pool, our attention per layer
as a fraction of the bandwidth limit: the time to read its K/V bytes (as stored: int8 with
its scales and biases) once at the read bandwidth measured here, divided by the time it
takes. Compare the step estimates with the lengths suite's measured decode tok/s
(``nano-qwen3 bench --shape kv --suite lengths``).
"""

from __future__ import annotations

import sys
import time

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx
import numpy as np

from nano_qwen3_mlx import blas
from nano_qwen3_mlx.bench import SHAPES
from nano_qwen3_mlx.config import default_block_size
from nano_qwen3_mlx.engine import split_linear
from nano_qwen3_mlx.engine.kv_cache import KVLayout, PagedKVCache
from nano_qwen3_mlx.engine.paged_attention import DecodeGroup, decode_attention

VOCAB = 151936


def timed(f, repeats: int = 5) -> float:
    """Milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        mx.eval(f())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(f())
    return (time.perf_counter() - start) / repeats * 1e3


def read_bandwidth(num_bytes: int = 1 << 28) -> float:
    """Bytes per second this machine's memory delivers: the fastest of a few reads of
    ``num_bytes`` by numpy (BLAS ``sdot``, a sum, a copy counted twice); MLX's own CPU
    reductions are compute-bound here (a float32 sum reads ~3 GB/s). Decode attention must
    read each K/V byte once, so this bounds it."""
    x = np.random.default_rng(0).random(num_bytes // 4, dtype=np.float32)
    y = np.empty_like(x)
    best = 0.0
    for f, moved in ((lambda: x @ x, 1), (lambda: x.sum(), 1), (lambda: np.copyto(y, x), 2)):
        f()
        start = time.perf_counter()
        for _ in range(5):
            f()
        best = max(best, moved * num_bytes * 5 / (time.perf_counter() - start))
    return best


def layer_rest(shape: dict, batch: int):
    """The projections and the MLP of one layer on ``batch`` rows."""
    h, q, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    d, inter = shape["head_dim"], shape["intermediate_size"]
    w = {n: mx.random.normal(s) * 0.02 for n, s in {
        "q": (q * d, h), "k": (kv * d, h), "v": (kv * d, h), "o": (h, q * d),
        "gate": (inter, h), "up": (inter, h), "down": (h, inter)}.items()}
    x, attn_out = mx.random.normal((batch, h)), mx.random.normal((batch, q * d))
    mx.eval(w, x, attn_out)

    def run():
        qkv = [x @ w[n].T for n in ("q", "k", "v")]
        y = x + attn_out @ w["o"].T
        return [*qkv, y + (mx.sigmoid(y @ w["gate"].T) * (y @ w["up"].T)) @ w["down"].T]
    return run


def output_layer_ours(embed: mx.array, x: mx.array):
    """Our output layer as a decode step runs it on this CPU: one row as the BLAS's
    ``sgemv`` (``blas.matvec``), several with OpenBLAS on one thread and the vocabulary split
    over the streams (``engine/split_linear.py``); elsewhere MLX's matmul, as mlx-lm's."""
    if x.shape[0] == 1:
        if blas.matvec(embed, x) is None:  # no optimised BLAS loaded here (or a GPU)
            return lambda: x @ embed.T
        return lambda: blas.matvec(embed, x)

    def split() -> mx.array:
        if not blas.set_single_threaded(True):
            return x @ embed.T
        try:
            out = split_linear.split_product(x, embed)
            mx.eval(out)
            return out
        finally:
            blas.set_single_threaded(False)
    return split


def attention_ours(shape: dict, batch: int, context: int, kv_dtype: str, block: int,
                   parts: int | None = None):
    """Our decode attention over ``context`` keys per sequence in every layer of the shape
    (each layer its own pool, as in a step: the caches are cold for each), and the K/V
    bytes one layer reads."""
    n_kv, d, hq = shape["num_key_value_heads"], shape["head_dim"], shape["num_attention_heads"]
    layers, nb = shape["num_hidden_layers"], -(-context // block)
    layout = KVLayout.parse(kv_dtype, mx.float32, d)
    cache = PagedKVCache(layers, batch * nb, block, n_kv, d, mx.float32, bits=layout.bits,
                         group_size=layout.group_size)
    slots = mx.arange(batch * nb * block)
    for layer in range(layers):
        kv = mx.random.normal((2, batch * nb * block, n_kv, d))
        cache.write(layer, slots // block, slots % block, kv[0], kv[1])
        mx.eval(cache.k_parts, cache.v_parts)
    tables = np.arange(batch * nb, dtype=np.int32).reshape(batch, nb)  # as a fresh run lays them
    group = DecodeGroup.build(tables, np.full(batch, context, np.int32), cache, parts)
    q = mx.random.normal((batch, hq, 1, d))
    mx.eval(q)
    return (lambda: [decode_attention(cache, layer, q, group, d ** -0.5) for layer in range(layers)],
            cache.bytes_per_token // layers * context * batch)


def attention_mlx_lm(shape: dict, batch: int, context: int):
    """mlx-lm's SDPA over its contiguous cache, every layer of the shape."""
    n_kv, d, hq = shape["num_key_value_heads"], shape["head_dim"], shape["num_attention_heads"]
    alloc = -(-context // 256) * 256  # mlx-lm's KVCache grows in steps of 256 positions
    kv = [[mx.random.normal((batch, n_kv, alloc, d)) for _ in range(2)]
          for _ in range(shape["num_hidden_layers"])]
    q = mx.random.normal((batch, hq, 1, d))
    mx.eval(kv, q)
    return lambda: [mx.fast.scaled_dot_product_attention(
        q, k[..., :context, :], v[..., :context, :], scale=d ** -0.5) for k, v in kv]


def main() -> None:
    args = sys.argv[1:] + [None] * 5
    context, batch = int(args[0] or 2048), int(args[1] or 8)
    name, kv_dtype = args[2] or "kv", args[3] or "float32"
    block = int(args[4] or default_block_size())
    shape, mx_device = SHAPES[name], mx.default_device()
    layers = shape["num_hidden_layers"]
    embed = mx.random.normal((VOCAB, shape["hidden_size"])) * 0.02
    x = mx.random.normal((batch, shape["hidden_size"]))
    mx.eval(embed, x)
    head = timed(lambda: x @ embed.T)
    head_ours = timed(output_layer_ours(embed, x))
    rest = timed(layer_rest(shape, batch))
    peer = timed(attention_mlx_lm(shape, batch, context)) / layers
    attention = {}  # KV dtype -> (ms per layer, K/V bytes one layer reads)
    for dt in dict.fromkeys((kv_dtype, "float32", "int8")):
        attend, kv_bytes = attention_ours(shape, batch, context, dt, block)
        attention[dt] = timed(attend) / layers, kv_bytes
    one_stream = timed(attention_ours(shape, batch, context, "float32", block, parts=1)[0]) / layers
    ours = attention[kv_dtype][0]
    step_ours, step_peer = head_ours + layers * (rest + ours), head + layers * (rest + peer)
    print(f"shape {name}, batch {batch}, context {context}, float32 model, our KV {kv_dtype} in "
          f"{block}-token blocks, {mx_device}; ms per call\n")
    print("| part | ours | mlx-lm |\n|---|---:|---:|")
    print(f"| output layer | {head_ours:.1f} | {head:.1f} |")
    print(f"| rest of a layer x {layers} (same matmuls) | {layers * rest:.1f} | {layers * rest:.1f} |")
    print(f"| decode attention x {layers} | {layers * ours:.1f} | {layers * peer:.1f} |")
    print(f"| step (sum) | {step_ours:.1f} | {step_peer:.1f} |")
    print(f"\ndecode ratio from these parts: {step_peer / step_ours:.2f}x; with attention "
          f"free for us: at most {step_peer / (head_ours + layers * rest):.2f}x. Output layer: "
          f"{head / step_peer:.0%} of mlx-lm's step.")
    limit = read_bandwidth()
    print(f"\nDecode attention per layer against the bandwidth limit (K/V bytes / "
          f"{limit / 1e9:.1f} GB/s, this machine's read bandwidth):\n")
    print("| KV | reads | limit | takes | of the limit |\n|---|---:|---:|---:|---:|")
    rows = [(f"ours, {dt}", ms, kv_bytes) for dt, (ms, kv_bytes) in attention.items()]
    rows.append(("ours, float32, one stream", one_stream, attention["float32"][1]))
    rows.append(("mlx-lm, float32", peer, attention["float32"][1]))
    for label, ms, kv_bytes in rows:
        print(f"| {label} | {kv_bytes / 1e6:.0f} MB | {kv_bytes / limit * 1e3:.1f} ms | "
              f"{ms:.1f} ms | {kv_bytes / limit * 1e3 / ms:.0%} |")


if __name__ == "__main__":
    main()
