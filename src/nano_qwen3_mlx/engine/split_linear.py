"""Linear layers whose skinny products split over the CPU's streams while the BLAS runs on
one thread (``blas.set_single_threaded``: steps of few rows).

OpenBLAS's own threads and MLX's streams contend for the same cores; with OpenBLAS on one
thread, a product of few rows split by output feature over one stream per core
(``streams.split_matmul``) runs as fast as OpenBLAS's two threads (8 x 1024 @ 1024 x 3072:
0.95 vs 1.05 ms) and leaves the cores to the streams. The engine swaps the class of the
model's ``nn.Linear`` instances (``split_linears``): names, weights and the model's code stay
as they are.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .. import blas
from ..streams import split_matmul

MAX_ROWS = 64  # the most rows (tokens) a step may have to run with the BLAS on one thread
# A smaller weight is multiplied whole: the streams' hand-off costs what the second core saves
# (one thread vs split, 8 rows: 0.8 MiB 0.09 vs 0.12 ms, 2 MiB 0.26 vs 0.25, 4 MiB 0.55 vs 0.41).
MIN_SPLIT_BYTES = 2 << 20


def use_single_thread(num_tokens: int, num_prefill_tokens: int) -> None:
    """Before a step is queued: the BLAS on one thread (and the split products) for a step
    of 2 to ``MAX_ROWS`` rows that computes no prompt tokens (a batch's decode), on its own
    threads otherwise.

    A single row (batch-1 decode) keeps the threads: its output layer is one ``sgemv`` on
    them, and measured the policy lost there (1 x 512 16.7 -> 18.1 ms, 1 x 8,192 32.8 ->
    38.7 ms). So does every step with a prompt chunk, however small: the prefill pacer
    (``prefill_pacer.py``) learns a mixed step's cost from earlier mixed steps, and a chunk
    crossing ``MAX_ROWS`` would change the regime under it (its p99/p50 went 1.06 -> 1.3-2.1).
    """
    blas.set_single_threaded(1 < num_tokens <= MAX_ROWS and not num_prefill_tokens)


def release_threads() -> None:
    """The BLAS on its own threads again: the engine is idle (or closing), and the
    process's other BLAS users (the application around ``LLM``, a peer engine in a
    benchmark) should find it as the library set it."""
    blas.set_single_threaded(False)


def split_product(x: mx.array, weight: mx.array) -> mx.array | None:
    """``x @ weight.T`` split over the streams (``streams.split_matmul``) where this step runs
    the BLAS on one thread, ``x`` has at most ``MAX_ROWS`` rows and the weight holds
    ``MIN_SPLIT_BYTES`` or more; None where the product is better left whole."""
    if (not blas.single_threaded() or x.size // x.shape[-1] > MAX_ROWS
            or weight.nbytes < MIN_SPLIT_BYTES):
        return None
    return split_matmul(x, weight)


class StreamSplitLinear(nn.Linear):
    """``nn.Linear`` that splits its product over the streams while the BLAS is on one thread."""

    def __call__(self, x: mx.array) -> mx.array:
        out = split_product(x, self["weight"])
        if out is None:
            return super().__call__(x)
        return out + self["bias"] if "bias" in self else out


class StreamSplitEmbedding(nn.Embedding):
    """``nn.Embedding`` whose ``as_linear`` (a tied output layer) splits as ``StreamSplitLinear``."""

    def as_linear(self, x: mx.array) -> mx.array:
        out = split_product(x, self["weight"])
        return super().as_linear(x) if out is None else out


def split_linears(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a ``StreamSplitLinear`` and every plain
    ``nn.Embedding`` a ``StreamSplitEmbedding`` (quantized and sharded layers are other
    classes and stay) where the BLAS's threads can be switched; the number swapped."""
    if not isinstance(model, nn.Module) or not blas.threads_switchable():
        return 0
    return swap_classes(model, {nn.Linear: StreamSplitLinear, nn.Embedding: StreamSplitEmbedding})


def swap_classes(model: nn.Module, kinds: dict[type, type]) -> int:
    """Give every module of ``model`` whose exact class is a key of ``kinds`` that key's
    value (a subclass: names, weights and the model's code stay); the number swapped."""
    swapped = 0
    for _, module in model.named_modules():
        kind = kinds.get(type(module))
        if kind is not None:
            module.__class__ = kind
            swapped += 1
    return swapped
