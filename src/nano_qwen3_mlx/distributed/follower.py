"""A follower rank: runs rank 0's step plans with its shard of the model and pools."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import mlx.core as mx

from ..engine.sampler import SamplerOutput
from ..engine.state_cache import StateCache
from ..errors import first_line
from .channel import Channel
from .leader import memory_words
from .plan import COPY, STOP, Plan, PlanReader, Words
from .world import World, exit_now, report


class FollowerSampler:
    """Samples nothing: takes rank 0's ids (``Channel.follow_shared``) after the logits."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def __call__(self, logits: mx.array, seqs: list) -> SamplerOutput:
        return SamplerOutput(self.channel.follow_shared(logits.shape[0], logits))


class Follower:
    """Built by the engine of a rank other than 0; ``follow()`` is all it then does."""

    def __init__(self, engine: Any, world: World, channel: Channel) -> None:
        self.engine, self.world, self.channel = engine, world, channel
        engine.runner.sampler = FollowerSampler(channel)
        self.ranks = channel.gather(memory_words(engine))

    def stats(self) -> dict[str, Any]:
        return {}

    def follow(self, exit_when_stopped: bool = True) -> None:
        """Run every plan until rank 0 says stop, then exit 0 (or, ``exit_when_stopped=False``,
        return: the job goes on, e.g. to another engine); a lost rank 0 exits 1. Ctrl-C and
        SIGTERM are rank 0's to act on (it drains, then stops this rank)."""
        with contextlib.suppress(ValueError):  # not the main thread: left as they are
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        reader, prev = PlanReader(), None
        try:
            while True:
                plan = reader.read(self.channel.receive())
                if plan.kind == STOP:
                    self.channel.barrier()
                    break
                self._sync_pools(plan)
                prev = self.engine.runner.run(plan.batch, prev)
        except Exception as exc:  # noqa: BLE001  (a lost peer, or a plan this rank cannot run)
            report(f"error: rank {self.world.rank} stopped following rank 0: "
                   f"{type(exc).__name__}: {first_line(exc)}")
            exit_now(1)
        if exit_when_stopped:
            exit_now(0)

    def _sync_pools(self, plan: Plan) -> None:
        """Rank 0's pool sizes and state-slot copies, before its step."""
        e = self.engine
        if plan.num_blocks > e.cache.num_blocks:
            e.cache.grow(plan.num_blocks - e.cache.num_blocks)
        elif plan.num_blocks < e.cache.num_blocks:  # sized apart at start-up: rank 0's wins
            e.cache = e.runner.cache = e._new_cache(plan.num_blocks)
        if e.state_cache is not None:
            if plan.num_slots > e.state_cache.num_slots:
                e.state_cache.grow(plan.num_slots - e.state_cache.num_slots)
            elif plan.num_slots < e.state_cache.num_slots:
                e.state_cache = e.runner.states = StateCache(e.model.state_layers, plan.num_slots)
        ops = Words(plan.state_ops)
        while ops.at < len(plan.state_ops):
            if ops.one() != COPY:
                raise RuntimeError("unknown state-pool operation in the plan")
            n = ops.one()
            e.state_cache.copy_slots(ops.take(n), ops.take(n))
