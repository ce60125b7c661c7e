"""How an engine joins a distributed job: shard its model, then lead or follow."""

from __future__ import annotations

import logging
from typing import Any

from .channel import Channel
from .follower import Follower
from .leader import Leader
from .sharding import shard_model
from .world import World

log = logging.getLogger(__name__)
_sharded: set[int] = set()  # ids of models sharded already (a LoadedModel may be reused)


def shard_once(model: Any, world: World) -> None:
    """Shard ``model`` over the job (once per model object); nothing in a single process."""
    if world.distributed and id(model) not in _sharded:
        shard_model(model, world.group)
        _sharded.add(id(model))


def attach(engine: Any, world: World) -> Leader | Follower | None:
    """Rank 0's ``Leader`` or another rank's ``Follower`` for ``engine`` (built, pools
    sized); None in a single process. Every rank must call it: they exchange their memory."""
    if not world.distributed:
        return None
    channel = Channel(world.group)
    return (Follower if world.is_follower else Leader)(engine, world, channel)
