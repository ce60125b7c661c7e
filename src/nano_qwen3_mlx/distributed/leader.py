"""Rank 0's side of a distributed engine: it plans, the other ranks follow (``follower.py``)."""

from __future__ import annotations

import atexit
import logging
from typing import Any

import mlx.core as mx

from ..errors import first_line
from .channel import Channel
from .plan import COPY, STOP, PlanWriter
from .world import World, exit_after, exit_now, report

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 15.0  # the followers answer a stop at once unless one is gone


class RecordingSlots:
    """The state pool as ``StateManager`` sees it on rank 0: its slot copies also go into
    the next plan, so the followers' pools stay the same (its size travels in every plan)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.ops: list[int] = []

    @property
    def num_slots(self) -> int:
        return self.device.num_slots

    def grow(self, num_new_slots: int) -> None:
        self.device.grow(num_new_slots)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        self.device.copy_slots(src, dst)
        self.ops += [COPY, len(src), *src, *dst]

    def take(self) -> list[int]:
        ops, self.ops = self.ops, []
        return ops


class SharedSampler:
    """Rank 0's sampler: its ids reach every rank inside the step's graph (``Channel.share``)."""

    def __init__(self, sampler: Any, channel: Channel) -> None:
        self.sampler, self.channel = sampler, channel

    def __call__(self, logits: mx.array, seqs: list) -> Any:
        out = self.sampler(logits, seqs)
        out.token_ids = self.channel.share(out.token_ids)
        return out


def memory_words(engine: Any) -> list[int]:
    """What each rank tells rank 0 at start-up: its weights' bytes, one KV block's bytes
    and one state slot's (its shard's: ``/stats`` scales the pools' sizes by them)."""
    slot = engine.states.bytes_per_slot if engine.states is not None else 0
    return [engine.weights_nbytes, engine._block_bytes(), slot]


class Leader:
    """Broadcasts each step's plan before queueing it; ends the followers at close."""

    def __init__(self, engine: Any, world: World, channel: Channel) -> None:
        self.engine, self.world, self.channel = engine, world, channel
        self.writer = PlanWriter()
        self.slots = None
        if engine.states is not None:
            self.slots = engine.states.device = RecordingSlots(engine.state_cache)
        engine.runner.sampler = SharedSampler(engine.sampler, channel)
        engine.runner.before_run = self.send_plan
        self.ranks = channel.gather(memory_words(engine))
        self._stopped = False
        atexit.register(self.stop)  # a script that never calls close() still ends the job

    def send_plan(self, batch: Any) -> None:
        engine = self.engine
        num_slots = engine.state_cache.num_slots if engine.state_cache is not None else -1
        ops = self.slots.take() if self.slots is not None else []
        self.channel.send(self.writer.step(batch, engine.cache.num_blocks, num_slots, ops))

    def stop(self) -> None:
        """Tell the followers to exit and wait for all of them; a rank already gone ends
        this process too, with an error (a supervisor sees the job failed)."""
        if self._stopped:
            return
        self._stopped = True
        watchdog = exit_after(STOP_TIMEOUT_S, "a rank of the distributed job is gone: it did "
                              f"not answer the stop within {STOP_TIMEOUT_S:g} s")
        try:
            self.channel.send([STOP])
            self.channel.barrier()
        except Exception as exc:  # noqa: BLE001  (any backend's lost-peer error)
            report(f"error: a rank of the distributed job is gone: {first_line(exc)}")
            exit_now(1)
        watchdog.cancel()

    def fatal(self, exc: BaseException) -> None:
        """A step raised: the ranks' collectives may no longer match, so the job ends."""
        report(f"error: distributed engine step failed ({type(exc).__name__}: "
               f"{first_line(exc)}); ending every rank")
        exit_now(1)

    def stats(self) -> dict[str, Any]:
        """Per rank: weights, and the KV and state pools at their current sizes."""
        e, (_, block0, slot0) = self.engine, self.ranks[0]
        ranks = []
        for rank, (weights, block, slot) in enumerate(self.ranks):
            kv = e.cache.nbytes * block // max(block0, 1)
            state = e.state_cache.nbytes * slot // max(slot0, 1) if e.state_cache is not None else 0
            ranks.append({"rank": rank, "weights_bytes": weights, "kv_bytes": kv,
                          "state_bytes": state})
        return {"ranks": ranks}
