"""``DiskTier``: moves full KV blocks between the paged pool and a ``DiskStore``.

Keys (``engine/disk_keys.py``): a SHA-256 chained over the blocks' tokens from a root that
hashes the checkpoint, the quantization and the KV layout. A file holds a block's bytes per
layer, K then V, each stored part (values; a quantized layout's scales and biases too).

Writes. ``BlockManager.seal_full_blocks`` reports each newly sealed block (``on_seal``).
At the end of the engine step that queued its KV, ``after_step`` gathers the blocks from the
pool lazily and starts them on the device behind that step (no wait); one engine step later,
after the engine has read a later step anyway, they are copied to host bytes and handed to
the store's writer thread. A full write queue skips blocks (counted), it never waits.

Reads. ``park`` (at ``add_request``) finds where the prompt's RAM prefix match ends; if the
next block is on disk, a reader thread reads the chain from there while the request waits
outside the scheduler (other streams keep stepping). ``ready`` hands the request to the
scheduler once read; at admission ``extend`` (called by ``BlockManager.allocate_prefix``
after its RAM walk) puts the blocks into fresh pool blocks and seals them, so they count as
cached tokens and are shared from RAM afterwards.

Hybrid models: their block-aligned recurrent-state snapshots go beside the blocks
(``engine/disk_state.py``); a read chain is cut at its last snapshot, and both are put in
RAM (cached blocks, a snapshot slot) before the request reaches the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .block_manager import Block, BlockManager, chain_hash
from .disk_cache import DiskStore
from .disk_keys import block_bytes, block_key

if TYPE_CHECKING:
    from .disk_state import DiskSnapshots
    from .kv_cache import PagedKVCache
    from .sequence import Sequence

WRITE_QUEUE_BYTES = 256 * 1024 * 1024  # host memory the pending writes may hold
READ_THREADS = 2  # files read (and checksummed) at once
_UINT = {1: (mx.uint8, np.uint8), 2: (mx.uint16, np.uint16), 4: (mx.uint32, np.uint32)}


class DiskTier:
    """The disk continuation of the prefix cache (see the module docstring)."""

    def __init__(self, store: DiskStore, root: bytes, block_manager: BlockManager,
                 cache: Callable[[], PagedKVCache], grow_pool: Callable[[int], int] | None,
                 snapshots: DiskSnapshots | None = None):
        self.store, self.root, self.bm = store, root, block_manager
        self.snapshots = snapshots  # a hybrid model's state snapshots; None: attention only
        self.cache, self.grow_pool = cache, grow_pool
        kv = cache()
        self.layers, self.block_size = len(kv.k_pools), kv.block_size
        # Each stored part of a row (values; for a quantized layout also scales and biases):
        # (its last-axis width, its dtype). A block file holds, per layer and K/V, each part's
        # (heads, block_size, width) matrix in that order.
        self.parts = [(w, d) for w, d in kv.layout.parts(kv.head_dim)]
        self.part_shapes = [(kv.num_kv_heads, kv.block_size, w) for w, _ in self.parts]
        self.block_bytes = block_bytes(kv)
        self._keys: dict[int, tuple[int | None, bytes]] = {}  # block id -> (its hash, disk key)
        self._to_capture: list[tuple[int, int | None, bytes]] = []
        self._captured: list[tuple[list[bytes], mx.array]] = []  # (file keys, one row each)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kv-disk-reader")
        self._io = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kv-disk-io")
        self._parked: dict[Sequence, tuple[int, Future]] = {}
        self._loaded: dict[int, tuple[Sequence, int, np.ndarray]] = {}
        self.num_loaded_blocks = self.num_loaded_tokens = 0
        self.load_s = 0.0
        # The writes' time on the engine thread (the capture and the host copy): what the
        # tier adds to a step, so to running streams' inter-token gaps.
        self.write_s = self.write_max_s = 0.0
        block_manager.on_seal, block_manager.disk_extend = self.on_seal, self.extend

    # ---- writes -------------------------------------------------------------------------
    def on_seal(self, seq: Sequence, index: int, block: Block) -> None:
        """``block`` (the ``index``-th of ``seq``) was just sealed: key it, queue it."""
        parent = self.root if index == 0 else self._key_of(seq.block_table[index - 1])
        if parent is None:
            return
        key = block_key(parent, block.token_ids)
        self._keys[block.block_id] = (block.hash, key)
        if self.store.writable and not self.store.contains(key):
            self._to_capture.append((block.block_id, block.hash, key))

    def _key_of(self, block_id: int) -> bytes | None:
        entry = self._keys.get(block_id)
        return entry[1] if entry and entry[0] == self.bm.blocks[block_id].hash else None

    def after_step(self, idle: bool = False) -> None:
        """Hand last step's captured blocks to the writer; capture the blocks sealed since.

        Called once the engine step has queued everything it queues: the pool arrays then
        include the writes of every sealed block, so the gather reads their KV. ``idle``:
        no step follows (none is in flight either), so this capture is handed over at once.
        """
        t0 = time.perf_counter()
        self._after_step(idle)
        seconds = time.perf_counter() - t0
        self.write_s += seconds
        self.write_max_s = max(self.write_max_s, seconds)

    def _after_step(self, idle: bool) -> None:
        self._flush_captured()
        # A block evicted and reused since it was sealed lost its hash: not that block any more.
        blocks = self.bm.blocks
        todo = [t for t in self._to_capture if t[0] < len(blocks) and blocks[t[0]].hash == t[1]]
        self._to_capture.clear()
        room = self.store.free_slots()
        if len(todo) > room:
            self.store.count_skipped(len(todo) - room)
            todo = todo[:room]
        if todo:
            self._capture(todo)
        if self.snapshots is not None:
            states = self.snapshots.capture(self._key_of, self.store.free_slots() - len(todo))
            if states is not None:
                self._captured.append(states)
        if idle:
            self._flush_captured()

    def _capture(self, todo: list[tuple[int, int | None, bytes]]) -> None:
        kv = self.cache()
        ids = mx.array([t[0] for t in todo], mx.int32)
        # Every block's bytes, (blocks, block_bytes), in the file's order: per layer, K then
        # V, each part (as uint8: the bytes as they are).
        rows = [pools[i][ids].reshape(len(todo), -1).view(mx.uint8)
                for i in range(self.layers) for side in (kv.k_parts, kv.v_parts) for pools in side]
        blocks = mx.concatenate(rows, axis=1)
        mx.async_eval(blocks)
        self._captured.append(([t[2] for t in todo], blocks))

    def _flush_captured(self) -> None:
        captured, self._captured = self._captured, []
        for keys, rows in captured:
            # No copy: a view of the MLX array's own memory (computed by now: it was queued
            # behind a step already read), which each row's view keeps alive until written.
            # MLX arrays are immutable and nothing takes this one as an input to donate it.
            host = np.asarray(memoryview(rows))
            for key, row in zip(keys, host):
                self.store.put(key, memoryview(row))

    # ---- reads --------------------------------------------------------------------------
    def park(self, seq: Sequence) -> bool:
        """Start reading the prompt's blocks that follow its RAM match from disk; True when
        there are any (the sequence then waits here, not in the scheduler, until read)."""
        bs = self.block_size
        num_full = (seq.num_tokens - 1) // bs  # admission leaves one prompt token to run
        start = self._ram_blocks(seq.token_ids, num_full)
        if start >= num_full:
            return False
        keys, parent = [], self.root
        for i in range(num_full):
            parent = block_key(parent, seq.token_ids[i * bs:(i + 1) * bs])
            keys.append(parent)
        if not self.store.contains(keys[start]):
            return False
        self._parked[seq] = (start, self._reader.submit(self._read_chain, keys, start))
        self._make_room(seq, start)  # meanwhile: the pool's growth overlaps the reads
        return True

    def _make_room(self, seq: Sequence, matched: int) -> None:
        """Grow the pool (where it may) so that the blocks of ``seq``'s prompt past its first
        ``matched`` and its first decode fit at once: one growth, not one for the loaded
        blocks and another (doubling the pool) for the prompt's last tokens."""
        need = seq.num_tokens // self.block_size + 1 - matched
        if need > self.bm.num_free_blocks and self.grow_pool is not None:
            self.grow_pool(need - self.bm.num_free_blocks)

    def _read_chain(self, keys: list[bytes], start: int) -> tuple[list[np.ndarray] | None, float,
                                                                   tuple | None]:
        """The blocks ``start ..`` of the chain ``keys`` that are on disk, the seconds it
        took, and for a hybrid model the last snapshot among them (the blocks cut there;
        none without one: nothing could resume)."""
        host, seconds = self._read(keys[start:])
        if self.snapshots is None or host is None:
            return host, seconds, None
        t0 = time.perf_counter()
        state = self.snapshots.read(keys, start, start + host[0].shape[2])
        seconds += time.perf_counter() - t0
        if state is None:
            return None, seconds, None
        return [h[:, :, :state[0] - start] for h in host], seconds, state

    def _ram_blocks(self, token_ids: list[int], num_full: int) -> int:
        """How many leading full blocks the RAM prefix cache holds now (as allocate_prefix
        would walk them; reads BlockManager's index)."""
        prev, bs = None, self.block_size
        for i in range(num_full):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            block_id = self.bm._by_hash.get(h := chain_hash(prev, tokens))
            if block_id is None or self.bm.blocks[block_id].token_ids != tokens:
                return i
            prev = h
        return num_full

    def _read(self, keys: list[bytes]) -> tuple[list[np.ndarray] | None, float]:
        """Read the chain's files until the first miss into one host array per stored part,
        laid out already as the pool writes want them,
        ``(layers, K/V, blocks, heads, block_size, width)``: every copy but the last one
        happens here, off the engine thread."""
        t0, n = time.perf_counter(), 0
        # Virtual memory until written: only the blocks actually read are touched.
        host = [np.empty((self.layers, 2, len(keys), *shape), _UINT[dtype.size][1])
                for shape, (_, dtype) in zip(self.part_shapes, self.parts)]

        def read(b: int) -> bool:  # a block's file: per (layer, K/V), each part's matrix
            return self.store.get_into(keys[b], [memoryview(h[i, j, b]).cast("B")
                                                 for i in range(self.layers) for j in range(2)
                                                 for h in host])

        # Reads and CRCs release the GIL: READ_THREADS files at a time, up to the first
        # block the index does not hold (a damaged file still ends the chain there).
        stored = next((b for b, key in enumerate(keys) if not self.store.contains(key)), len(keys))
        futures = [self._io.submit(read, b) for b in range(stored)]
        for future in futures:
            if not future.result():
                break
            n += 1
        for future in futures[n:]:
            future.cancel()
        wait(futures[n:])  # none writes into ``host`` once it is handed over
        return ([h[:, :, :n] for h in host] if n else None), time.perf_counter() - t0

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def ready(self, idle: bool = False) -> list[Sequence]:
        """Parked sequences whose read is done (for the scheduler); ``idle``: nothing else
        to do, so wait a little for a read instead of spinning."""
        if idle and self._parked:
            wait([f for _, f in self._parked.values()], timeout=0.05, return_when="FIRST_COMPLETED")
        out = []
        for seq, (start, future) in list(self._parked.items()):
            if seq.is_finished or future.done():
                del self._parked[seq]
            if future.done() and not seq.is_finished:
                host, seconds, state = future.result()
                self.load_s += seconds
                if host is not None:
                    self._loaded[seq.seq_id] = (seq, start, host)
                if state is not None:
                    self._install(seq, *state)
                out.append(seq)
        for seq_id, (seq, _, _) in list(self._loaded.items()):
            if seq.is_finished:  # aborted before admission
                del self._loaded[seq_id]
        return out

    def _install(self, seq: Sequence, num_blocks: int, state: list[np.ndarray]) -> None:
        """A hybrid model's read: the blocks into the pool (cached, as a freed sequence's)
        and the state after them into a snapshot slot, so that admission finds both in RAM.
        Where the blocks cannot all be had (the RAM chain before them was evicted since, no
        room), nothing is resumed: the prompt is computed."""
        position = num_blocks * self.block_size
        if self.bm.allocate_prefix(seq, position) == position:  # the RAM walk, then extend
            self.snapshots.install(seq, self.bm, position, state)
        self.bm.undo_allocate_prefix(seq)
        self._loaded.pop(seq.seq_id, None)

    def extend(self, seq: Sequence, max_tokens: int) -> None:
        """After the RAM walk of ``allocate_prefix``: load the read blocks that continue it
        into fresh pool blocks and seal them (shared from RAM from now on)."""
        entry = self._loaded.pop(seq.seq_id, None)
        matched = len(seq.block_table)
        if entry is None or matched < entry[1]:
            return  # nothing read, or RAM blocks between were evicted: the chain has a gap
        _, start, host = entry
        first = matched - start
        n = min(host[0].shape[2] - first, max_tokens // self.block_size - matched)
        self._make_room(seq, matched)  # grown at park already, unless others took blocks since
        n = min(n, self.bm.num_free_blocks)
        if n <= 0:
            return
        seq.num_hashed_blocks, seq.num_computed_tokens = matched, matched * self.block_size
        self.bm.append_slots(seq, n * self.block_size)
        self._write_pool(seq.block_table[matched:], [h[:, :, first:first + n] for h in host])
        self.bm.seal_full_blocks(seq, len(seq.block_table) * self.block_size)
        self.num_loaded_blocks += n
        self.num_loaded_tokens += n * self.block_size

    def _write_pool(self, block_ids: list[int], host: list[np.ndarray]) -> None:
        """Queue the pool writes (lazy, ordered before the step that reads them). Fresh
        blocks mostly have consecutive ids (a grown pool's): each run of them is one slice
        update per layer, K/V and part, ~5x faster on the CPU than an indexed scatter."""
        kv = self.cache()
        runs = _runs(block_ids)
        for p, (h, (_, dtype)) in enumerate(zip(host, self.parts)):
            blocks = mx.array(h).view(dtype)  # the one copy on the engine thread
            for i in range(self.layers):
                for pools, side in ((kv.k_parts[p], 0), (kv.v_parts[p], 1)):
                    for at, first, n in runs:
                        pools[i][first:first + n] = blocks[i, side, at:at + n]

    # ---- life and stats -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self.store.stats() | {
            "tokens_loaded": self.num_loaded_tokens, "blocks_loaded": self.num_loaded_blocks,
            "load_s": self.load_s, "requests_reading": len(self._parked),
            "engine_write_s": self.write_s, "engine_write_max_s": self.write_max_s,
            **({"snapshots_written": self.snapshots.num_written,
                "snapshots_loaded": self.snapshots.num_loaded} if self.snapshots else {})}

    def close(self) -> None:
        """Write what was captured, finish queued writes, release the directory."""
        self._flush_captured()
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """``ids`` as runs of consecutive values: (index in ``ids``, first value, length)."""
    runs: list[tuple[int, int, int]] = []
    for k, block_id in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((k, block_id, 1))
    return runs
