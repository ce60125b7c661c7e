"""How big the KV pool may be: where it starts, its hard cap, how it grows, when it shrinks.

Policy only (the pool itself is kv_cache.py's): the engine asks how many blocks to add when
an allocation would fail, and whether an idle, grown pool should go back to its start size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .stats import total_memory_bytes

# The start pool's most room per sequence beside one prefill budget: one block each up to
# 16-token blocks, as before the CPU default grew to 64 (a 64-token block each doubled it).
START_TOKENS_PER_SEQ = 16


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


def size_pool(config: Any, block_bytes: int, weights_nbytes: int, model_max_len: int,
              reserved_bytes: int = 0) -> KVPoolPolicy:
    """The policy for an ``EngineConfig``: a fixed ``num_kv_blocks`` pool, or one that starts
    with room for one full token budget (a prefill chunk) plus a block per sequence (blocks of
    over ``START_TOKENS_PER_SEQ`` tokens: that many tokens per sequence), and grows up to its cap.
    ``reserved_bytes``: what the memory budget must also hold (a hybrid model's state pool)."""
    if config.num_kv_blocks:
        return KVPoolPolicy(config.num_kv_blocks, config.num_kv_blocks)
    seq_blocks = -(-model_max_len // config.block_size)
    cap = min(cap_blocks(config, block_bytes, weights_nbytes, reserved_bytes),
              config.max_num_seqs * seq_blocks)
    bs = config.block_size
    per_seq = -(-config.max_num_seqs * min(bs, START_TOKENS_PER_SEQ) // bs)  # a block each up to 16
    initial = -(-config.max_num_batched_tokens // bs) + per_seq
    return KVPoolPolicy(initial, cap, config.kv_shrink_idle_s)


def cap_blocks(config: Any, block_bytes: int, weights_nbytes: int, reserved_bytes: int = 0) -> int:
    """The hard cap: ``kv_cache_gb``, what ``max_memory_gb`` leaves after the weights (the
    smaller of the two), else a share of the memory left after the weights; less
    ``reserved_bytes`` (a hybrid model's state pool, counted in the same budget)."""
    budget = memory_budget(config, block_bytes, weights_nbytes)
    if reserved_bytes and budget - reserved_bytes < 3 * block_bytes:
        raise ValueError(f"the recurrent-state pool ({reserved_bytes / 1e9:.2f} GB: max_num_seqs "
                         "slots plus snapshots) leaves no room for the KV cache in the memory "
                         f"budget ({budget / 1e9:.2f} GB): lower max_num_seqs or "
                         "max_state_snapshots, or raise the cap")
    return max(2, pool_blocks(budget - reserved_bytes, block_bytes))


def memory_budget(config: Any, block_bytes: int, weights_nbytes: int) -> float:
    """Bytes the caches (KV pool, state pool) may take together."""
    budgets = []
    if config.kv_cache_gb:
        budgets.append(config.kv_cache_gb * 1e9)
    if config.max_memory_gb:
        left = config.max_memory_gb * 1e9 - weights_nbytes
        if left < 3 * block_bytes:
            raise ValueError(f"--max-memory-gb {config.max_memory_gb:g} leaves no room for the KV "
                             f"cache: the weights alone take {weights_nbytes / 1e9:.2f} GB")
        budgets.append(left)
    if not budgets:
        budgets.append(config.kv_cache_fraction * max(total_memory_bytes() - weights_nbytes, 0))
    return min(budgets)


def max_snapshots(config: Any, budget: float, slot_bytes: int) -> int:
    """How many recurrent-state snapshots a hybrid model keeps: ``max_state_snapshots``, else
    a quarter of the cache budget's worth (at least 4, at most 1024)."""
    if config.max_state_snapshots is not None:
        return config.max_state_snapshots
    return max(4, min(1024, int(budget / 4 // slot_bytes)))
