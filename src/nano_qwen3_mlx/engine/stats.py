"""Counters and latency windows for ``get_stats()`` and ``/metrics``."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


def mib(num_bytes: float) -> str:
    """A memory size as the log and the banner both write it: MiB, one decimal."""
    return f"{num_bytes / 2**20:.1f} MiB"


def percentiles(values: deque[float] | list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean())}


class EngineStats:
    """What happened so far; latencies in seconds over the last ``window`` samples."""

    def __init__(self, window: int = 2048, rate_window_s: float = 10.0) -> None:
        self.started = time.monotonic()
        self.num_finished = 0
        self.num_aborted = 0
        self.num_errors = 0
        self.num_prompt_tokens = 0
        self.num_computed_prompt_tokens = 0  # prefill tokens actually run (prefix hits skip)
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.ttft: deque[float] = deque(maxlen=window)
        self.itl: deque[float] = deque(maxlen=window)
        self.e2e: deque[float] = deque(maxlen=window)
        self._token_times: deque[tuple[float, int]] = deque()
        self._rate_window_s = rate_window_s

    def record_tokens(self, num: int, now: float) -> None:
        self.num_generated_tokens += num
        self._token_times.append((now, num))
        while self._token_times and now - self._token_times[0][0] > self._rate_window_s:
            self._token_times.popleft()

    def record_finish(self, reason: str, e2e: float) -> None:
        if reason == "abort":
            self.num_aborted += 1
        elif reason == "error":
            self.num_errors += 1
        else:
            self.num_finished += 1
        self.e2e.append(e2e)

    def decode_tokens_per_s(self) -> float:
        if len(self._token_times) < 2:
            return 0.0
        span = time.monotonic() - self._token_times[0][0]
        return sum(n for _, n in self._token_times) / max(span, 1e-6)


@dataclass(slots=True)
class StreamTimer:
    """Time to first token and decode rate of one streamed request, as its client sees them
    (the CLI's summary line, the benchmarks). Call ``tick(n)`` as each chunk arrives."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    num_tokens: int = 0

    def tick(self, num_tokens: int = 1) -> None:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now
        self.num_tokens += num_tokens

    @property
    def ttft_s(self) -> float:
        return (time.perf_counter() if self.first is None else self.first) - self.start

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first, per second after the first."""
        if self.num_tokens < 2 or self.first is None or self.last is None:
            return 0.0
        return (self.num_tokens - 1) / max(self.last - self.first, 1e-9)


def total_memory_bytes() -> int:
    """Memory the accelerator can use: Metal's working set, else physical RAM."""
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return int(size)
    except Exception:  # CPU builds have no device info
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_stats() -> dict[str, int]:
    return {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(),
            "cache_bytes": mx.get_cache_memory()}
