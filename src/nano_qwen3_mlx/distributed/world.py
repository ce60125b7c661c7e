"""Which rank of which job this process is: ``mlx.launch`` (ring, JACCL) or ``mpirun``."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

# Set by the launchers: mlx.launch (every backend sets MLX_RANK), Open MPI, MPICH / PMI.
LAUNCH_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``mode``: ``"single"`` (one process), ``"tensor"``
    (every rank holds a shard of every layer) or ``"pipeline"`` (every rank holds a run of
    the layers); in both, rank 0 schedules and the others follow."""

    rank: int = 0
    size: int = 1
    mode: str = "single"
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_follower(self) -> bool:
        """A rank that runs rank 0's plans and never schedules, serves or prints."""
        return self.rank > 0

    def with_mode(self, pipeline: bool) -> World:
        """This job split by layers (``pipeline``) or within every layer (tensor parallel);
        a single process stays ``"single"``."""
        if not self.distributed:
            return self
        return replace(self, mode="pipeline" if pipeline else "tensor")

    def as_dict(self) -> dict[str, Any]:
        return {"world_size": self.size, "rank": self.rank, "mode": self.mode}


_world: World | None = None
_stderr: TextIO = sys.stderr  # a follower's real stderr (its sys.stderr is silenced)


def launched() -> bool:
    """Was this process started by a distributed launcher?"""
    return any(name in os.environ for name in LAUNCH_VARS)


def get_world() -> World:
    """The job this process belongs to; ``mx.distributed.init()`` once, on first use. A
    process not started by a launcher (or a job of one rank) is ``World()``."""
    global _world
    if _world is None:
        _world = _init() if launched() else World()
    return _world


def _init() -> World:
    import mlx.core as mx

    if not mx.distributed.is_available():
        raise RuntimeError("started by a distributed launcher, but this MLX build has no "
                           "distributed backend")
    group = mx.distributed.init()
    if group.size() == 1:
        return World()
    return World(group.rank(), group.size(), "tensor", group)


def silence_followers() -> None:
    """On a follower rank, stdout and stderr go nowhere (rank 0 prints and serves once);
    its ``error:`` lines and tracebacks still reach the real stderr (``report``)."""
    global _stderr
    if not get_world().is_follower or sys.stdout is None:
        return
    _stderr = sys.stderr
    null = open(os.devnull, "w")  # noqa: SIM115  (for the process's lifetime)
    sys.stdout = sys.stderr = null
    sys.excepthook = lambda kind, exc, tb: _traceback(kind, exc, tb)


def _traceback(kind: Any, exc: BaseException, tb: Any) -> None:
    import traceback

    traceback.print_exception(kind, exc, tb, file=_stderr)


def report(line: str) -> None:
    """One line on the real stderr, prefixed with the rank (followers' included)."""
    world = get_world()
    prefix = f"[rank {world.rank}] " if world.distributed else ""
    _stderr.write(f"{prefix}{line}\n")
    _stderr.flush()


def exit_after(seconds: float, why: str) -> threading.Timer:
    """A watchdog: unless cancelled within ``seconds``, report ``error: {why}`` and exit 1.
    A backend may block for good in a collective once a peer is gone (the ring backend
    does, after failing the collective in flight); this bounds such a wait."""
    timer = threading.Timer(seconds, lambda: (report(f"error: {why}"), exit_now(1)))
    timer.daemon = True
    timer.start()
    return timer


def exit_now(code: int) -> None:
    """End the process at once (no interpreter teardown: MLX's threads may be mid-collective)."""
    for stream in (sys.stdout, sys.stderr, _stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
