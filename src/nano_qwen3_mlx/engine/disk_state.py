"""``DiskSnapshots``: a hybrid model's recurrent-state snapshots in the prefix cache's disk tier.

A recurrent state resumes a prompt only where a snapshot was taken (``state_manager.py``),
so KV blocks alone cannot restart a hybrid prompt. A snapshot at a block boundary (position
``k * block_size``: the snapshot interval's, a split chunk's, a prompt's end there) is
stored beside the KV blocks, under ``sha256(b"state" + the disk key of block k - 1)``: the
same chained hash as the KV it needs, so it can only match the same model and tokens. Its
payload is every recurrent layer's state arrays, in order, as bytes. Snapshots inside a
block are not stored: the KV of their partial block is never on disk.

Writes: once a snapshot is written (``StateManager.commit``: its step is queued) and its
anchor block has a disk key, ``capture`` gathers its slot from the state pool (lazily,
behind that step), handed to the store's writer with the tier's captured blocks.
Reads: after the reader thread read a chain of KV blocks, ``read`` looks for the last
block boundary in it that has a snapshot file and reads that (the chain is cut there: KV
past the last snapshot cannot be resumed from). On the engine thread ``install`` puts both
in RAM before the request reaches the scheduler: the blocks as cached blocks, the state in
a snapshot slot, indexed as ``StateManager`` indexes its own, so admission resumes there
through the ordinary RAM path. A missing or damaged file is a miss: the prompt is computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .state_prefix import Snapshot

if TYPE_CHECKING:
    from .block_manager import BlockManager
    from .disk_cache import DiskStore
    from .state_cache import StateCache
    from .state_manager import StateManager

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def state_key(block_key: bytes) -> bytes:
    """The file key of the snapshot after the block whose disk key is ``block_key``."""
    return hashlib.sha256(b"state" + block_key).digest()


class DiskSnapshots:
    """Moves block-aligned snapshots between ``states``/``state_cache()`` and ``store``."""

    def __init__(self, store: DiskStore, states: StateManager,
                 state_cache: Callable[[], StateCache], block_size: int) -> None:
        self.store, self.states, self.state_cache = store, states, state_cache
        self.block_size = block_size
        self.arrays = [(shape, dtype) for layer in state_cache().layers
                       for shape, dtype in zip(layer.shapes, layer.dtypes)]
        self.nbytes = state_cache().bytes_per_slot
        self._seen: dict = {}  # snapshot key -> the Snapshot already handled (stored or queued)
        self.num_written = self.num_loaded = 0

    # ---- writes -------------------------------------------------------------------------
    def capture(self, key_of: Callable[[int], bytes | None], room: int
                ) -> tuple[list[bytes], mx.array] | None:
        """The snapshots written since the last call that can be stored (block-aligned,
        anchor keyed), at most ``room``: their file keys and their bytes, one row each,
        queued on the device (not waited for)."""
        live = {snap.key: snap for snap in self.states.snapshots}
        self._seen = {k: s for k, s in self._seen.items() if live.get(k) is s}
        keys, slots = [], []
        for snap in live.values():
            if snap.seq is not None or snap.position % self.block_size \
                    or self._seen.get(snap.key) is snap:
                continue
            anchor = key_of(snap.anchor)
            if anchor is None:
                continue  # its block is not keyed (yet): looked at again next step
            key = state_key(anchor)
            if self.store.contains(key):
                self._seen[snap.key] = snap
            elif len(keys) < room:  # no room: looked at again next step
                self._seen[snap.key] = snap
                keys.append(key)
                slots.append(snap.slot)
        if not keys:
            return None
        idx = mx.array(slots, mx.int32)
        rows = [pool[idx].reshape(len(slots), -1).view(mx.uint8)
                for pools in self.state_cache().pools for pool in pools]
        data = mx.concatenate(rows, axis=1)
        mx.async_eval(data)
        self.num_written += len(keys)
        return keys, data

    # ---- reads (reader thread) ----------------------------------------------------------
    def read(self, block_keys: list[bytes], start: int, end: int
             ) -> tuple[int, list[np.ndarray]] | None:
        """The last snapshot file after one of the blocks ``start .. end - 1`` of the chain
        ``block_keys`` (absolute indices): ``(its block count k, its arrays)``, or None."""
        for k in range(end, start, -1):
            key = state_key(block_keys[k - 1])
            if not self.store.contains(key):
                continue
            host = [np.empty(shape, _UINT[dtype.size]) for shape, dtype in self.arrays]
            if self.store.get_into(key, [memoryview(h).cast("B") for h in host]):
                return k, host
        return None

    # ---- install (engine thread) --------------------------------------------------------
    def install(self, seq, bm: BlockManager, position: int, host: list[np.ndarray]) -> bool:
        """Index the state ``host`` after ``seq``'s first ``position`` tokens as a snapshot
        (``seq`` holds the blocks up to there now). False where no slot can be had, or the
        prefix is not keyable; an equal snapshot already in RAM is kept."""
        found = self.states._key(seq, bm, position)
        if found is None:
            return False
        if found[0] in self.states._snapshots:
            return True
        slot = self.states._snapshot_slot()
        if slot is None:
            return False
        cache = self.state_cache()
        arrays = iter(mx.array(h).view(dtype) for h, (_, dtype) in zip(host, self.arrays))
        where = mx.array([slot], mx.int32)
        for layer in range(len(cache.layers)):
            cache.write(layer, where, [next(arrays)[None] for _ in cache.pools[layer]])
        self.states._add(Snapshot(slot, position, *found))
        self.num_loaded += 1
        return True
