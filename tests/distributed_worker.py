"""Run by tests/test_distributed.py, alone or under ``mlx.launch``: generates with the
``LLM`` API on a checkpoint and prints one JSON line of what it got (rank 0 only prints)."""

from __future__ import annotations

import json
import sys

from nano_qwen3_mlx import LLM, SamplingParams

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12",
           "Once upon a time, in a land far away, there lived"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def generate_report(model: str, full: bool) -> dict:
    """What the ``LLM`` API gives on ``model`` (token ids, texts, stats), as a dict."""
    # full: n-gram speculation on too (its steps carry drafts), penalties, embeddings.
    llm = LLM(model, device="cpu", max_num_seqs=4, enable_prefix_caching=True,
              **({"speculative": "ngram"} if full else {}))
    greedy = SamplingParams(max_tokens=10, temperature=0)
    report = {"batch": [r["token_ids"] for r in llm.generate(PROMPTS, greedy)]}
    if full:
        long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 32)
        first, again = (llm.generate([long_prompt], greedy)[0] for _ in range(2))
        report["again"] = [first["token_ids"], again["token_ids"]]
        report["reused"] = llm.get_stats()["kv_cache"]["prefix_cache_reused_tokens"]
        structured = SamplingParams(max_tokens=24, temperature=0, json_schema=SCHEMA)
        report["json"] = llm.generate(["Give me a name as JSON:"], structured)[0]["generated_text"]
        seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, presence_penalty=0.5)
        report["sampled"] = llm.generate(["Tell me"], seeded)[0]["token_ids"]
        report["embedding"] = [round(x, 5) for x in llm.embed(["Hello there"])[0][:8]]
        # A hybrid model turns speculation off (its state cannot roll back).
        report["drafted"] = llm.get_stats().get("speculative", {}).get("draft_tokens", 0)
        report["snapshot_hits"] = llm.get_stats().get("state_cache", {})
    report["distributed"] = llm.get_stats()["distributed"]
    llm.close()
    return report


if __name__ == "__main__":
    print(json.dumps(generate_report(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "full")),
          flush=True)
