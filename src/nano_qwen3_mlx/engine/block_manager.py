"""KV block bookkeeping: free list, ref counts, prefix caching, LRU eviction. Pure Python."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
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
    hash: int | None = None  # set once full and sealed; None for a partial block
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions and to match partially
    parent: int | None = None  # chain hash of the block before (None: the first block)


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained so equal blocks only match after equal prefixes."""
    return hash((prev_hash, token_ids))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BlockManager:
    """Owns which KV blocks are free, used, or cached (free but reusable by prefix).

    A block is in exactly one of: ``_free`` (never indexed or evicted), ``_cached``
    (ref_count 0 but still findable, LRU order), or used (ref_count > 0).

    Findable blocks are indexed by their parent's chain hash (``_children``): full sealed
    blocks (also by their own hash, ``_by_hash``, for whole-block sharing) and the last
    partial block of a freed sequence. After the whole-block walk, the child sharing the
    longest token prefix with the sequence is copied into a fresh block (copy-on-write):
    the copy is queued on the device by the step being scheduled (``take_copies``).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_reset: Callable[[int], None] | None = None):
        self.block_size = block_size
        # Called with a block's id when it is evicted or freed unindexed (its KV is gone):
        # hybrid models drop the state snapshots that needed it (state_manager.py).
        self.on_reset = on_reset
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[int, int] = {}
        # parent chain hash -> findable blocks after it (an insertion-ordered set)
        self._children: dict[int | None, dict[int, None]] = {}
        # Copies of the step being scheduled, destination -> source. The source holds a
        # reference until take_copies(), so no allocation can evict and overwrite it first.
        self._copies: dict[int, int] = {}
        # Blocks sealed while this step is scheduled: the step writes their KV after its
        # copies run, so they cannot be copied from yet (they can be shared whole).
        self._filling: set[int] = set()
        self.num_prefix_queries = 0  # full prompt blocks looked up
        self.num_prefix_hits = 0
        self.num_partial_hits = 0  # blocks copied for a prefix ending inside a block
        self.num_reused_tokens = 0  # tokens admitted sequences took from the cache
        # The disk tier's hooks (engine/disk_tier.py), None without one: told of each newly
        # sealed block; continues allocate_prefix's walk with blocks loaded from disk.
        self.on_seal: Callable[[SeqLike, int, Block], None] | None = None
        self.disk_extend: Callable[[SeqLike, int], None] | None = None

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
            "prefix_cache_partial_hits": self.num_partial_hits,
            "prefix_cache_reused_tokens": self.num_reused_tokens,
        }

    def cached_hash(self, prev_hash: int | None, token_ids: tuple[int, ...]) -> int | None:
        """The chain hash of the full block ``token_ids`` after ``prev_hash`` if its KV is
        cached (shareable whole), else None."""
        block_id = self._by_hash.get(h := chain_hash(prev_hash, token_ids))
        return h if block_id is not None and self.blocks[block_id].token_ids == token_ids else None

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
        self._children.clear()
        self._copies.clear()
        self._filling.clear()

    # ---- allocation ---------------------------------------------------------------------
    def allocate_prefix(self, seq: SeqLike, max_tokens: int) -> int:
        """Reuse cached KV matching the start of ``seq``; return the tokens covered.

        Whole cached blocks are shared; where the match ends inside a block, the matching
        tokens are copied into a fresh block. At most ``max_tokens`` tokens are taken so at
        least one prompt token is left to run (its logits are needed to sample).
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
        if self.disk_extend is not None:  # the disk tier appends (and seals) what it loaded
            self.disk_extend(seq, max_tokens)
            prev = self.blocks[seq.block_table[-1]].hash if seq.block_table else None
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_computed_tokens += self._copy_partial(seq, prev, max_tokens)
        self.num_reused_tokens += seq.num_computed_tokens
        return seq.num_computed_tokens

    def undo_allocate_prefix(self, seq: SeqLike) -> None:
        """Take back an ``allocate_prefix`` whose sequence was not admitted after all."""
        self.num_reused_tokens -= seq.num_computed_tokens
        self.free(seq)

    def take_copies(self) -> list[tuple[int, int]]:
        """The step is built: its block copies ``(source, destination)``, for the runner to
        queue before the step's writes. The sources' references go: nothing is allocated
        between here and the runner, and afterwards the device has the copy ordered first."""
        copies = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        self._filling.clear()
        for src, _ in copies:
            self._release(src)
        return copies

    def append_slots(self, seq: SeqLike, num_new_tokens: int) -> None:
        """Grow the block table so the next ``num_new_tokens`` tokens have slots."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError("append_slots called without enough free blocks")
        for _ in range(needed):
            seq.block_table.append(self._allocate_block())

    def trim(self, seq: SeqLike, num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` tokens' (a speculating step's
        rejected drafts): they hold no sealed KV, so they go straight back to the pool."""
        keep = -(-num_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:]

    def seal_full_blocks(self, seq: SeqLike, num_ready_tokens: int, filling: bool = False) -> None:
        """Register full blocks whose tokens are known and whose KV is computed.

        ``filling``: the step being scheduled writes their KV (it is not queued yet).
        """
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
                if self._by_hash.setdefault(block.hash, block.block_id) == block.block_id:
                    self._drop_covered(prev, tokens)
                    self._index(block, prev)
                if filling:
                    self._filling.add(block.block_id)
                if self.on_seal is not None:
                    self.on_seal(seq, i, block)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: SeqLike, num_kv_tokens: int | None = None) -> None:
        """Drop the sequence's references; indexed blocks stay findable until evicted.

        The last partial block is kept findable too. Its KV covers the computed tokens that
        are known; ``num_kv_tokens`` caps that where fewer are certain (a just-sampled last
        token may never have run).
        """
        kv_end = min(seq.num_computed_tokens, len(seq.token_ids))
        self._keep_partial(seq, kv_end if num_kv_tokens is None else min(kv_end, num_kv_tokens))
        for block_id in reversed(seq.block_table):  # tail first: evicted before shared heads
            src = self._copies.pop(block_id, None)  # an admission undone before its copy ran
            if src is not None:
                self._release(src)
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and every partial one (used after an engine fault)."""
        for block_id in list(self._cached):
            self._evict(block_id)
            self._free.append(block_id)
        held = [b for kids in self._children.values() for b in kids if self.blocks[b].hash is None]
        for block_id in held:  # copy sources of a step that never ran: freed on release
            self._unindex(self.blocks[block_id])

    # ---- internals ----------------------------------------------------------------------
    def _copy_partial(self, seq: SeqLike, parent: int | None, max_tokens: int) -> int:
        """Past the shared whole blocks: copy the findable child of ``parent`` that shares
        the most next tokens into a fresh block; return how many tokens it gives."""
        start = seq.num_computed_tokens
        wanted = seq.token_ids[start:min(start + self.block_size, max_tokens)]
        best, length = None, 0
        for block_id in self._children.get(parent, ()):
            if block_id in self._filling:
                continue
            n = common_prefix(self.blocks[block_id].token_ids, wanted)
            if n > length:
                best, length = block_id, n
        if best is None:
            return 0
        self._take_ref(best)  # first, so allocating the destination cannot evict it
        if not self.num_free_blocks:
            self._release(best)
            return 0
        dst = self._allocate_block()
        self._copies[dst] = best
        seq.block_table.append(dst)
        self.num_partial_hits += 1
        return length

    def _keep_partial(self, seq: SeqLike, kv_end: int) -> None:
        """Index the partial block holding ``token_ids[full * bs:kv_end]`` of a freed
        sequence, unless a findable block already starts with those tokens."""
        index, length = divmod(kv_end, self.block_size)
        if not self.enable_prefix_caching or not length or index >= len(seq.block_table) \
                or index > seq.num_hashed_blocks:
            return
        block = self.blocks[seq.block_table[index]]
        if block.hash is not None or block.ref_count != 1 or block.block_id in self._copies:
            return  # sealed, shared, or its copied prefix never arrived: nothing to keep
        parent = self.blocks[seq.block_table[index - 1]].hash if index else None
        tokens = tuple(seq.token_ids[index * self.block_size:kv_end])
        if any(self.blocks[b].token_ids[:length] == tokens for b in self._children.get(parent, ())):
            return
        self._drop_covered(parent, tokens)
        block.token_ids = tokens
        self._index(block, parent)

    def _drop_covered(self, parent: int | None, tokens: tuple[int, ...]) -> None:
        """Free the idle partial blocks after ``parent`` that ``tokens`` start with: a block
        about to be indexed there gives everything they would."""
        for block_id in list(self._children.get(parent, ())):
            other = self.blocks[block_id]
            if block_id in self._cached and other.hash is None \
                    and tokens[:len(other.token_ids)] == other.token_ids:
                self._evict(block_id)
                self._free.append(block_id)

    def _index(self, block: Block, parent: int | None) -> None:
        block.parent = parent
        self._children.setdefault(parent, {})[block.block_id] = None

    def _unindex(self, block: Block) -> None:
        kids = self._children.get(block.parent)
        if kids is not None:
            kids.pop(block.block_id, None)
            if not kids:
                del self._children[block.parent]
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]

    def _is_indexed(self, block: Block) -> bool:
        return block.block_id in self._children.get(block.parent, ())

    def _take_ref(self, block_id: int) -> None:
        self._cached.pop(block_id, None)
        self.blocks[block_id].ref_count += 1

    def _release(self, block_id: int) -> None:
        """Drop one reference; an unused block stays findable (cached) or becomes free."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} ref count below zero"
        if block.ref_count == 0:
            if self._is_indexed(block):
                self._cached[block_id] = None
            else:
                self._reset(block)
                self._free.append(block_id)

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
        self._unindex(block)
        self._reset(block)

    def _reset(self, block: Block) -> None:
        block.hash, block.token_ids, block.parent = None, (), None
        if self.on_reset is not None:
            self.on_reset(block.block_id)
