#!/usr/bin/env python3
"""Constrained-decoding overhead: throughput of a batch where half the rows follow a JSON
schema, as a ratio to the same batch with every row free. Both batches generate exactly the
same number of tokens (free rows ignore EOS; the schema cannot complete within max_tokens).

    python scripts/bench_grammar.py [--model smollm2-135m] [--requests 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nano_qwen3_mlx import LLM, SamplingParams

# Records with bounded fields, at least 500 of them: the grammar stays busy (strings, integers,
# enums, separators) and never lets the row stop early.
SCHEMA = {"type": "array", "minItems": 500, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "role": {"enum": ["admin", "user", "guest"]}}}}
PROMPT = [{"role": "user", "content": "List the people in the team as JSON records."}]


def batch_params(n: int, max_tokens: int, constrained: bool) -> list[SamplingParams]:
    free = SamplingParams(temperature=0.7, seed=0, max_tokens=max_tokens, ignore_eos=True)
    json_rows = free.clone(json_schema=SCHEMA, ignore_eos=False)
    return [json_rows if constrained and i % 2 else free.clone(seed=i) for i in range(n)]


def throughput(llm: LLM, prompt: list[int], params: list[SamplingParams]) -> float:
    start = time.perf_counter()
    results = llm.generate([prompt] * len(params), params)
    tokens = sum(len(r["token_ids"]) for r in results)
    assert tokens == sum(p.max_tokens for p in params), "a row stopped early"
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=args.requests)
    prompt = llm.tokenizer.apply_chat_template(PROMPT, tokenize=True)
    free = batch_params(args.requests, args.max_tokens, constrained=False)
    half = batch_params(args.requests, args.max_tokens, constrained=True)
    throughput(llm, prompt, half[:2])  # warm-up: compiles the grammar, builds the token trie
    runs: dict[str, list[float]] = {"free": [], "half": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        runs["free"].append(throughput(llm, prompt, free))
        runs["half"].append(throughput(llm, prompt, half))
    free_tps, half_tps = statistics.median(runs["free"]), statistics.median(runs["half"])
    print(f"model={args.model} requests={args.requests} max_tokens={args.max_tokens} "
          f"repeats={args.repeats}")
    print(f"unconstrained: {free_tps:.1f} tok/s   half constrained: {half_tps:.1f} tok/s   "
          f"ratio: {half_tps / free_tps:.3f}")


if __name__ == "__main__":
    main()
