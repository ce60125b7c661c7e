"""The speculative suite: this engine with and without speculative decoding (mlx-lm has no
batched counterpart), on text that repeats and on text where drafts are rejected.

- ``repeats``: greedy decoding of a random checkpoint, whose text soon loops (as echoed
  documents and code edits repeat): n-gram drafts are mostly accepted.
- ``rejected``: sampling among 16 tokens (a logit bias) at T = 10, the bias 10 times the
  size so those 16 still hold the mass: the text repeats n-grams constantly, so drafts are
  proposed every step, but the next token is a nearly uniform fresh draw, so nearly every
  draft is rejected, whatever the checkpoint (at T = 1 the random hybrid checkpoint's
  logits picked one of the 16 almost always). What adaptive k has to make free.

Each configuration runs plain, speculative, plain, speculative; the better run of each
counts (the machine may be shared).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from . import draft_pair
from .engines import Ours, Req, measure
from .metrics import ratio, summary
from .shapes import make_prompts

WORKLOADS: dict[str, dict[str, Any]] = {
    "repeats": {},
    "rejected": {"temperature": 10.0, "logit_bias": {t: 300.0 for t in range(1000, 1016)}},
}


class _Sampled(Ours):
    """This engine with the workload's sampling parameters (greedy by default)."""

    def __init__(self, *args, sampling: dict[str, Any], **options) -> None:
        self.sampling = sampling
        super().__init__(*args, **options)

    def _params(self, gen_len: int):
        from ..sampling_params import SamplingParams

        return SamplingParams(**({"temperature": 0} | self.sampling), max_tokens=gen_len,
                              ignore_eos=True)

    def close(self) -> None:
        self.spec_stats = self.engine.get_stats().get("speculative")
        super().close()


def run(settings, batches: list[int], gen_len: int, spec: dict[str, Any],
        progress=print) -> list[dict[str, Any]]:
    """Decode tok/s with and without ``spec`` (engine options) per workload and batch size
    (the draft-model method: ``draft_pair.run``, also against mlx-lm)."""
    if spec.get("speculative") == "draft":
        with tempfile.TemporaryDirectory() as tmp:
            return draft_pair.run(settings, batches, gen_len, spec, Path(tmp), progress)
    rows = []
    for workload, sampling in WORKLOADS.items():
        for batch in batches:
            prompts = make_prompts(batch, 64, seed=77 + batch)
            reqs = [Req(f"r{i}", p, gen_len) for i, p in enumerate(prompts)]
            row = {"workload": workload, "batch": batch, "gen_len": gen_len,
                   "load_avg_before": os.getloadavg()[0]}
            for _ in range(2):
                for name, opts in (("plain", {}), ("speculative", spec)):
                    best = row.get(name)
                    got = _once(settings, reqs, batch, sampling, opts)
                    if best is None or got["decode_tok_s"] > best["decode_tok_s"]:
                        row[name] = got
            row["ratio"] = ratio(row["speculative"]["decode_tok_s"], row["plain"]["decode_tok_s"])
            row["load_avg_after"] = os.getloadavg()[0]
            stats = row["speculative"].get("stats") or {}
            progress(f"speculative {workload} x {batch}: decode tok/s plain "
                     f"{row['plain']['decode_tok_s']:.2f}, speculative "
                     f"{row['speculative']['decode_tok_s']:.2f} ({row['ratio']:.2f}x); acceptance "
                     f"{stats.get('acceptance_rate', 0):.2f}, tokens per step "
                     f"{stats.get('tokens_per_step', 0):.2f}")
            rows.append(row)
    return rows


def _once(settings, reqs: list[Req], batch: int, sampling: dict[str, Any],
          opts: dict[str, Any]) -> dict[str, Any]:
    max_tokens = sum(len(r.prompt) + r.gen_len for r in reqs)
    engines: list[_Sampled] = []

    def make() -> _Sampled:
        engines.append(_Sampled(settings.path, batch, max_tokens, sampling=sampling,
                                max_num_batched_tokens=settings.max_num_batched_tokens,
                                **settings.engine_options, **opts))
        return engines[-1]

    st, _ = measure(make, reqs)
    return summary(st) | {"stats": engines[0].spec_stats}


def table(rows: list[dict[str, Any]]) -> list[str]:
    if rows and "ours_draft" in rows[0]:
        return draft_pair.table(rows)
    lines = ["| workload | batch | decode tok/s plain | speculative | ratio | acceptance | "
             "tokens per speculating step | load avg |", "|---|" + "---:|" * 7]
    for r in rows:
        stats = r["speculative"].get("stats") or {}
        lines.append(f"| {r['workload']} | {r['batch']} | {r['plain']['decode_tok_s']:.2f} | "
                     f"{r['speculative']['decode_tok_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{stats.get('acceptance_rate', 0):.2f} | {stats.get('tokens_per_step', 0):.2f} | "
                     f"{r['load_avg_before']:.1f} |")
    return lines
