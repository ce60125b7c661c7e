#!/usr/bin/env python3
"""The demo GGUF (SmolLM2-135M-Instruct Q4_1): load time, TTFT and decode tok/s, this engine
beside mlx-lm's Llama model fed the same tensors (mlx-lm cannot read GGUF files itself).

    python scripts/bench_demo_gguf.py [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nano_qwen3_mlx  # noqa: F401  (first: it loads the optimised BLAS before MLX)

# isort: split
import mlx.core as mx
import mlx.nn as nn

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.bench import time_stream
from nano_qwen3_mlx.models import gguf

GGUF = Path(__file__).resolve().parents[1] / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ours(max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    llm = LLM("smollm2-135m", num_kv_blocks=64, max_num_seqs=1)
    load_s = time.perf_counter() - start
    ids = llm.tokenizer.apply_chat_template(QUESTION, tokenize=True)
    llm.generate_single(ids, SamplingParams(temperature=0, max_tokens=2))  # warm-up
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ttft_s, decode_tok_s = time_stream(llm, ids, params)
    return {"load_s": load_s, "ttft_s": ttft_s, "decode_tok_s": decode_tok_s,
            "prompt_tokens": len(ids)}


def peer(max_tokens: int, prompt_ids: list[int]) -> dict[str, float]:
    from mlx_lm.generate import generate_step
    from mlx_lm.models import llama

    start = time.perf_counter()
    weights, metadata = gguf.read_gguf(GGUF)
    config = gguf.config_from_metadata(metadata, weights.keys())
    args = llama.ModelArgs.from_dict({**config, "model_type": "llama"})
    model = llama.Model(args)
    weights = model.sanitize({gguf.hf_name(k): v for k, v in weights.items()})
    nn.quantize(model, class_predicate=lambda p, m: gguf._quantization_of(p, m, weights))
    weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    for layer in model.layers:  # llama.cpp's Q/K row order = traditional RoPE
        layer.self_attn.rope.traditional = True
    mx.eval(model.parameters())
    load_s = time.perf_counter() - start
    for _ in zip(range(2), generate_step(mx.array(prompt_ids), model)):
        pass  # warm-up
    start, first, n = time.perf_counter(), None, 0
    for _, _ in zip(range(max_tokens), generate_step(mx.array(prompt_ids), model)):
        first = first or time.perf_counter()
        n += 1
    end = time.perf_counter()
    return {"load_s": load_s, "ttft_s": first - start, "decode_tok_s": (n - 1) / (end - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    a = ours(args.max_tokens)
    llm_ids = LLM("smollm2-135m", num_kv_blocks=8, max_num_seqs=1).tokenizer
    b = peer(args.max_tokens, llm_ids.apply_chat_template(QUESTION, tokenize=True))
    print(f"SmolLM2-135M-Instruct Q4_1, prompt {a['prompt_tokens']} tokens, {args.max_tokens} new, "
          f"{mx.default_device()}")
    print("| metric | nano-qwen3-mlx | mlx-lm | ratio |\n|---|---:|---:|---:|")
    for key, label in (("load_s", "load s"), ("ttft_s", "TTFT s"), ("decode_tok_s", "decode tok/s")):
        print(f"| {label} | {a[key]:.3f} | {b[key]:.3f} | {a[key] / b[key]:.2f}x |")


if __name__ == "__main__":
    main()
