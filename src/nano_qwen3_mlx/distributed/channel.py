"""The plan channel: rank 0 broadcasts int32 words, the other ranks receive them.

A broadcast is an ``all_sum`` to which only rank 0 contributes: its size first, then the
words. Every rank must run the same collectives in the same order: they run in the order
they are queued on the stream, but two that are independent in one graph may run in either
order, so each one here depends on the one before. Rank 0 only queues
its broadcast (it needs no answer) and goes on queueing its step behind it; a follower
waits for the words, then queues the same step.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


class Channel:
    """Broadcasts over ``group`` (``World.group``)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def send(self, words: list[int]) -> None:
        """Rank 0: queue the broadcast of ``words`` (not empty) and return at once."""
        size = mx.distributed.all_sum(mx.array([len(words)], mx.int32), group=self.group)
        # After the size: collectives independent in the graph may run in either order.
        words_in = mx.depends(mx.array(np.asarray(words, np.int32)), size)
        data = mx.distributed.all_sum(words_in, group=self.group)
        mx.async_eval(data)

    def receive(self) -> list[int]:
        """Another rank: wait for rank 0's next broadcast."""
        size = mx.distributed.all_sum(mx.zeros((1,), mx.int32), group=self.group)
        n = int(size.item())
        data = mx.distributed.all_sum(mx.zeros((n,), mx.int32), group=self.group)
        out = data.tolist()
        return out

    def barrier(self) -> int:
        """Every rank: wait for all of them; returns how many took part (an error if one
        is gone: the backend reports a lost peer)."""
        return int(mx.distributed.all_sum(mx.ones((1,), mx.int32), group=self.group).item())

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank: each rank's ``values`` (same length everywhere), by rank."""
        out = mx.distributed.all_gather(mx.array(np.asarray(values, np.int64)), group=self.group)
        flat = out.tolist()
        n = len(values)
        return [flat[r * n:(r + 1) * n] for r in range(len(flat) // n)]

    def share(self, token_ids: mx.array) -> mx.array:
        """Rank 0: its sampled ids, summed with the followers' zeros (lazily, in the step's
        graph), so every rank's next step reads the same ids from the device."""
        return mx.distributed.all_sum(token_ids, group=self.group)

    def follow_shared(self, num_rows: int, after: mx.array) -> mx.array:
        """A follower: rank 0's ``share`` of ``num_rows`` ids, computed after ``after`` (the
        logits: a vocabulary-sharded output layer gathers them from every rank first)."""
        zeros = mx.depends(mx.zeros((num_rows,), mx.int32), after)
        return mx.distributed.all_sum(zeros, group=self.group)
