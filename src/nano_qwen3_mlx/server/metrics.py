"""Prometheus metrics; each app owns its registry so several apps (tests) never collide."""

from __future__ import annotations

import collections
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PREFIX = "nano_qwen3"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
# The prefix cache's disk tier (``stats["disk_cache"]``), 0 without one; counts since start.
_DISK_GAUGES = {
    "hits": "Block files read and verified", "tokens_loaded": "Prompt tokens loaded from disk",
    "bytes": "Bytes of block files on disk", "writes_pending": "Block writes queued",
    "writes_skipped": "Block writes skipped (write queue full)",
    "corrupt": "Corrupt, truncated or foreign block files deleted",
    "evictions": "Block files evicted for the cap",
}


class ServerMetrics:
    """Request counters and latency histograms, plus engine gauges refreshed at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{_PREFIX}_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(f"{_PREFIX}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(
            f"{_PREFIX}_generation_tokens", "Tokens generated", registry=r
        )
        self.ttft = Histogram(
            f"{_PREFIX}_time_to_first_token_seconds", "Time to first token", registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            f"{_PREFIX}_inter_token_latency_seconds", "Time between streamed tokens", registry=r,
            buckets=_ITL_BUCKETS,
        )
        self.e2e = Histogram(
            f"{_PREFIX}_request_duration_seconds", "Whole request latency", ["route"], registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.waiting = Gauge(f"{_PREFIX}_requests_waiting", "Requests queued", registry=r)
        self.running = Gauge(f"{_PREFIX}_requests_running", "Sequences being decoded", registry=r)
        self.kv_used = Gauge(f"{_PREFIX}_kv_cache_used_blocks", "KV blocks in use", registry=r)
        self.kv_total = Gauge(f"{_PREFIX}_kv_cache_blocks", "KV blocks in the pool", registry=r)
        self.kv_cap = Gauge(f"{_PREFIX}_kv_cache_cap_blocks", "Most KV blocks the pool may grow to",
                            registry=r)
        self.kv_usage = Gauge(f"{_PREFIX}_kv_cache_usage_ratio", "Used / total KV blocks", registry=r)
        self.disk = {name: Gauge(f"{_PREFIX}_prefix_cache_disk_{name}", text, registry=r)
                     for name, text in _DISK_GAUGES.items()}
        # Several models (server/management/pool.py): the same readings per model.
        per_model = {"loaded": "1 while the model is loaded",
                     "memory_bytes": "Weights + KV pool of the model",
                     "requests_waiting": "Requests queued", "requests_running": "Sequences decoded",
                     "kv_cache_used_blocks": "KV blocks in use"}
        self.per_model = {name: Gauge(f"{_PREFIX}_model_{name}", help_, ["model"], registry=r)
                          for name, help_ in per_model.items()}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.e2e.labels(route=route).observe(seconds)

    def update_engine(self, stats: dict[str, Any]) -> None:
        """Copy engine stats (``AsyncLLM.get_stats()``) into the gauges."""
        requests = stats.get("requests", {})
        kv = stats.get("kv_cache", {})
        self.waiting.set(requests.get("waiting", 0))
        self.running.set(requests.get("running", 0))
        total, used = kv.get("num_blocks", 0), kv.get("num_used_blocks", 0)
        self.kv_total.set(total)
        self.kv_cap.set(kv.get("cap_blocks", total))
        self.kv_used.set(used)
        self.kv_usage.set(used / total if total else 0.0)
        disk = stats.get("disk_cache", {})
        for name, gauge in self.disk.items():
            gauge.set(disk.get(name, 0))

    def update_models(self, stats: dict[str, dict[str, Any] | None],
                      memory: dict[str, int]) -> None:
        """Per-model gauges (``stats[id]`` None for a model not loaded); the plain engine
        gauges get the sums over the loaded models."""
        totals: dict[str, Any] = {"requests": collections.Counter(), "kv_cache": collections.Counter()}
        for model_id, one in stats.items():
            one = one or {}
            requests, kv = one.get("requests", {}), one.get("kv_cache", {})
            readings = {"loaded": int(bool(one)), "memory_bytes": memory.get(model_id, 0),
                        "requests_waiting": requests.get("waiting", 0),
                        "requests_running": requests.get("running", 0),
                        "kv_cache_used_blocks": kv.get("num_used_blocks", 0)}
            for name, value in readings.items():
                self.per_model[name].labels(model=model_id).set(value)
            totals["requests"].update({k: requests.get(k, 0) for k in ("waiting", "running")})
            totals["kv_cache"].update({k: kv.get(k, 0) for k in ("num_blocks", "num_used_blocks",
                                                                 "cap_blocks")})
        self.update_engine(totals)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
