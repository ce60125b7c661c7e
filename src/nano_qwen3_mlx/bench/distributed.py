"""``nano-qwen3 bench`` under ``mlx.launch``: this engine only, the lengths suite, per rank.

Every rank runs this same code: rank 0 loads the engine and times the runs; another rank's
``LLM(...)`` follows rank 0's steps until rank 0 closes the engine (``distributed/``). The
random checkpoint is seeded, so each rank writes the same one for itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .engines import Ours, Req
from .metrics import mean
from .report import BenchPlan, machine
from .shapes import make_prompts, parameter_counts, random_checkpoint


def run(plan: BenchPlan, out: Path | None = None) -> dict[str, Any]:
    """Decode tok/s and TTFT per prompt length x batch on all ranks; rank 0's report."""
    report: dict[str, Any] = {"model": plan.model or f"random {plan.shape} ({plan.dtype})",
                              "machine_before": machine(), "engine_options": plan.engine_options}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(plan.model) if plan.model else random_checkpoint(plan.shape, plan.dtype, Path(tmp))
        report["parameters"] = parameter_counts(path)
        max_tokens = max(plan.prompt_lens) * max(plan.batches) + plan.gen_len * max(plan.batches)
        engine = Ours(path, max(plan.batches), max_tokens,
                      max_num_batched_tokens=plan.max_num_batched_tokens, **plan.engine_options)
        rows = []
        for length in plan.prompt_lens:
            for batch in plan.batches:
                reqs = [Req(f"{length}-{batch}-{i}", p, plan.gen_len)
                        for i, p in enumerate(make_prompts(batch, length))]
                st = engine.run(reqs)
                rows.append({"prompt_len": length, "batch": batch,
                             "decode_tok_s": st.decode_tok_s(), "ttft_mean_s": mean(st.ttfts())})
        report["distributed"] = engine.engine.get_stats()["distributed"]
        engine.close()  # the other ranks exit here
    report["lengths"], report["machine_after"] = rows, machine()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a table, with each rank's memory."""
    dist = report["distributed"]
    lines = [f"# nano-qwen3-mlx on {dist['world_size']} ranks ({dist['mode']}): {report['model']}",
             "", "| prompt | batch | decode tok/s | TTFT mean s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['prompt_len']} | {r['batch']} | {r['decode_tok_s']:.2f} | "
              f"{r['ttft_mean_s']:.3f} |" for r in report["lengths"]]
    lines += ["", "| rank | weights MB | KV pool MB | state pool MB |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['rank']} | {r['weights_bytes'] / 1e6:.1f} | {r['kv_bytes'] / 1e6:.1f} | "
              f"{r['state_bytes'] / 1e6:.1f} |" for r in dist["ranks"]]
    return "\n".join(lines)
