"""Run by tests/test_distributed.py, alone or under ``mlx.launch``: generates with the
``LLM`` API on each checkpoint it is given and prints one JSON line (a list: one report per
checkpoint) of what it got; rank 0 only prints. Usage: ``distributed_worker.py KIND=PATH ...``
with KIND ``full`` (everything), ``states`` (everything but structured output, whose grammar
set-up costs seconds: for a hybrid model's state pool), ``batch`` (one batch) or ``pipeline``
(one batch, the model split by layers). Several engines run one after the other in one job: the other ranks follow
each one until rank 0 closes it (``Follower.follow(exit_when_stopped=False)``)."""

from __future__ import annotations

import json
import sys

from nano_qwen3_mlx import LLM, SamplingParams
from nano_qwen3_mlx.config import engine_config
from nano_qwen3_mlx.distributed.world import get_world
from nano_qwen3_mlx.engine.llm_engine import LLMEngine

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12",
           "Once upon a time, in a land far away, there lived"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def generate_report(model: str, kind: str) -> dict:
    """What the ``LLM`` API gives on ``model`` (token ids, texts, stats), as a dict; on a
    rank other than 0, follows rank 0's engine and returns {}."""
    # full: n-gram speculation on too (its steps carry drafts), penalties, embeddings.
    full = kind in ("full", "states")
    config = engine_config(None, model, {
        "device": "cpu", "max_num_seqs": 4, "enable_prefix_caching": True,
        "pipeline": kind == "pipeline", **({"speculative": "ngram"} if full else {})})
    if get_world().is_follower:
        LLMEngine(config).dist.follow(exit_when_stopped=False)
        return {}
    llm = LLM(config=config)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    report = {"batch": [r["token_ids"] for r in llm.generate(PROMPTS, greedy)]}
    if full:
        long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 32)
        first, again = (llm.generate([long_prompt], greedy)[0] for _ in range(2))
        report["again"] = [first["token_ids"], again["token_ids"]]
        report["reused"] = llm.get_stats()["kv_cache"]["prefix_cache_reused_tokens"]
        if kind == "full":
            structured = SamplingParams(max_tokens=10, temperature=0, json_schema=SCHEMA)
            report["json"] = llm.generate(["Give me a name as JSON:"],
                                          structured)[0]["generated_text"]
        seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, presence_penalty=0.5)
        report["sampled"] = llm.generate(["Tell me"], seeded)[0]["token_ids"]
        report["embedding"] = [round(x, 5) for x in llm.embed(["Hello there"])[0][:8]]
        # A hybrid model turns speculation off (its state cannot roll back).
        report["drafted"] = llm.get_stats().get("speculative", {}).get("draft_tokens", 0)
        report["snapshot_hits"] = llm.get_stats().get("state_cache", {})
    report["distributed"] = llm.get_stats()["distributed"]
    report["parameters"] = llm.get_stats()["parameters"]
    report["weights_bytes"] = llm.get_stats()["memory"]["weights_bytes"]
    llm.close()
    return report


if __name__ == "__main__":
    reports = [generate_report(path, kind) for kind, path in
               (arg.split("=", 1) for arg in sys.argv[1:])]
    if not get_world().is_follower:
        print(json.dumps(reports), flush=True)
