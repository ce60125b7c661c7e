"""The engine-level runs: prompt lengths x batch sizes, and mixed arrival.

Each configuration loads mlx-lm, runs it, drops it, then does the same with this engine, so
both see the same machine state and each one's memory footprint is its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines import MlxLm, Ours, Req, measure
from .metrics import StreamTimes, percentile, ratio, summary
from .shapes import make_prompts

ENGINES = ("ours", "mlx_lm")


@dataclass(slots=True)
class Settings:
    """What both engines are given: the checkpoint and this engine's scheduler options."""

    path: Path
    max_num_batched_tokens: int = 2048  # also mlx-lm's prefill_step_size: same chunking
    engine_options: dict[str, Any] = field(default_factory=dict)

    def makers(self, max_seqs: int, max_tokens: int) -> dict[str, Any]:
        opts = {"max_num_batched_tokens": self.max_num_batched_tokens, **self.engine_options}
        return {"mlx_lm": lambda: MlxLm(self.path, max_seqs, self.max_num_batched_tokens),
                "ours": lambda: Ours(self.path, max_seqs, max_tokens, **opts)}


def _both(settings: Settings, reqs: list[Req], max_seqs: int, metrics) -> dict[str, Any]:
    """Run ``reqs`` on mlx-lm, then on this engine; ``metrics(StreamTimes)`` -> numbers."""
    max_tokens = sum(len(r.prompt) + r.gen_len for r in reqs)
    row: dict[str, Any] = {}
    for name, make in settings.makers(max_seqs, max_tokens).items():
        st, foot = measure(make, reqs)
        row[name] = metrics(st) | {"peak_memory_bytes": foot.peak_bytes,
                                   "kv_bytes_per_token": foot.kv_bytes_per_token}
    row["ratios"] = {k: ratio(row["ours"][k], row["mlx_lm"][k])
                     for k, v in row["ours"].items() if isinstance(v, (int, float))}
    return row


def lengths(settings: Settings, prompt_lens: list[int], batches: list[int], gen_len: int,
            progress=print) -> list[dict[str, Any]]:
    """Decode tok/s, TTFT and memory for each (prompt length, batch size)."""
    rows = []
    for length in prompt_lens:
        for batch in batches:
            prompts = make_prompts(batch, length, seed=1000 * length + batch)
            reqs = [Req(f"r{i}", p, gen_len) for i, p in enumerate(prompts)]
            row = {"prompt_len": length, "batch": batch, "gen_len": gen_len,
                   **_both(settings, reqs, batch, summary)}
            progress(f"prompt {length} x {batch}: decode tok/s ours {row['ours']['decode_tok_s']:.2f} "
                     f"mlx-lm {row['mlx_lm']['decode_tok_s']:.2f}; TTFT ours "
                     f"{row['ours']['ttft_mean_s']:.2f} s mlx-lm {row['mlx_lm']['ttft_mean_s']:.2f} s")
            rows.append(row)
    return rows


def mixed(settings: Settings, running: int = 4, short_len: int = 128, long_len: int = 2048,
          num_long: int = 2, gen_len: int = 24, progress=print) -> dict[str, Any]:
    """``running`` streams decode while ``num_long`` prompts of ``long_len`` tokens arrive
    (the first once each stream has ~4 tokens, the next ones 8 tokens per stream later):
    inter-token latency of the running streams from the first arrival on."""
    short = make_prompts(running, short_len, seed=7)
    long = make_prompts(num_long, long_len, seed=8)
    reqs = [Req(f"run{i}", p, gen_len) for i, p in enumerate(short)]
    reqs += [Req(f"long{i}", p, 4, after_tokens=running * (4 + 8 * i)) for i, p in enumerate(long)]
    streams = [r.name for r in reqs if not r.after_tokens]

    def metrics(st: StreamTimes) -> dict[str, float]:
        first_arrival = min(st.arrived[r.name] for r in reqs if r.after_tokens)
        gaps = st.itls(streams, after=first_arrival)
        p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
        return {"itl_p50_s": p50, "itl_p99_s": p99, "itl_p99_over_p50": p99 / p50,
                "itl_max_s": max(gaps, default=float("nan")),
                "long_ttft_mean_s": sum(st.ttfts([r.name for r in reqs if r.after_tokens])) / num_long}

    row = {"running": running, "short_len": short_len, "long_len": long_len,
           "num_long": num_long, "gen_len": gen_len, **_both(settings, reqs, running + num_long, metrics)}
    progress(f"mixed: ITL p50/p99 ours {row['ours']['itl_p50_s']:.3f}/{row['ours']['itl_p99_s']:.3f} s, "
             f"mlx-lm {row['mlx_lm']['itl_p50_s']:.3f}/{row['mlx_lm']['itl_p99_s']:.3f} s")
    return row
