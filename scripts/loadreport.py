"""The load test's report: counts, latencies, the final ``/stats`` checks, the text form."""

from __future__ import annotations

from dataclasses import dataclass, field

from serverproc import percentile


@dataclass
class Report:
    sent: int = 0
    completed: int = 0
    aborted: int = 0  # dropped mid-stream by the client, on purpose
    failed: int = 0  # a good request that did not complete (non-2xx, error event, broken stream)
    rejected_busy: int = 0  # 429: allowed under load, but counted
    bad_sent: int = 0
    bad_rejected: int = 0  # a bad request answered 4xx with OpenAI error JSON (as designed)
    bad_accepted: int = 0  # a bad request that did not get a proper 4xx
    statuses: dict[str, int] = field(default_factory=dict)
    errors_by_status: dict[str, int] = field(default_factory=dict)
    num_5xx: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    tok_s: float = 0.0
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None
    peak_running: int = 0
    peak_active_mb: float = 0.0
    mlx_peak_mb: float = 0.0
    baseline_active_mb: float = 0.0
    final_active_mb: float = 0.0
    final_used_blocks: int | None = None
    final_cached_blocks: int | None = None
    final_running: int | None = None
    final_waiting: int | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # a few failure descriptions

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def summarize(report: Report, ttfts: list[float], final: dict,
              memory_tolerance_mb: float) -> None:
    """Fill in the rates, latencies, final state and checks once the load is over."""
    report.tok_s = report.completion_tokens / report.wall_s if report.wall_s else 0.0
    if ttfts:
        ttfts.sort()
        report.ttft_p50_s = percentile(ttfts, 50)
        report.ttft_p99_s = percentile(ttfts, 99)
    req, kv, mem = final["requests"], final["kv_cache"], final["memory"]
    report.final_running, report.final_waiting = req["running"], req["waiting"]
    report.final_used_blocks = kv["num_used_blocks"]
    report.final_cached_blocks = kv.get("num_cached_blocks")
    report.final_active_mb = mb(mem["active_bytes"])
    report.mlx_peak_mb = mb(mem.get("peak_bytes", 0))
    good = report.sent - report.bad_sent
    report.checks = {
        "no 5xx": report.num_5xx == 0,
        "every good request completed or was dropped by design":
            report.failed == 0 and report.completed + report.aborted + report.rejected_busy == good,
        "every bad request got a 4xx with OpenAI error JSON": report.bad_accepted == 0,
        "nothing running or waiting": req["running"] == 0 and req["waiting"] == 0,
        "no used KV blocks (prefix cache aside)": kv["num_used_blocks"] == 0,
        "memory back to baseline":
            report.final_active_mb <= report.baseline_active_mb + memory_tolerance_mb,
    }


def mb(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


def format_report(report: Report) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
    lines = [
        f"sent {report.sent} in {report.wall_s:.1f} s: completed {report.completed}, "
        f"aborted (client drops) {report.aborted}, failed {report.failed}, "
        f"429 {report.rejected_busy}, bad requests {report.bad_sent} "
        f"({report.bad_rejected} rejected with 4xx)",
        f"statuses {dict(sorted(report.statuses.items()))}; errors by status "
        f"{dict(sorted(report.errors_by_status.items()))}; 5xx {report.num_5xx}",
        f"{report.completion_tokens} completion tokens, {report.tok_s:.1f} tok/s; "
        f"TTFT p50 {ms(report.ttft_p50_s)}, p99 {ms(report.ttft_p99_s)}",
        f"after: running {report.final_running}, waiting {report.final_waiting}, used blocks "
        f"{report.final_used_blocks} (cached prefix blocks {report.final_cached_blocks}); "
        f"active memory {report.baseline_active_mb} MiB before, {report.final_active_mb} MiB "
        f"after, peak seen {report.peak_active_mb} MiB (MLX peak {report.mlx_peak_mb} MiB); "
        f"peak running {report.peak_running}",
    ]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in report.checks.items()]
    lines += [f"  sample failure: {s}" for s in report.samples[:10]]
    return "\n".join(lines)
