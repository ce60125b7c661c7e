"""Every number the benchmarks report is computed here from token timestamps, the same
way for both engines (one place, so the arithmetic cannot drift between them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class StreamTimes:
    """When each stream's tokens arrived, in seconds after the run started."""

    times: dict[str, list[float]] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)

    def arrive(self, stream: str, t: float) -> None:
        self.arrived[stream] = t
        self.times.setdefault(stream, [])

    def record(self, stream: str, t: float, num_tokens: int = 1) -> None:
        self.times.setdefault(stream, []).extend([t] * num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(len(ts) for ts in self.times.values())

    def ttfts(self, streams: list[str] | None = None) -> list[float]:
        """Seconds from each stream's arrival to its first token."""
        names = streams if streams is not None else list(self.times)
        return [self.times[n][0] - self.arrived.get(n, 0.0) for n in names if self.times.get(n)]

    def decode_tok_s(self) -> float:
        """Tokens per second once every stream has its first token (steady-state decode):
        the tokens arriving after the last first token, over the time after it."""
        firsts = [ts[0] for ts in self.times.values() if ts]
        if not firsts:
            return math.nan
        t0 = max(firsts)
        end = max(ts[-1] for ts in self.times.values() if ts)
        later = sum(1 for ts in self.times.values() for t in ts if t > t0)
        return later / (end - t0) if end > t0 else math.nan

    def itls(self, streams: list[str] | None = None, after: float = 0.0) -> list[float]:
        """Gaps between consecutive tokens of ``streams`` (all by default) ending after ``after``."""
        gaps = []
        for name in streams if streams is not None else list(self.times):
            ts = self.times.get(name, [])
            # Tokens that arrive in one step share a timestamp: a gap of 0 is no token gap.
            gaps += [b - a for a, b in zip(ts, ts[1:]) if b > after and b > a]
        return gaps


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else math.nan


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; NaN when either is missing or theirs is 0."""
    if ours is None or theirs is None or not theirs or math.isnan(ours) or math.isnan(theirs):
        return math.nan
    return ours / theirs


def summary(st: StreamTimes) -> dict[str, float]:
    """The per-run numbers of the length suite."""
    ttfts = st.ttfts()
    return {"ttft_mean_s": mean(ttfts), "ttft_max_s": max(ttfts, default=math.nan),
            "decode_tok_s": st.decode_tok_s(), "tokens": st.num_tokens}


def time_stream(llm, prompt, params) -> tuple[float, float]:
    """(TTFT seconds, decode tok/s) of one streamed ``LLM`` request (the CLI's timer)."""
    from ..engine.stats import StreamTimer

    timer = StreamTimer()
    for chunk in llm.generate_stream(prompt, params):
        timer.tick(len(chunk["token_ids"]))
    return timer.ttft_s, timer.decode_tok_s
