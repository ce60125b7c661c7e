"""How many prompt tokens a step may carry while streams decode, so their token gaps stay even.

A packed step that carries a prefill chunk keeps every decoding stream waiting until the
whole step is done. With ``max_itl_ratio`` set, the pacer sizes the chunk so a mixed step
takes at most that many times a decode-only step (Sarathi-Serve's stall-free batching, with
the latency target relative to the machine's own decode step instead of in milliseconds, so
it needs no tuning per model or device).

It learns from the engine's own steps. A mixed step takes about ``d + g + c * n``: ``d`` the
decode rows, ``g`` the chunk's fixed cost (reading its sequence's earlier keys), ``c`` per
prompt token. The pacer keeps ``d`` (decode-only steps) and the last mixed step's cost per
prompt token, ``(t - d) / n = c + g / n``, and asks for ``n' = (ratio - 1) * d / that``.
That iteration settles at ``n = ((ratio - 1) * d - g) / c``, the largest chunk that meets
the target, whatever ``g`` is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PrefillPacer:
    """``max_itl_ratio=None`` paces nothing: every step may use the whole token budget."""

    max_itl_ratio: float | None = None
    smoothing: float = 0.5  # weight of the newest step in the running estimates
    first_chunk: int = 16  # tokens of the first mixed step, before any cost is known
    decode_s: float | None = None  # a decode-only step, seconds
    decode_rows: int = 0  # the decode rows ``decode_s`` was measured with
    token_s: float | None = None  # a mixed step's seconds per prompt token, beyond decode_s

    def observe(self, num_decode_rows: int, num_prefill_tokens: int, seconds: float) -> None:
        """One finished step: its decode rows, the prompt tokens it computed, and how long it
        took on the device (from the end of the step before it)."""
        if self.max_itl_ratio is None or not num_decode_rows or seconds <= 0:
            return
        if not num_prefill_tokens:
            same = num_decode_rows == self.decode_rows
            self.decode_s = self._blend(self.decode_s if same else None, seconds)
            self.decode_rows = num_decode_rows
        elif self.decode_s is not None:
            per_token = max(seconds - self.decode_s, 0.0) / num_prefill_tokens
            self.token_s = self._blend(self.token_s, per_token)

    def prefill_limit(self, num_decode_rows: int) -> int | None:
        """Most prompt tokens the next step may carry beside ``num_decode_rows`` decode rows
        (None: no limit).

        0 when no decode-only step of that many rows was timed yet: that step is the
        measurement. Otherwise never below one token, so a prompt always progresses even
        where a single prompt token costs more than the target allows.
        """
        if self.max_itl_ratio is None or not num_decode_rows:
            return None
        if self.decode_s is None or num_decode_rows != self.decode_rows:
            return 0
        if not self.token_s:
            return self.first_chunk
        return max(1, int((self.max_itl_ratio - 1.0) * self.decode_s / self.token_s))

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new
