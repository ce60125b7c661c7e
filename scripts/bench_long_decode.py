"""Decode tok/s and prefill time at long prompts: this engine or mlx-lm's BatchGenerator.

usage: python scripts/bench_long_decode.py {ours,mlx-lm} PROMPT_LEN [BATCH=8] [GEN=34]

Random Qwen3 weights with Qwen3-0.6B's attention (16 q heads, 8 kv heads, head_dim 128) on
4 thin layers (hidden 256), fp32: the shape of issue 9, where KV traffic decides. Prints one
JSON line: ``prefill_s`` (until every request has its first token) and ``decode_tok_s``
(tokens produced after every request has its second token, over the time they took). Run
both engines on the same machine in one session and compare the ratio.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}


def checkpoint(folder: Path) -> Path:
    from nano_qwen3_mlx import bench

    bench.SHAPES["issue9"] = SHAPE
    return bench.random_checkpoint("issue9", "float32", folder)


def run_ours(path: Path, prompts: list[list[int]], gen: int) -> list[list[float]]:
    from nano_qwen3_mlx import LLM, SamplingParams

    need = len(prompts) * (len(prompts[0]) + gen) // 16 + 64
    llm = LLM(str(path), max_num_seqs=len(prompts), num_kv_blocks=need, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    llm.generate([prompts[0][:64]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    engine, times = llm.engine, {}
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step():
            times.setdefault(out.request_id, []).extend([time.perf_counter()] * len(out.token_ids))
    llm.close()
    return [times[i] for i in ids]


def run_mlx_lm(path: Path, prompts: list[list[int]], gen: int) -> list[list[float]]:
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    model, _ = load(str(path))
    gen_ = BatchGenerator(model, max_tokens=gen, completion_batch_size=len(prompts),
                          prefill_batch_size=len(prompts))
    uids, times, done = gen_.insert(prompts, [gen] * len(prompts)), {}, set()
    while len(done) < len(uids):
        for r in gen_.next_generated():
            times.setdefault(r.uid, []).append(time.perf_counter())
            if r.finish_reason is not None:
                done.add(r.uid)
    gen_.close()
    return [times[u] for u in uids]


def main() -> None:
    which, prompt_len = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    gen = int(sys.argv[4]) if len(sys.argv) > 4 else 34
    from nano_qwen3_mlx.bench import make_prompts

    mx.set_default_device(mx.cpu)
    prompts = make_prompts(batch, prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(Path(tmp))
        start = time.perf_counter()
        times = (run_ours if which == "ours" else run_mlx_lm)(path, prompts, gen)
    second = max(t[1] for t in times)  # every stream is decoding from here on
    after = [x for t in times for x in t if x > second]
    print(json.dumps({"engine": which, "prompt_len": prompt_len, "batch": batch, "gen": gen,
                      "prefill_s": round(max(t[0] for t in times) - start, 2),
                      "decode_tok_s": round(len(after) / (max(after) - second), 2)}))


if __name__ == "__main__":
    main()
