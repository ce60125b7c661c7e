"""Per-sequence recurrent states of a hybrid model's linear-attention layers, in MLX.

The KV cache grows with a sequence; a recurrent layer (Gated DeltaNet) keeps a fixed-size
state per sequence instead: a convolution window and a matrix. ``StateCache`` holds, per
recurrent layer and per state array, one pool ``(num_slots + 1, *shape)``: axis 0 indexes
slots, the last slot is a scratch. A slot holds either a running sequence's state or a
snapshot (the state of some prefix, kept for prefix reuse); ``state_manager.StateManager``
decides which. Like the KV pools, each pool has exactly one reference (the list slot), so
``pool[idx] = x`` updates it in place: one scatter per state array per layer per step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from ..models.contract import LayerState
from .kv_pool import max_snapshots
from .state_manager import StateManager

log = logging.getLogger(__name__)


class StateCache:
    """``pools[layer][i]``: state array ``i`` of recurrent layer ``layer``, all slots."""

    def __init__(self, layers: Sequence[LayerState], num_slots: int) -> None:
        self.layers = list(layers)
        self.num_slots = num_slots
        self.pools = [[mx.zeros((num_slots + 1, *shape), dtype)
                       for shape, dtype in zip(layer.shapes, layer.dtypes)]
                      for layer in self.layers]
        mx.eval(self.pools)

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    @property
    def bytes_per_slot(self) -> int:
        """One sequence's state over all recurrent layers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * (self.num_slots + 1)

    def grow(self, num_new_slots: int) -> None:
        """Add slots; existing slots keep their ids and contents (the scratch slot moves to
        the new end, as the KV pool's scratch block does)."""
        if num_new_slots <= 0:
            return
        for pools in self.pools:
            for i, pool in enumerate(pools):
                pools[i] = mx.concatenate([pool, mx.zeros((num_new_slots, *pool.shape[1:]),
                                                          pool.dtype)])
        self.num_slots += num_new_slots
        mx.eval(self.pools)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy slot ``src[i]`` over slot ``dst[i]`` in every pool (a snapshot restored into a
        sequence's slot). Lazy: queued before the step that reads ``dst``; every source is
        read before any destination is written."""
        if not src:
            return
        s, d = mx.array(src, mx.int32), mx.array(dst, mx.int32)
        for pools in self.pools:
            for pool in pools:
                pool[d] = pool[s]

    def read(self, layer: int, slots: mx.array) -> list[mx.array]:
        """The states of ``slots`` ``(n,)``: one ``(n, *shape)`` array per state array."""
        return [pool[slots] for pool in self.pools[layer]]

    def write(self, layer: int, slots: mx.array, states: Sequence[mx.array]) -> None:
        """Store ``states[i]`` ``(n, *shape)`` at ``slots`` ``(n,)``, in place."""
        for pool, state in zip(self.pools[layer], states):
            pool[slots] = state.astype(pool.dtype)


def build_state_pool(layers: Sequence[LayerState], config: Any, budget: float
                     ) -> tuple[StateCache, StateManager]:
    """The state pool of an ``EngineConfig``: a few slots at first, doubling on demand up to
    one per running sequence plus the snapshots (``budget``: the caches' memory budget).

    Running sequences' states may take half the budget: where ``max_num_seqs`` of them do
    not fit (large hybrid models on small machines), fewer run at once
    (``StateManager.max_num_seqs``) rather than the engine refusing to start."""
    slot_bytes = sum(layer.nbytes for layer in layers)
    snapshots = max_snapshots(config, budget, slot_bytes)
    num_seqs = max(1, min(config.max_num_seqs, int(budget / 2 // slot_bytes)))
    if num_seqs < config.max_num_seqs:
        log.warning("max_num_seqs %d lowered to %d: that many recurrent states (%.1f MB each) "
                    "take half the cache budget (%.2f GB)", config.max_num_seqs, num_seqs,
                    slot_bytes / 1e6, budget / 1e9)
    cache = StateCache(layers, min(8, num_seqs + snapshots))
    states = StateManager(cache, num_seqs, snapshots, config.state_snapshot_interval,
                          config.block_size, slot_bytes)
    log.info("state pool: %d slots x %.1f MB; cap %d slots (%d snapshots every %d tokens)",
             cache.num_slots, slot_bytes / 1e6, states.cap_slots, snapshots,
             config.state_snapshot_interval)
    return cache, states
