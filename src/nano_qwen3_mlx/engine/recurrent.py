"""``ctx.recur`` of a packed step: a hybrid model's recurrent layers over the state pool.

A packed step lays its tokens end to end as ``(T, 1, ...)`` rows: the one-token rows first
(decodes, and prompt chunks of one token), then each prefill chunk. A recurrent layer needs
them by sequence, so ``RecurrentStep`` calls the layer's ``fn`` on

- the one-token rows as one group, ``(b, 1, ...)``, their states gathered from their slots;
- each chunk as ``(1, n, ...)`` from its slot (zeros when it starts the sequence), split at
  its snapshot points: ``fn`` runs piece by piece with the state chained, and the state at
  each point is also written to that point's snapshot slot.

Every new state (the sequences' and the snapshots') goes back in one scatter per state array
per layer, after every group has read: so a slot a group reads is never one this step wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from ..models.base import RecurrentFn
from .state_cache import StateCache


@dataclass(slots=True)
class RecurrentRow:
    """One row of the step: ``num_tokens`` tokens of the sequence in state slot ``slot``."""

    num_tokens: int
    slot: int
    fresh: bool  # the row starts the sequence: zero states, nothing read
    # (tokens into the row, snapshot slot): keep the state after that many of its tokens.
    points: list[tuple[int, int]] = field(default_factory=list)


class RecurrentStep:
    """The recurrent half of a packed step's context (``PagedAttention.recur``)."""

    def __init__(self, cache: StateCache, decode: list[RecurrentRow],
                 chunks: list[RecurrentRow]) -> None:
        self.cache, self.decode, self.chunks = cache, decode, chunks
        dst: list[int] = []
        if decode:
            self._decode_slots = mx.array([r.slot for r in decode], mx.int32)
            fresh = [r.fresh for r in decode]
            self._decode_fresh = mx.array(fresh) if any(fresh) else None
            points = [(i, slot) for i, r in enumerate(decode) for _, slot in r.points]
            self._decode_points = mx.array([i for i, _ in points], mx.int32) if points else None
            dst += [r.slot for r in decode] + [slot for _, slot in points]
        for chunk in chunks:
            dst += [slot for _, slot in sorted(chunk.points)] + [chunk.slot]
        self._dst = mx.array(dst, mx.int32)  # the scatter's slots, in __call__'s order
        self._chunk_slots = [mx.array([c.slot], mx.int32) for c in chunks]

    def __call__(self, layer: int, inputs: tuple[mx.array, ...], fn: RecurrentFn) -> mx.array:
        """Run ``fn`` group by group; ``inputs`` and the result are ``(T, 1, ...)``."""
        outs, new = [], [[] for _ in self.cache.pools[layer]]
        row = 0
        if self.decode:
            row = len(self.decode)
            out, states = fn(tuple(a[:row] for a in inputs), self._decode_states(layer))
            outs.append(out)
            for kept, state in zip(new, states):
                kept.append(state)
                if self._decode_points is not None:
                    kept.append(state[self._decode_points])
        for chunk, slot in zip(self.chunks, self._chunk_slots):
            x = tuple(a[row:row + chunk.num_tokens].swapaxes(0, 1) for a in inputs)  # (1, n, ...)
            row += chunk.num_tokens
            out = self._run_chunk(layer, chunk, slot, x, fn, new)
            outs.append(out.swapaxes(0, 1))
        self.cache.write(layer, self._dst, [mx.concatenate(k) if len(k) > 1 else k[0] for k in new])
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    def _decode_states(self, layer: int) -> list[mx.array]:
        states = self.cache.read(layer, self._decode_slots)
        if self._decode_fresh is None:
            return states
        return [mx.where(self._decode_fresh.reshape(-1, *[1] * (s.ndim - 1)), mx.zeros_like(s), s)
                for s in states]

    def _run_chunk(self, layer: int, chunk: RecurrentRow, slot: mx.array, x: tuple[mx.array, ...],
                   fn: RecurrentFn, new: list[list[mx.array]]) -> mx.array:
        """``fn`` over the chunk's pieces between its snapshot points, state chained."""
        if chunk.fresh:
            spec = self.cache.layers[layer]
            states = [mx.zeros((1, *s), d) for s, d in zip(spec.shapes, spec.dtypes)]
        else:
            states = self.cache.read(layer, slot)
        pieces, at = [], 0
        for end, _ in [*sorted(chunk.points), (chunk.num_tokens, None)]:
            if end > at:
                out, states = fn(tuple(a[:, at:end] for a in x), states)
                pieces.append(out)
                at = end
            for kept, state in zip(new, states):
                kept.append(state)  # a snapshot's state, then (last) the sequence's own
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)
