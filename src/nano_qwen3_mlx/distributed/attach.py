"""How an engine joins a distributed job: load its share of the model, then lead or follow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..models.loader import LoadedModel, ModelLoadError, load
from .channel import Channel
from .follower import Follower
from .leader import Leader
from .pipeline import pipeline_model
from .sharding import shard_model
from .world import World

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..config import EngineConfig

log = logging.getLogger(__name__)
_split: set[int] = set()  # ids of models split already (a LoadedModel may be reused)


def splitter(world: World) -> Callable[[nn.Module], None] | None:
    """What keeps this rank's share of a model: ``pipeline_model`` (``--pipeline``) or
    ``shard_model`` (tensor parallel); None in a single process."""
    if not world.distributed:
        return None
    split = pipeline_model if world.mode == "pipeline" else shard_model
    return lambda model: split(model, world.group)


def load_share(config: EngineConfig, world: World,
               mtp: bool = False) -> tuple[LoadedModel, dict[str, int]]:
    """Load ``config.model`` as this rank's share, split before its weights are read (so a
    rank never holds the whole model: the point for a model larger than one machine), and
    the whole model's parameter counts (taken before the split). ``mtp``: with the
    checkpoint's multi-token prediction head (one process only)."""
    counts: dict[str, int] = {}
    split = splitter(world)

    def prepare(model: nn.Module) -> None:
        counts.update(model.num_parameters())  # shapes only: nothing is read yet
        if split is None:
            return
        try:
            split(model)
        except ValueError as exc:  # a size the ranks do not divide
            hint = "; --pipeline splits by layers instead" if world.mode == "tensor" else ""
            raise ModelLoadError(f"{exc} ({world.mode} parallel){hint}") from None

    loaded = load(config.model, dtype=config.dtype, quantize=config.quantize, prepare=prepare,
                  mtp=mtp)
    if split is not None:
        log.info("rank %d of %d holds its %s share of %s", world.rank, world.size, world.mode,
                 config.model)
    return loaded, counts


def share_loaded(loaded: LoadedModel, world: World) -> dict[str, int]:
    """For a model passed in already loaded: its parameter counts, then (once per model
    object) this rank's share kept in place. Loading through ``load_share`` is lighter: here
    each rank has held the whole model first."""
    counts = loaded.model.num_parameters()
    split = splitter(world)
    if split is not None and id(loaded.model) not in _split:
        split(loaded.model)
        _split.add(id(loaded.model))
    return counts


def attach(engine: Any, world: World) -> Leader | Follower | None:
    """Rank 0's ``Leader`` or another rank's ``Follower`` for ``engine`` (built, pools
    sized); None in a single process. Every rank must call it: they exchange their memory."""
    if not world.distributed:
        return None
    channel = Channel(world.group)
    return (Follower if world.is_follower else Leader)(engine, world, channel)
