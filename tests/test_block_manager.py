"""Block manager: a hypothesis state machine for its invariants, plus plain unit tests.

The machine drives the manager the way the scheduler and engine do: admit (prefix lookup,
then the step's block copies), prefill chunks, decode one token at a time, seal full blocks,
preempt, finish, and a "hog" request that needs every free block and so evicts the prefix
cache. It also simulates the KV pool (``kv[block][slot] = token``, copies included) so a
block handed out while still in use, a shared block whose content differs, or a copy from
the wrong block shows up as a corrupted token in some live sequence or cached block.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nano_qwen3_mlx.engine.block_manager import BlockManager, chain_hash
from nano_qwen3_mlx.engine.sequence import Sequence
from nano_qwen3_mlx.sampling_params import SamplingParams

NUM_BLOCKS, BLOCK_SIZE, MAX_LEN = 16, 4, 40
SMALL_ALPHABET = st.integers(0, 2)  # tiny, so prompts share prefixes and the cache hits
# Prompts built from a few whole-block patterns repeat blocks, at equal and at shifted positions.
BLOCK_PATTERNS = st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 2, 0)])
PROMPTS = st.builds(
    lambda blocks, tail: [t for block in blocks for t in block] + tail,
    st.lists(BLOCK_PATTERNS, max_size=4),
    st.lists(SMALL_ALPHABET, max_size=6),
).filter(bool)


def make_seq(seq_id: int, token_ids: list[int]) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", list(token_ids), SamplingParams())


def prefill(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Give ``seq`` slots for its uncomputed tokens and mark them computed and sealed."""
    n = seq.num_uncomputed_tokens if num_tokens is None else num_tokens
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.seal_full_blocks(seq, min(seq.num_computed_tokens, len(seq.token_ids)))


def run_and_free(bm: BlockManager, seq_id: int, token_ids: list[int]) -> list[int]:
    """Admit, fully compute, seal and free one request; return the blocks it used."""
    seq = make_seq(seq_id, token_ids)
    bm.allocate_prefix(seq, len(token_ids) - 1)
    bm.take_copies()  # the step is built
    prefill(bm, seq)
    table = list(seq.block_table)
    bm.free(seq)
    return table


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / prefill / decode / preempt / finish / evict against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.ids = itertools.count()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.kv: dict[int, dict[int, int]] = {}  # block id -> slot -> token written there
        self.hog_token = 1000  # hogs use fresh tokens so they never hit the cache

    # ---- rules --------------------------------------------------------------------------
    @rule(tokens=PROMPTS)
    def new_request(self, tokens: list[int]) -> None:
        self.waiting.append(make_seq(next(self.ids), tokens))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        """Prefix lookup; admitted only if one more block-slot fits, else rolled back."""
        seq = data.draw(st.sampled_from(self.waiting))
        hits_before = self.bm.num_prefix_hits
        cached = self.bm.allocate_prefix(seq, seq.num_tokens - 1)
        copies = self.bm.take_copies()  # the step is built: the runner copies first
        for src, dst in copies:
            self.kv[dst] = dict(self.kv.get(src, {}))
        assert cached < seq.num_tokens and cached == seq.num_computed_tokens
        assert len(seq.block_table) == -(-cached // BLOCK_SIZE)
        assert self.bm.num_prefix_hits - hits_before == cached // BLOCK_SIZE
        assert [dst for _, dst in copies] == ([seq.block_table[-1]] if cached % BLOCK_SIZE else [])
        if self.bm.can_append(seq, 1):
            self.waiting.remove(seq)
            self.running.append(seq)
        else:
            self.bm.free(seq)
            assert seq.block_table == [] and seq.num_computed_tokens == 0

    @precondition(lambda self: self.running)
    @rule(data=st.data(), chunk=st.integers(1, 12))
    def step(self, data: st.DataObject, chunk: int) -> None:
        """Compute a chunk (or one decode token); preempt if the pool cannot hold it."""
        seq = data.draw(st.sampled_from(self.running))
        n = min(chunk, seq.num_uncomputed_tokens)
        if not self.bm.can_append(seq, n):
            self._release(seq)
            self.waiting.append(seq)  # preempted: recomputed when readmitted
            return
        self.bm.append_slots(seq, n)
        self._write_kv(seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
        seq.num_computed_tokens += n
        if seq.num_uncomputed_tokens == 0:  # the step sampled a new token
            seq.token_ids.append(data.draw(SMALL_ALPHABET))
        self.bm.seal_full_blocks(seq, min(seq.num_computed_tokens, len(seq.token_ids)))
        if len(seq.token_ids) >= MAX_LEN:
            self._release(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._release(data.draw(st.sampled_from(self.running)))

    @precondition(lambda self: self.bm.num_free_blocks > 0)
    @rule(keep=st.booleans())
    def hog(self, keep: bool) -> None:
        """A request with unseen tokens that takes every free block, evicting the cache."""
        n = self.bm.num_free_blocks * BLOCK_SIZE
        tokens = list(range(self.hog_token, self.hog_token + n))
        self.hog_token += n
        seq = make_seq(next(self.ids), tokens + [0])
        assert self.bm.allocate_prefix(seq, n) == 0
        self.bm.append_slots(seq, n)
        self._write_kv(seq, 0, n)
        seq.num_computed_tokens = n
        self.bm.seal_full_blocks(seq, n)
        assert self.bm.num_free_blocks == 0 and self.bm.num_cached_blocks == 0
        self.running.append(seq)
        if not keep:
            self._release(seq)

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()
        assert self.bm.num_cached_blocks == 0

    # ---- invariants ---------------------------------------------------------------------
    @invariant()
    def each_block_in_exactly_one_state(self) -> None:
        free, cached = list(self.bm._free), list(self.bm._cached)
        used = [b.block_id for b in self.bm.blocks if b.ref_count > 0]
        assert len(set(free)) == len(free) and len(set(cached)) == len(cached)
        assert sorted(free + cached + used) == list(range(NUM_BLOCKS))
        assert all(self.bm.blocks[i].ref_count == 0 for i in free + cached)
        assert all(self.bm.blocks[i].hash is None for i in free)

    @invariant()
    def ref_counts_match_block_tables(self) -> None:
        counts = {b.block_id: 0 for b in self.bm.blocks}
        for seq in self._live():
            for block_id in seq.block_table:
                counts[block_id] += 1
        assert {b.block_id: b.ref_count for b in self.bm.blocks} == counts
        assert all(b.ref_count >= 0 for b in self.bm.blocks)

    @invariant()
    def counts_add_up(self) -> None:
        stats = self.bm.stats()
        assert stats["num_free_blocks"] + stats["num_used_blocks"] == NUM_BLOCKS
        assert stats["num_cached_blocks"] <= stats["num_free_blocks"]
        assert 0 <= stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]

    @invariant()
    def shared_blocks_are_full_identical_and_aligned(self) -> None:
        owners: dict[int, list[tuple[Sequence, int]]] = {}
        for seq in self._live():
            for index, block_id in enumerate(seq.block_table):
                owners.setdefault(block_id, []).append((seq, index))
        for block_id, places in owners.items():
            if len(places) < 2:
                continue
            block = self.bm.blocks[block_id]
            assert block.hash is not None and len(block.token_ids) == BLOCK_SIZE
            assert len({index for _, index in places}) == 1, "shared at different positions"
            for seq, index in places:
                tokens = seq.token_ids[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE]
                assert tuple(tokens) == block.token_ids

    @invariant()
    def hash_table_points_at_matching_blocks(self) -> None:
        for h, block_id in self.bm._by_hash.items():
            block = self.bm.blocks[block_id]
            assert block.hash == h and block_id not in self.bm._free
            assert block_id in self.bm._children[block.parent]
        for parent, kids in self.bm._children.items():
            assert kids, "empty index entries are dropped"
            for block_id in kids:
                block = self.bm.blocks[block_id]
                assert block.parent == parent and block_id not in self.bm._free
                if block.hash is None:  # a freed sequence's partial block
                    assert 0 < len(block.token_ids) < BLOCK_SIZE
                else:
                    assert self.bm._by_hash[block.hash] == block_id
        for block_id in self.bm._cached:
            assert self.bm._is_indexed(self.bm.blocks[block_id])
        for seq in self._live():  # hashed blocks carry the chained hash of the seq's tokens
            prev = None
            for index, block_id in enumerate(seq.block_table[:seq.num_hashed_blocks]):
                tokens = tuple(seq.token_ids[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])
                block = self.bm.blocks[block_id]
                assert block.token_ids == tokens and block.hash == chain_hash(prev, tokens)
                prev = block.hash

    @invariant()
    def findable_blocks_hold_their_tokens_kv(self) -> None:
        """What a later request would share or copy is the KV of the tokens it claims."""
        for kids in self.bm._children.values():
            for block_id in kids:
                slots = self.kv.get(block_id, {})
                for slot, token in enumerate(self.bm.blocks[block_id].token_ids):
                    assert slots.get(slot) == token, "cached block's KV overwritten"

    @invariant()
    def computed_kv_matches_tokens(self) -> None:
        for seq in self._live():
            assert seq.num_computed_tokens <= len(seq.block_table) * BLOCK_SIZE
            assert seq.num_hashed_blocks * BLOCK_SIZE <= seq.num_computed_tokens
            for pos in range(seq.num_computed_tokens):
                slots = self.kv.get(seq.block_table[pos // BLOCK_SIZE], {})
                assert slots.get(pos % BLOCK_SIZE) == seq.token_ids[pos], "live KV overwritten"

    def teardown(self) -> None:
        for seq in list(self.running):
            self._release(seq)
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == NUM_BLOCKS
        assert all(b.ref_count == 0 for b in self.bm.blocks)

    # ---- helpers ------------------------------------------------------------------------
    def _live(self) -> list[Sequence]:
        return self.running + [s for s in self.waiting if s.block_table]

    def _release(self, seq: Sequence) -> None:
        self.bm.free(seq)
        self.running.remove(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0

    def _write_kv(self, seq: Sequence, start: int, stop: int) -> None:
        for pos in range(start, stop):
            block_id = seq.block_table[pos // BLOCK_SIZE]
            if pos % BLOCK_SIZE == 0:
                self.kv[block_id] = {}  # a block is (re)filled from its first slot
            self.kv[block_id][pos % BLOCK_SIZE] = seq.token_ids[pos]


BlockManagerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase


# ---- unit tests -------------------------------------------------------------------------
def test_prefix_hit_reuses_exact_block_ids_and_counts_hits():
    """A second request with a cached prefix gets the very same block ids, counted as hits."""
    bm = BlockManager(8, 4)
    prompt = list(range(13))  # 3 full blocks + 1 token
    first = run_and_free(bm, 0, prompt)
    hits_before = bm.num_prefix_hits
    seq = make_seq(1, prompt)
    assert bm.allocate_prefix(seq, len(prompt) - 1) == 12
    assert seq.block_table == first[:3]
    assert bm.num_prefix_hits - hits_before == 3
    stats = bm.stats()
    assert stats["prefix_cache_hits"] == 3
    assert stats["prefix_cache_hit_rate"] == 3 / stats["prefix_cache_queries"]


def test_live_sequences_share_prefix_blocks_with_ref_counts():
    """A prefix hit on a block still in use shares it; its ref count counts both users."""
    bm = BlockManager(8, 4)
    a = make_seq(0, list(range(9)))
    bm.allocate_prefix(a, 8)
    prefill(bm, a)
    b = make_seq(1, list(range(8)) + [42])
    assert bm.allocate_prefix(b, 8) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]


@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 9, 12])
def test_allocate_prefix_leaves_a_token_to_compute(length):
    """Even when the whole prompt is cached, at least one token is left uncomputed."""
    bm = BlockManager(8, 4)
    prompt = [7] * length
    seq = make_seq(0, prompt)
    bm.append_slots(seq, length)
    seq.num_computed_tokens = length
    bm.seal_full_blocks(seq, length)  # every full block of the prompt is cached
    bm.free(seq)
    again = make_seq(1, prompt)
    cached = bm.allocate_prefix(again, length - 1)
    assert cached == length - 1  # whole blocks, then a copied part of the next one
    assert again.num_uncomputed_tokens == 1


def test_eviction_takes_least_recently_freed_cached_block():
    """When the free list is empty, the cached block freed longest ago is reused first."""
    bm = BlockManager(4, 2)
    a, b, c = ([t, t, 9] for t in (1, 2, 3))  # one full block + one token each
    (a_block,) = run_and_free(bm, 0, a[:2])
    (b_block,) = run_and_free(bm, 1, b[:2])
    (c_block,) = run_and_free(bm, 2, c[:2])
    assert list(bm._cached) == [a_block, b_block, c_block]
    assert make_and_lookup(bm, 3, a) == 2  # a prefix hit refreshes a: order is now b, c, a
    hog = make_seq(4, [100, 101, 102, 103, 104])
    bm.append_slots(hog, 4)  # the one truly free block, then one from the cache
    assert bm.num_cached_blocks == 2 and hog.block_table[1] == b_block
    bm.free(hog)
    assert make_and_lookup(bm, 5, b) == 0
    assert make_and_lookup(bm, 6, c) == 2 and make_and_lookup(bm, 7, a) == 2


def make_and_lookup(bm: BlockManager, seq_id: int, tokens: list[int]) -> int:
    """Tokens found in the prefix cache for a new request (its references are dropped)."""
    seq = make_seq(seq_id, tokens)
    cached = bm.allocate_prefix(seq, len(tokens) - 1)
    bm.free(seq)
    return cached


def test_prefix_caching_disabled_never_hits():
    """With prefix caching off, equal prompts never share blocks and nothing is cached."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    prompt = list(range(9))
    run_and_free(bm, 0, prompt)
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    seq = make_seq(1, prompt)
    assert bm.allocate_prefix(seq, 8) == 0 and seq.block_table == []
    assert bm.stats()["prefix_cache_hits"] == 0


def test_append_slots_without_room_raises():
    """Asking for more blocks than exist is an error, not a silent over-allocation."""
    bm = BlockManager(2, 4)
    seq = make_seq(0, list(range(12)))
    assert not bm.can_append(seq, 12)
    with pytest.raises(RuntimeError):
        bm.append_slots(seq, 12)
    assert bm.num_free_blocks == 2 and seq.block_table == []


# ---- partial blocks: token-granular reuse by copy-on-write ------------------------------
def admit(bm: BlockManager, seq_id: int, tokens: list[int]) -> tuple[Sequence, list[tuple[int, int]]]:
    """Prefix lookup as the scheduler does it, then the step's copies (sources released)."""
    seq = make_seq(seq_id, tokens)
    bm.allocate_prefix(seq, len(tokens) - 1)
    return seq, bm.take_copies()


def assert_idle(bm: BlockManager, num_blocks: int) -> None:
    """Nothing leaked: no reference left, every block free or cached."""
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == num_blocks and bm.num_used_blocks == 0
    assert not bm._copies


def test_partial_match_inside_a_full_cached_block_copies_it():
    """A match ending inside a cached full block copies it into a fresh block; the source
    stays cached (not shared), and the new sequence continues in the copy."""
    bm = BlockManager(8, 4)
    first = run_and_free(bm, 0, list(range(13)))  # 3 full blocks + 1 token
    seq, copies = admit(bm, 1, list(range(10)) + [99, 98, 97])
    assert seq.num_computed_tokens == 10  # 2 whole blocks + 8, 9 of the third
    assert seq.block_table[:2] == first[:2] and seq.block_table[2] not in first
    assert copies == [(first[2], seq.block_table[2])]
    assert bm.blocks[first[2]].ref_count == 0 and first[2] in bm._cached
    assert bm.stats()["prefix_cache_reused_tokens"] == 10
    assert bm.stats()["prefix_cache_partial_hits"] == 1
    prefill(bm, seq)
    bm.free(seq)
    assert_idle(bm, 8)


def test_partial_match_against_a_freed_sequences_last_partial_block():
    """The computed tokens of a freed sequence's last partial block are found and copied;
    a token without KV (sampled, never run) is not claimed."""
    bm = BlockManager(8, 4)
    seq = make_seq(0, list(range(14)))
    bm.allocate_prefix(seq, 13)
    prefill(bm, seq)
    seq.token_ids.append(14)  # sampled after the prompt: it has no KV
    partial = seq.block_table[3]
    bm.free(seq)
    assert bm.blocks[partial].token_ids == (12, 13) and partial in bm._cached
    again, copies = admit(bm, 1, list(range(13)) + [77, 78])
    assert again.num_computed_tokens == 13 and copies == [(partial, again.block_table[3])]
    bm.free(again)
    longer, copies = admit(bm, 2, list(range(20)))
    assert longer.num_computed_tokens == 14  # 12, 13 and no further: 14 never ran
    bm.free(longer)
    assert_idle(bm, 8)


def test_free_caps_the_partial_block_at_num_kv_tokens():
    """``num_kv_tokens`` (a finishing token that may never have run) is not claimed."""
    bm = BlockManager(8, 4)
    seq = make_seq(0, list(range(7)))
    bm.allocate_prefix(seq, 6)
    prefill(bm, seq)  # all 7 computed
    table = list(seq.block_table)
    bm.free(seq, num_kv_tokens=6)
    assert bm.blocks[table[1]].token_ids == (4, 5)
    again, _ = admit(bm, 1, list(range(7)) + [50])
    assert again.num_computed_tokens == 6


def test_longest_common_prefix_wins_among_children():
    """Several cached continuations of one prefix: the one sharing the most tokens is copied."""
    bm = BlockManager(16, 4)
    head = [1, 2, 3, 4]
    tails = {(5, 6): None, (5, 6, 7): None, (5, 9, 9, 9): None, (8,): None}
    for i, tail in enumerate(tails):
        seq, _ = admit(bm, i, head + list(tail))
        prefill(bm, seq)
        tails[tail] = seq.block_table[1]
        bm.free(seq)
    seq, copies = admit(bm, 9, head + [5, 6, 7, 0, 0])
    assert seq.num_computed_tokens == 7 and copies == [(tails[5, 6, 7], seq.block_table[1])]
    bm.free(seq)
    seq, copies = admit(bm, 10, head + [5, 9, 1])
    assert seq.num_computed_tokens == 6 and copies == [(tails[5, 9, 9, 9], seq.block_table[1])]


def test_a_partial_block_covered_by_another_is_not_kept_twice():
    """Equal or shorter partial tails of one prefix index one block, not one per request."""
    bm = BlockManager(16, 4)
    run_and_free(bm, 0, [1, 2, 3, 4, 5, 6, 7])
    before = dict(bm._children)
    run_and_free(bm, 1, [1, 2, 3, 4, 5, 6, 7])  # the same tail again
    run_and_free(bm, 2, [1, 2, 3, 4, 5])  # a shorter one
    assert {k: list(v) for k, v in bm._children.items()} == {k: list(v) for k, v in before.items()}
    (tail,) = bm._children[next(k for k in bm._children if k is not None)]
    run_and_free(bm, 3, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # a sealed full block covers the tail
    assert tail in bm._free
    first = bm._by_hash[chain_hash(None, (1, 2, 3, 4))]
    second = bm._by_hash[chain_hash(bm.blocks[first].hash, (5, 6, 7, 8))]
    assert list(bm._children[bm.blocks[first].hash]) == [second]


@pytest.mark.parametrize("length", [2, 3, 4, 5, 7, 8, 9])
def test_partial_reuse_leaves_a_token_to_compute(length):
    """The max_tokens rule holds for the copied part too: the last prompt token always runs."""
    bm = BlockManager(8, 4)
    prompt = list(range(length))
    run_and_free(bm, 0, prompt + [100, 101])  # the cache holds more than the prompt
    seq = make_seq(1, prompt)
    assert bm.allocate_prefix(seq, length - 1) == length - 1
    assert seq.num_uncomputed_tokens == 1
    assert bm.allocate_prefix(make_seq(2, prompt), 0) == 0


def test_eviction_drops_partial_blocks_from_the_index():
    """A cached partial block the pool takes back is no longer findable."""
    bm = BlockManager(4, 4)
    table = run_and_free(bm, 0, [1, 2, 3, 4, 5, 6])
    partial = table[1]
    assert bm._is_indexed(bm.blocks[partial])
    hog = make_seq(1, list(range(100, 116)))
    bm.append_slots(hog, 16)  # every block: the free ones, then both cached ones
    assert partial in hog.block_table and not bm._is_indexed(bm.blocks[partial])
    assert bm._children == {} and bm._by_hash == {}
    bm.free(hog)
    seq, copies = admit(bm, 2, [1, 2, 3, 4, 5, 6, 9])
    assert seq.num_computed_tokens == 0 and copies == []


def test_undone_admission_cancels_its_copy_and_leaks_nothing():
    """An admission rolled back before its step ran: no copy, no reference, no stats."""
    bm = BlockManager(8, 4)
    run_and_free(bm, 0, list(range(10)))
    reused = bm.num_reused_tokens
    seq = make_seq(1, list(range(9)) + [42])
    assert bm.allocate_prefix(seq, 9) == 9
    copy_source = bm._copies[seq.block_table[-1]]
    assert bm.blocks[copy_source].ref_count == 1  # held until the step is built
    bm.undo_allocate_prefix(seq)
    assert bm.take_copies() == [] and bm.num_reused_tokens == reused
    assert not bm._is_indexed(bm.blocks[copy_source]) or copy_source in bm._cached
    assert_idle(bm, 8)


def test_copy_source_is_held_until_the_step_is_built():
    """Allocations later in the same step must not evict (and overwrite) a copy's source."""
    bm = BlockManager(4, 4)
    table = run_and_free(bm, 0, [1, 2, 3, 4, 5, 6])  # a full block and a partial one, cached
    seq = make_seq(1, [1, 2, 3, 4, 5, 9])
    assert bm.allocate_prefix(seq, 5) == 5
    assert bm._copies == {seq.block_table[1]: table[1]}
    assert bm.num_free_blocks == 1  # the held source is not among them
    hog = make_seq(2, [200, 201, 202, 203])
    bm.append_slots(hog, 4)  # another admission of the same step takes what is left
    assert table[1] not in hog.block_table
    assert bm.take_copies() == [(table[1], seq.block_table[1])]
    assert table[1] in bm._cached  # released: cached again, findable
    bm.free(hog)
    bm.free(seq)
    assert_idle(bm, 4)


def test_blocks_sealed_in_the_step_being_built_are_not_copied_from():
    """Their KV is written by the step, after its copies: sharing whole is fine, copying not."""
    bm = BlockManager(8, 4)
    a = make_seq(0, list(range(9)))
    bm.allocate_prefix(a, 8)
    bm.append_slots(a, 9)
    a.num_computed_tokens = 9
    bm.seal_full_blocks(a, 9, filling=True)  # as the scheduler does for a chunk
    b = make_seq(1, [0, 1, 2, 3, 4, 5, 50, 51])
    assert bm.allocate_prefix(b, 7) == 4  # block 0 shared, block 1 (filling) not copied
    assert bm.take_copies() == []
    c = make_seq(2, [0, 1, 2, 3, 4, 5, 50, 51])
    assert bm.allocate_prefix(c, 7) == 6  # the next step: block 1 is written, copy it
    assert bm.take_copies() == [(a.block_table[1], c.block_table[1])]


def test_reset_prefix_cache_forgets_partial_blocks():
    bm = BlockManager(8, 4)
    run_and_free(bm, 0, [1, 2, 3, 4, 5, 6])
    assert bm.num_cached_blocks == 2
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm._children == {}
    seq, copies = admit(bm, 1, [1, 2, 3, 4, 5, 6, 7])
    assert seq.num_computed_tokens == 0 and copies == []


def test_hash_collisions_are_caught_by_comparing_tokens(monkeypatch):
    """Every block hashing alike: whole blocks are shared only with equal tokens, and a
    partial match counts only the tokens that really are equal."""
    monkeypatch.setattr("nano_qwen3_mlx.engine.block_manager.chain_hash", lambda prev, tokens: 7)
    bm = BlockManager(8, 4)
    first = run_and_free(bm, 0, [1, 2, 3, 4, 5])
    seq, copies = admit(bm, 1, [1, 2, 9, 9, 9, 9])
    assert seq.num_computed_tokens == 2  # same hash as [1, 2, 3, 4], not the same tokens
    assert copies == [(first[0], seq.block_table[0])] and seq.block_table[0] != first[0]
    bm.free(seq)
    seq, copies = admit(bm, 2, [8, 8, 8, 8, 8])
    assert seq.num_computed_tokens == 0 and copies == []
