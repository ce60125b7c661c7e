"""The report: run the chosen suites, collect one JSON document, print markdown tables."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..blas import blas_info
from . import chat, speculative, suites
from .shapes import parameter_counts, random_checkpoint

SUITES = ("lengths", "mixed", "chat", "speculative")


@dataclass(slots=True)
class BenchPlan:
    """Everything ``nano-qwen3 bench`` was asked for."""

    model: str | None = None
    shape: str = "small"
    dtype: str = "float32"
    suites: list[str] = field(default_factory=lambda: ["lengths"])
    prompt_lens: list[int] = field(default_factory=lambda: [128])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    gen_len: int = 16
    max_num_batched_tokens: int = 2048
    mixed: dict[str, int] = field(default_factory=dict)  # suites.mixed keyword arguments
    chat: chat.ChatPlan = field(default_factory=chat.ChatPlan)
    engine_options: dict[str, Any] = field(default_factory=dict)  # this engine's only
    # The speculative suite's options (``speculative``, ``num_speculative_tokens``).
    speculative: dict[str, Any] = field(default_factory=lambda: {"speculative": "ngram"})


def machine() -> dict[str, Any]:
    """Where the numbers come from, and how busy the machine was."""
    from importlib.metadata import version

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(mx.default_device()),
            "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "python": platform.python_version(),
            "load_avg": os.getloadavg(), "blas": blas_info().as_dict()}


def run(plan: BenchPlan, out: Path | None = None, progress=None) -> dict[str, Any]:
    """Run ``plan.suites`` on both engines; return (and write to ``out``) the report."""
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    report: dict[str, Any] = {"model": plan.model or f"random {plan.shape} ({plan.dtype})",
                              "machine_before": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(plan.model) if plan.model else random_checkpoint(plan.shape, plan.dtype, Path(tmp))
        report["parameters"] = parameter_counts(path)
        settings = suites.Settings(path, plan.max_num_batched_tokens, plan.engine_options)
        report["engine_options"] = plan.engine_options
        if "speculative" in plan.suites:
            report["speculative_options"] = plan.speculative
        if "lengths" in plan.suites:
            report["lengths"] = suites.lengths(settings, plan.prompt_lens, plan.batches,
                                               plan.gen_len, progress)
        if "mixed" in plan.suites:
            report["mixed"] = suites.mixed(settings, progress=progress, **plan.mixed)
        if "chat" in plan.suites:
            report["chat"] = chat.run(path, plan.chat, progress)
        if "speculative" in plan.suites:
            report["speculative"] = speculative.run(settings, plan.batches, plan.gen_len,
                                                    plan.speculative, progress)
    report["machine_after"] = machine()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    return report


# ---- markdown -----------------------------------------------------------------------------
def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}x"


def lengths_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| prompt | batch | decode tok/s ours | mlx-lm | ratio | mean TTFT s ours | mlx-lm | "
             "ratio | peak MB ours | mlx-lm | ratio |", "|" + "---:|" * 11]
    for r in rows:
        o, p, q = r["ours"], r["mlx_lm"], r["ratios"]
        lines.append(f"| {r['prompt_len']} | {r['batch']} | {_f(o['decode_tok_s'])} | {_f(p['decode_tok_s'])} | "
                     f"{_x(q['decode_tok_s'])} | {_f(o['ttft_mean_s'])} | {_f(p['ttft_mean_s'])} | "
                     f"{_x(q['ttft_mean_s'])} | {o['peak_memory_bytes'] / 1e6:.0f} | "
                     f"{p['peak_memory_bytes'] / 1e6:.0f} | {_x(q['peak_memory_bytes'])} |")
    kv = rows[0] if rows else None
    if kv:
        lines.append(f"\nKV bytes per token: ours {kv['ours']['kv_bytes_per_token']}, mlx-lm "
                     f"{kv['mlx_lm']['kv_bytes_per_token']} ({_x(kv['ratios']['kv_bytes_per_token'])}).")
    return lines


def mixed_table(row: dict[str, Any]) -> list[str]:
    lines = [f"{row['running']} streams ({row['short_len']}-token prompts, {row['gen_len']} tokens each) "
             f"decoding while {row['num_long']} prompts of {row['long_len']} tokens arrive:", "",
             "| | ours | mlx-lm | ratio |", "|---|---:|---:|---:|"]
    for key, label in (("itl_p50_s", "inter-token p50 s"), ("itl_p99_s", "inter-token p99 s"),
                       ("itl_p99_over_p50", "p99 / p50"), ("long_ttft_mean_s", "long prompts' mean TTFT s")):
        lines.append(f"| {label} | {_f(row['ours'][key], 3)} | {_f(row['mlx_lm'][key], 3)} | "
                     f"{_x(row['ratios'].get(key))} |")
    lines.append(f"| peak memory MB | {row['ours']['peak_memory_bytes'] / 1e6:.0f} | "
                 f"{row['mlx_lm']['peak_memory_bytes'] / 1e6:.0f} | {_x(row['ratios']['peak_memory_bytes'])} |")
    return lines


def chat_tables(section: dict[str, Any]) -> list[str]:
    ours, peer = section["ours"], section["mlx_lm"]
    lines = ["| turn | prompt tokens | shared with previous turn (template) | prefill computed ours | "
             "mlx-lm | TTFT s ours | mlx-lm | ratio |", "|" + "---:|" * 8]
    for k, (a, b) in enumerate(zip(ours["turns"], peer["turns"])):
        lines.append(f"| {k + 1} | {a['prompt_tokens']} | {ours['template_reuse'][k]} | "
                     f"{a['computed_tokens']} | {b['computed_tokens']} | {_f(a['ttft_s'])} | "
                     f"{_f(b['ttft_s'])} | {_x(section['ratios']['turn_ttft'][k])} |")
    lines += ["", "| round | prompt tokens | prefill computed ours | mlx-lm | mean TTFT s ours | mlx-lm | "
              "ratio | max TTFT s ours | mlx-lm |", "|---|" + "---:|" * 8]
    for a, b in zip(ours["shared_system"], peer["shared_system"]):
        lines.append(f"| {a['round']} | {a['prompt_tokens']} | {a['prefill_computed']} | "
                     f"{b['prefill_computed']} | {_f(a['ttft_mean_s'])} | {_f(b['ttft_mean_s'])} | "
                     f"{_x(section['ratios']['shared_system_ttft_mean'][a['round']])} | "
                     f"{_f(a['ttft_max_s'])} | {_f(b['ttft_max_s'])} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine_before"]
    blas = m.get("blas", {}).get("name", "unknown")
    lines = [f"{report['model']}; {m['platform']}, {m['cpus']} CPUs, {m['device']}, BLAS {blas} "
             f"(both engines), mlx {m['mlx']}, "
             f"mlx-lm {m['mlx_lm']}; load average before {m['load_avg'][0]:.1f}, after "
             f"{report['machine_after']['load_avg'][0]:.1f}. Ratios are ours / mlx-lm "
             "(tok/s: higher is better; TTFT, latency, memory: lower is better)."]
    params = report.get("parameters")
    if params:
        lines.append(f"Parameters: {params['active'] / 1e6:.1f}M active of {params['total'] / 1e6:.1f}M.")
    if report.get("engine_options"):
        opts = ", ".join(f"{k}={v}" for k, v in report["engine_options"].items())
        lines.append(f"This engine's options (mlx-lm has no counterpart): {opts}.")
    if "lengths" in report:
        lines += ["", *lengths_table(report["lengths"])]
    if "mixed" in report:
        lines += ["", *mixed_table(report["mixed"])]
    if "chat" in report:
        lines += ["", *chat_tables(report["chat"])]
    if "speculative" in report:
        lines += ["", "This engine with and without speculative decoding "
                  f"({report.get('speculative_options', 'ngram')}):", "",
                  *speculative.table(report["speculative"])]
    return "\n".join(lines)
