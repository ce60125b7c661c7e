"""Work split over the CPU's cores: one MLX stream (one thread) per piece.

MLX runs each CPU op on one thread (its stream's). A product that reads more memory than one
thread can draw, or a softmax bigger than one core's worth, is cut into pieces, each queued
on its own stream, and the pieces joined. Decode attention (``engine.paged_attention``) and
skinny products (``split_matmul``: the output layer and, in steps of few rows, every linear
layer: ``engine.split_linear``) use it. A GPU spreads each op over its cores already.
Host code that releases the GIL (the one-row ``sgemv``, the quantized decode kernel) splits
the same way over ``host_pool``'s threads.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import mlx.core as mx

# The cores this process may run on (its affinity mask where the OS has one), read once.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
PIECES = max(1, min(8, CORES))  # pieces one product is split into (a stream each; 8 at most)

Piece = TypeVar("Piece")
# MLX streams belong to the thread that made them (an engine may run on its own thread).
_local = threading.local()


def part_stream(index: int) -> mx.Stream:
    """Piece ``index``'s stream: the default one for piece 0, one more CPU stream (thread)
    for each further piece, made once per calling thread."""
    if index == 0:
        return mx.default_stream(mx.default_device())
    streams = _local.__dict__.setdefault("streams", [])
    while len(streams) < index:
        streams.append(mx.new_stream(mx.default_device()))
    return streams[index - 1]


def on_streams(fn: Callable[[Piece], mx.array], pieces: Sequence[Piece], axis: int) -> mx.array:
    """``fn(piece)`` for every piece, piece ``i`` queued on ``part_stream(i)``, joined along
    ``axis``."""
    outs = []
    for i, piece in enumerate(pieces):
        with mx.stream(part_stream(i)):
            outs.append(fn(piece))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=axis)


def split_ranges(n: int, pieces: int) -> list[slice]:
    """``range(n)`` cut into at most ``pieces`` contiguous slices of near-equal size."""
    pieces = max(1, min(n, pieces))
    cuts = [n * i // pieces for i in range(pieces + 1)]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def split_matmul(x: mx.array, weight: mx.array) -> mx.array:
    """``x @ weight.T`` with ``weight``'s rows (output features) split over one stream per
    core: for few rows of ``x`` each piece reads its share of the weight, and the pieces
    together read it at the memory's speed where one BLAS thread cannot."""
    return on_streams(lambda rows: x @ weight[rows].T, split_ranges(weight.shape[0], PIECES),
                      axis=-1)


@functools.cache
def host_pool() -> ThreadPoolExecutor:
    """Worker threads for the pieces after the first of a host-side product (the caller's
    thread runs piece 0): one per further piece."""
    return ThreadPoolExecutor(max(1, PIECES - 1), thread_name_prefix="host-piece")
