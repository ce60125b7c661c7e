"""How big the KV pool may be: where it starts, its hard cap, how it grows, when it shrinks.

Pure policy (no MLX): the engine asks it how many blocks to add when an allocation would
fail, and whether an idle, grown pool should go back to its start size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class KVPoolPolicy:
    """Sizes in blocks. ``initial_blocks == cap_blocks`` is a fixed pool (no growth)."""

    initial_blocks: int
    cap_blocks: int
    shrink_idle_s: float = 30.0
    idle_since: float | None = None

    def __post_init__(self) -> None:
        self.cap_blocks = max(self.cap_blocks, 2)
        self.initial_blocks = max(2, min(self.initial_blocks, self.cap_blocks))

    @property
    def grows(self) -> bool:
        return self.cap_blocks > self.initial_blocks

    def growth(self, current: int, shortfall: int) -> int:
        """Blocks to add so ``shortfall`` more fit: at least double (few copies), never past
        the cap; 0 at the cap (the scheduler then preempts)."""
        if shortfall <= 0:
            return 0
        target = min(self.cap_blocks, max(2 * current, current + shortfall))
        return max(0, target - current)

    def should_shrink(self, current: int, busy: bool, now: float) -> bool:
        """True once a pool above its start size has been idle for ``shrink_idle_s``."""
        if busy:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
        return current > self.initial_blocks and now - self.idle_since >= self.shrink_idle_s


def pool_blocks(budget_bytes: float, block_bytes: int) -> int:
    """Blocks that fit ``budget_bytes`` together with the pool's one scratch block."""
    return int(budget_bytes // block_bytes) - 1
