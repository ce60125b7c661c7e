"""How many prompt tokens a step may carry while streams decode, so their token gaps stay even.

A packed step that carries a prefill chunk keeps every decoding stream waiting until the
whole step is done. With ``max_itl_ratio`` set, the pacer sizes the chunk so a mixed step
takes at most that many times a decode-only step (Sarathi-Serve's stall-free batching, with
the latency target relative to the machine's own decode step instead of in milliseconds, so
it needs no tuning per model or device).

It learns from the engine's own steps. A mixed step takes about ``d + g + c * n``: ``d`` the
decode rows, ``g`` the chunk's fixed cost (reading its sequence's earlier keys), ``c`` per
prompt token. The pacer keeps ``d`` (the median of recent decode-only steps with as many
rows) and the last mixed step's cost per prompt token, ``(t - d) / n = c + g / n``, and asks
for ``n' = (ratio - 1) * d / that``. That iteration settles at ``n = ((ratio - 1) * d - g) / c``,
the largest chunk that meets the target, whatever ``g`` is. ``c`` grows as the prompt does
(each token attends to more keys), so the newest step's cost is used, not an average, and a
chunk may at most grow by half from one step to the next: a cost measured early in a prompt
cannot let a step run far past the target later.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class PrefillPacer:
    """``max_itl_ratio=None`` paces nothing: every step may use the whole token budget."""

    max_itl_ratio: float | None = None
    first_chunk: int = 16  # tokens of the first mixed step, before any cost is known
    # Recent decode-only step times, seconds, by their number of decode rows.
    decode_times: dict[int, deque[float]] = field(default_factory=dict)
    token_s: float | None = None  # a mixed step's seconds per prompt token, beyond decode_s
    last_chunk: int = 0  # prompt tokens of the last mixed step

    def decode_s(self, num_decode_rows: int) -> float | None:
        """A decode-only step of that many rows, seconds (the median of the recent ones)."""
        times = self.decode_times.get(num_decode_rows)
        return statistics.median(times) if times else None

    def observe(self, num_decode_rows: int, num_prefill_tokens: int, seconds: float) -> None:
        """One finished step: its decode rows, the prompt tokens it computed, and how long it
        took on the device (from the end of the step before it)."""
        if self.max_itl_ratio is None or not num_decode_rows or seconds <= 0:
            return
        decode_s = self.decode_s(num_decode_rows)
        if not num_prefill_tokens:
            self.decode_times.setdefault(num_decode_rows, deque(maxlen=5)).append(seconds)
        elif decode_s is not None:
            self.last_chunk = num_prefill_tokens
            if seconds > decode_s:  # else noise hid the chunk's cost: nothing learnt
                self.token_s = (seconds - decode_s) / num_prefill_tokens

    def prefill_limit(self, num_decode_rows: int) -> int | None:
        """Most prompt tokens the next step may carry beside ``num_decode_rows`` decode rows
        (None: no limit).

        0 when no decode-only step of that many rows was timed yet: that step is the
        measurement. Otherwise never below one token, so a prompt always progresses even
        where a single prompt token costs more than the target allows.
        """
        if self.max_itl_ratio is None or not num_decode_rows:
            return None
        decode_s = self.decode_s(num_decode_rows)
        if decode_s is None:
            return 0
        if not self.token_s:
            return self.first_chunk
        fits = int((self.max_itl_ratio - 1.0) * decode_s / self.token_s)
        return max(1, min(fits, max(self.last_chunk, self.first_chunk) * 3 // 2))


@dataclass(slots=True)
class StepClock:
    """Turns the engine's wall clock into the time of each step.

    An engine step queues step k (``run``) and then reads step k-1 (pipelining). Where
    ``mx.async_eval`` returns at once (Metal, CUDA), the read waits for step k-1; on the CPU
    backend ``async_eval`` itself computes most of step k (MLX bounds the tasks in flight)
    and the read returns at once. So an engine step's time belongs to whichever step it
    waited on: the one it queued if queueing took longer than reading, else the one it read.
    """

    last_end: float | None = None  # when the last engine step that read a step ended

    def tick(self, prev: Any, out: Any, start: float, queued: float, end: float):
        """``prev``: the step read now (or None), ``out``: the step queued now (or None);
        ``start``/``queued``/``end``: before queueing, after queueing, after reading.
        Returns ``(step, seconds)`` for the step this engine step waited on, or None.

        An engine step that read nothing (none in flight: the engine was idle, or the step
        in flight was read early) may have waited on nothing at all (Metal): it times
        nothing, and the next one counts from its own start.
        """
        if prev is None:
            self.last_end = None
            return None
        began = start if self.last_end is None else self.last_end
        self.last_end = end
        waited_on = out if out is not None and queued - start >= end - queued else prev
        return waited_on, end - began
