"""KV block bookkeeping: free list, ref counts, prefix caching, LRU eviction. Pure Python."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol


class SeqLike(Protocol):
    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    num_hashed_blocks: int


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained so equal blocks only match after equal prefixes."""
    return hash((prev_hash, token_ids))


class BlockManager:
    """Owns which KV blocks are free, used, or cached (free but reusable by prefix hash).

    A block is in exactly one of: ``_free`` (never hashed or evicted), ``_cached``
    (ref_count 0 but still findable by hash, LRU order), or used (ref_count > 0).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[int, int] = {}
        self.num_prefix_queries = 0  # full prompt blocks looked up
        self.num_prefix_hits = 0

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (truly free plus evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def stats(self) -> dict[str, float]:
        queries = self.num_prefix_queries
        return {
            "num_blocks": self.num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_cached_blocks": self.num_cached_blocks,
            "num_used_blocks": self.num_used_blocks,
            "block_size": self.block_size,
            "prefix_cache_queries": queries,
            "prefix_cache_hits": self.num_prefix_hits,
            "prefix_cache_hit_rate": self.num_prefix_hits / queries if queries else 0.0,
        }

    def blocks_needed(self, seq: SeqLike, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: SeqLike, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    # ---- pool size ----------------------------------------------------------------------
    def add_blocks(self, num_new_blocks: int) -> None:
        """The KV pool grew: blocks ``num_blocks .. num_blocks + n - 1`` are free now."""
        start = self.num_blocks
        self.blocks.extend(Block(i) for i in range(start, start + num_new_blocks))
        self._free.extend(range(start, start + num_new_blocks))

    def reset_pool(self, num_blocks: int) -> None:
        """The KV pool was rebuilt with ``num_blocks`` empty blocks (only when none is used)."""
        if self.num_used_blocks:
            raise RuntimeError("reset_pool called while blocks are in use")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free = deque(range(num_blocks))
        self._cached.clear()
        self._by_hash.clear()

    # ---- allocation ---------------------------------------------------------------------
    def allocate_prefix(self, seq: SeqLike, max_tokens: int) -> int:
        """Share cached full blocks matching the start of ``seq``; return tokens covered.

        At most ``max_tokens`` tokens are taken so at least one prompt token is left to run
        (its logits are needed to sample the first new token).
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        prev, bs = None, self.block_size
        for start in range(0, max_tokens - bs + 1, bs):
            tokens = tuple(seq.token_ids[start:start + bs])
            self.num_prefix_queries += 1
            block_id = self._by_hash.get(h := chain_hash(prev, tokens))
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self.num_prefix_hits += 1
            self._take_ref(block_id)
            seq.block_table.append(block_id)
            prev = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def append_slots(self, seq: SeqLike, num_new_tokens: int) -> None:
        """Grow the block table so the next ``num_new_tokens`` tokens have slots."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError("append_slots called without enough free blocks")
        for _ in range(needed):
            seq.block_table.append(self._allocate_block())

    def seal_full_blocks(self, seq: SeqLike, num_ready_tokens: int) -> None:
        """Register full blocks whose tokens are known and whose KV is computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(num_ready_tokens // bs, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = chain_hash(prev, tokens), tokens
                self._by_hash.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: SeqLike) -> None:
        """Drop the sequence's references; hashed blocks stay findable until evicted."""
        for block_id in reversed(seq.block_table):  # tail first: evicted before shared heads
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} ref count below zero"
            if block.ref_count == 0:
                if block.hash is not None and self._by_hash.get(block.hash) == block_id:
                    self._cached[block_id] = None
                else:
                    self._reset(block)
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (used after an engine fault)."""
        for block_id in list(self._cached):
            self._evict(block_id)
            self._free.append(block_id)

    # ---- internals ----------------------------------------------------------------------
    def _take_ref(self, block_id: int) -> None:
        self._cached.pop(block_id, None)
        self.blocks[block_id].ref_count += 1

    def _allocate_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._cached.popitem(last=False)  # least recently freed
            self._evict(block_id, already_popped=True)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _evict(self, block_id: int, already_popped: bool = False) -> None:
        if not already_popped:
            self._cached.pop(block_id, None)
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        self._reset(block)

    @staticmethod
    def _reset(block: Block) -> None:
        block.hash, block.token_ids = None, ()
