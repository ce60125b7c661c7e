"""``ctx.recur`` of a packed step: a hybrid model's recurrent layers over the state pool.

A packed step lays its tokens end to end as ``(T, 1, ...)`` rows: the one-token rows first
(decodes, and prompt chunks of one token), then each prefill chunk. A recurrent layer needs
them by sequence, so ``RecurrentStep`` calls the layer's ``fn`` on

- each chunk as ``(1, n, ...)`` from its slot (zeros when it starts the sequence), split at
  its snapshot points: ``fn`` runs piece by piece with the state chained, and the state at
  each point is also written to that point's snapshot slot;
- the one-token rows as one group, ``(b, 1, ...)``, their states gathered from their slots.

A row admitted beside the prefill whose prefix it shares starts from that chunk's state at
a snapshot point of this same step (``RecurrentRow.source``): chunks run first, in order,
so that state exists when the row needs it. Every new state (the sequences' and the
snapshots') goes back in one scatter per state array per layer, after every group has read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..models.base import RecurrentFn
from .state_cache import StateCache

States = list[mx.array]


@dataclass(slots=True)
class RecurrentRow:
    """One row of the step: ``num_tokens`` tokens of the sequence in state slot ``slot``."""

    num_tokens: int
    slot: int
    fresh: bool  # the row starts the sequence: zero states, nothing read
    # (tokens into the row, snapshot slot): keep the state after that many of its tokens.
    points: list[tuple[int, int]] = field(default_factory=list)
    # Start from the state of an earlier chunk of this step: (chunk index, point index).
    source: tuple[int, int] | None = None


class RecurrentStep:
    """The recurrent half of a packed step's context (``PagedAttention.recur``)."""

    def __init__(self, cache: StateCache, decode: list[RecurrentRow],
                 chunks: list[RecurrentRow]) -> None:
        self.cache, self.decode, self.chunks = cache, decode, chunks
        for chunk in chunks:
            chunk.points.sort()
        dst = [s for c in chunks for s in [*(slot for _, slot in c.points), c.slot]]
        self._chunk_slots = [mx.array([c.slot], mx.int32) for c in chunks]
        if decode:
            self._decode_slots = mx.array([r.slot for r in decode], mx.int32)
            fresh = [r.fresh for r in decode]
            self._decode_fresh = mx.array(fresh) if any(fresh) else None
            points = [(i, slot) for i, r in enumerate(decode) for _, slot in r.points]
            self._decode_points = mx.array([i for i, _ in points], mx.int32) if points else None
            dst += [r.slot for r in decode] + [slot for _, slot in points]
            self._decode_sourced = [(i, r.source) for i, r in enumerate(decode) if r.source]
        self._dst = mx.array(dst, mx.int32)  # the scatter's slots, in __call__'s order

    def __call__(self, layer: int, inputs: tuple[mx.array, ...], fn: RecurrentFn) -> mx.array:
        """Run ``fn`` group by group; ``inputs`` and the result are ``(T, 1, ...)``."""
        new: list[States] = [[] for _ in self.cache.pools[layer]]
        at_points: list[list[States]] = []  # per chunk, the states at its points
        outs, row = [], len(self.decode)
        for chunk, slot in zip(self.chunks, self._chunk_slots):
            x = tuple(a[row:row + chunk.num_tokens].swapaxes(0, 1) for a in inputs)  # (1, n, ...)
            row += chunk.num_tokens
            states = self._chunk_states(layer, chunk, slot, at_points)
            out, points = self._run_chunk(chunk, states, x, fn, new)
            outs.append(out.swapaxes(0, 1))
            at_points.append(points)
        if self.decode:
            b = len(self.decode)
            out, states = fn(tuple(a[:b] for a in inputs), self._decode_states(layer, at_points))
            outs.insert(0, out)
            for kept, state in zip(new, states):
                kept.append(state)
                if self._decode_points is not None:
                    kept.append(state[self._decode_points])
        self.cache.write(layer, self._dst, [mx.concatenate(k) if len(k) > 1 else k[0] for k in new])
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    def _chunk_states(self, layer: int, chunk: RecurrentRow, slot: mx.array,
                      at_points: list[list[States]]) -> States:
        if chunk.source is not None:
            return at_points[chunk.source[0]][chunk.source[1]]
        if chunk.fresh:
            spec = self.cache.layers[layer]
            return [mx.zeros((1, *s), d) for s, d in zip(spec.shapes, spec.dtypes)]
        return self.cache.read(layer, slot)

    def _decode_states(self, layer: int, at_points: list[list[States]]) -> States:
        states = self.cache.read(layer, self._decode_slots)
        if self._decode_fresh is not None:
            states = [mx.where(self._decode_fresh.reshape(-1, *[1] * (s.ndim - 1)),
                               mx.zeros_like(s), s) for s in states]
        if self._decode_sourced:
            rows = mx.array([i for i, _ in self._decode_sourced], mx.int32)
            for k, state in enumerate(states):
                state[rows] = mx.concatenate([at_points[c][p][k] for _, (c, p) in
                                              self._decode_sourced]).astype(state.dtype)
        return states

    @staticmethod
    def _run_chunk(chunk: RecurrentRow, states: States, x: tuple[mx.array, ...], fn: RecurrentFn,
                   new: list[States]) -> tuple[mx.array, list[States]]:
        """``fn`` over the chunk's pieces between its snapshot points, state chained; the
        output and the states at its points."""
        pieces, points, at = [], [], 0
        for end, _ in [*chunk.points, (chunk.num_tokens, None)]:
            if end > at:
                out, states = fn(tuple(a[:, at:end] for a in x), states)
                pieces.append(out)
                at = end
            for kept, state in zip(new, states):
                kept.append(state)  # a snapshot's state, then (last) the sequence's own
            points.append(states)
        return (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)), points
