"""Batched sampling in MLX with per-row parameters. Nothing here reads values back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .grammar import token_bitmasks
from .sequence import Sequence


@dataclass(slots=True)
class SamplerOutput:
    token_ids: mx.array  # (B,) int32
    logprobs: mx.array | None = None  # (B,) log-prob of the chosen token
    top_ids: mx.array | None = None  # (B, n) most likely tokens
    top_logprobs: mx.array | None = None  # (B, n)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.token_ids, self.logprobs, self.top_ids, self.top_logprobs) if a is not None]


class Sampler:
    """Turns last-position logits ``(B, V)`` into next tokens for the sequences of a batch.

    Rows whose sequence has a constraint (``seq.grammar``: a grammar, or a thinking budget
    once spent) sample from the tokens it allows; the other rows are untouched. A grammar's mask needs the token of the step still in
    flight: ``catch_up`` (set by the engine) reads those tokens and advances the grammars.
    The sampler calls it only after starting this step's logits on the device, so the
    device computes while the grammars do.

    A speculating sequence has one row per sampled position (its last token, then each
    draft: ``seq.draft_ids``); row ``j`` of it is processed as if the drafts before ``j`` had
    been sampled: penalties count them, ``min_tokens`` and a seed's noise go by the token's
    position in the completion, and the grammar's mask is the one after them
    (``seq.draft_masks``, from ``GrammarState.walk_drafts``).
    """

    def __init__(self, eos_token_ids: list[int],
                 catch_up: Callable[[], None] | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.catch_up = catch_up

    def __call__(self, logits: mx.array, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits.astype(mx.float32)
        self._catch_up_grammars(logits, seqs)
        offsets = draft_offsets(seqs)
        logits = self._apply_biases(logits, seqs)
        logits = self._apply_penalties(logits, seqs, offsets)
        logits = self._block_eos(logits, seqs, offsets)
        logits = self._apply_grammars(logits, seqs, offsets)
        out = SamplerOutput(self._choose(logits, seqs, offsets))
        if any(s.params.logprobs is not None for s in seqs):
            self._add_logprobs(out, logits, seqs)
        return out

    # ---- logit processing ---------------------------------------------------------------
    def _apply_biases(self, logits: mx.array, seqs: list[Sequence]) -> mx.array:
        rows, cols, vals = [], [], []
        for i, seq in enumerate(seqs):
            for token_id, bias in seq.params.logit_bias.items():
                if 0 <= int(token_id) < logits.shape[-1]:
                    rows.append(i), cols.append(int(token_id)), vals.append(float(bias))
        if not rows:
            return logits
        return logits.at[mx.array(rows), mx.array(cols)].add(mx.array(vals))

    def _apply_penalties(self, logits: mx.array, seqs: list[Sequence],
                         offsets: list[int]) -> mx.array:
        """vLLM semantics: repetition over prompt+output, presence/frequency over output
        (a draft row's output includes the drafts before it)."""
        rows, cols, rep, add = [], [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.uses_penalties:
                continue
            drafted = seq.draft_ids[:offsets[i]]
            out_ids, out_counts = np.unique(np.array(seq.completion_token_ids + drafted, np.int64),
                                            return_counts=True)
            seen = np.unique(np.array(seq.token_ids + drafted, np.int64))
            counts = dict(zip(out_ids.tolist(), out_counts.tolist()))
            for t in seen.tolist():
                c = counts.get(t, 0)
                rows.append(i), cols.append(t), rep.append(p.repetition_penalty)
                add.append(-(p.presence_penalty * (c > 0) + p.frequency_penalty * c))
        if not rows:
            return logits
        r, c = mx.array(rows), mx.array(cols)
        g, penalty = logits[r, c], mx.array(rep)
        g = mx.where(g > 0, g / penalty, g * penalty) + mx.array(add)
        logits[r, c] = g
        return logits

    def _block_eos(self, logits: mx.array, seqs: list[Sequence], offsets: list[int]) -> mx.array:
        # A complete grammar may need EOS now: it wins over min_tokens.
        rows = [i for i, s in enumerate(seqs)
                if s.num_completion_tokens + offsets[i] < s.params.min_tokens
                and not _accepting(s, offsets[i])]
        if not rows or not self.eos_token_ids:
            return logits
        r = mx.array([i for i in rows for _ in self.eos_token_ids])
        c = mx.array([e for _ in rows for e in self.eos_token_ids])
        logits[r, c] = -mx.inf
        return logits

    def _catch_up_grammars(self, logits: mx.array, seqs: list[Sequence]) -> None:
        behind = any(s.grammar is not None and s.grammar.needs_last_token
                     and s.pending_row is not None for s in seqs)
        if behind and self.catch_up is not None:
            mx.async_eval(logits)  # the forward pass runs while the grammars catch up
            self.catch_up()

    def _apply_grammars(self, logits: mx.array, seqs: list[Sequence],
                        offsets: list[int]) -> mx.array:
        drafted = [i for i, s in enumerate(seqs) if s.draft_masks is not None]
        plain = [i for i, s in enumerate(seqs) if s.draft_masks is None and s.grammar is not None
                 and s.grammar.active and not s.is_finished]
        if not drafted and not plain:
            return logits
        vocab = logits.shape[-1]
        masks = [token_bitmasks([seqs[i].grammar for i in plain], vocab)] if plain else []
        masks += [seqs[i].draft_masks[offsets[i]][None] for i in drafted]
        rows = plain + drafted
        words = mx.array(np.concatenate(masks))
        # Unpacked on the device (portable: no Metal kernel): token t is bit t % 32 of word t // 32.
        token = mx.arange(vocab)
        allowed = (mx.take(words, token // 32, axis=1) >> (token % 32)) & 1
        r = mx.array(rows)
        logits[r] = mx.where(allowed.astype(mx.bool_), logits[r], -mx.inf)
        return logits

    # ---- choosing -----------------------------------------------------------------------
    def _choose(self, logits: mx.array, seqs: list[Sequence], offsets: list[int]) -> mx.array:
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        if all(s.params.is_greedy for s in seqs):
            return greedy
        temps = mx.array([s.params.temperature or 1.0 for s in seqs])[:, None]
        scaled = self._filter(logits / temps, seqs)
        noise = self._gumbel(seqs, offsets, logits.shape[-1])
        sampled = mx.argmax(scaled + noise, axis=-1).astype(mx.int32)
        is_greedy = mx.array([s.params.is_greedy for s in seqs])
        return mx.where(is_greedy, greedy, sampled)

    def _filter(self, logits: mx.array, seqs: list[Sequence]) -> mx.array:
        """Mask tokens outside top-k / top-p / min-p per row (-inf)."""
        ps = [s.params for s in seqs]
        if any(p.min_p > 0 for p in ps):
            min_p = mx.array([p.min_p for p in ps])[:, None]
            probs = mx.softmax(logits, axis=-1)
            keep = probs >= min_p * probs.max(axis=-1, keepdims=True)
            logits = mx.where(keep, logits, -mx.inf)
        if not any(p.top_k > 0 or p.top_p < 1.0 for p in ps):
            return logits
        sorted_desc = -mx.sort(-logits, axis=-1)
        vocab = logits.shape[-1]
        k = mx.array([p.top_k if 0 < p.top_k < vocab else vocab for p in ps])
        kth = mx.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        # Top-p runs on the top-k survivors, renormalised (vLLM/HF order); rows with
        # top_p == 1 skip it, since float32 cumsums reach 1.0 before the tail ends.
        in_top_k = mx.arange(vocab)[None] < k[:, None]
        probs = mx.softmax(mx.where(in_top_k, sorted_desc, -mx.inf), axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        top_p = mx.array([p.top_p for p in ps])[:, None]
        inside = (before < top_p) & in_top_k  # the first token is always inside
        pth = mx.min(mx.where(inside, sorted_desc, mx.inf), axis=-1, keepdims=True)
        pth = mx.where(top_p < 1.0, pth, -mx.inf)
        threshold = mx.maximum(kth, pth)
        return mx.where(logits >= threshold, logits, -mx.inf)

    def _gumbel(self, seqs: list[Sequence], offsets: list[int], vocab: int) -> mx.array:
        """Gumbel noise; a seeded row draws from a key of (seed, the token's position in the
        completion), so neither batching nor speculation changes its tokens."""
        if not any(s.params.seed is not None for s in seqs):
            return mx.random.gumbel(shape=(len(seqs), vocab))
        rows = []
        for seq, offset in zip(seqs, offsets):
            if seq.params.seed is None:
                rows.append(mx.random.gumbel(shape=(1, vocab)))
                continue
            key = seeded_key(seq.params.seed, seq.num_completion_tokens + offset)
            rows.append(mx.random.gumbel(shape=(1, vocab), key=key))
        return mx.concatenate(rows, axis=0)

    def _add_logprobs(self, out: SamplerOutput, logits: mx.array, seqs: list[Sequence]) -> None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out.logprobs = mx.take_along_axis(logprobs, out.token_ids[:, None], axis=-1)[:, 0]
        n = max(s.params.logprobs or 0 for s in seqs)
        if n > 0:
            top = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:, :n]
            top_lp = mx.take_along_axis(logprobs, top, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            out.top_ids = mx.take_along_axis(top, order, axis=-1)
            out.top_logprobs = mx.take_along_axis(top_lp, order, axis=-1)


# Positions per seed: (seed, position) pairs map to distinct keys for positions below this.
_POSITIONS = 1 << 24


def seeded_key(seed: int, position: int) -> mx.array:
    """The noise key of a seeded sequence's ``position``-th completion token."""
    return mx.random.key((seed % (1 << 39)) * _POSITIONS + position % _POSITIONS)  # < 2**63


def draft_offsets(seqs: list[Sequence]) -> list[int]:
    """Each row's position within its sequence's rows: 0, or for a speculating sequence's
    consecutive rows 0, 1, ..., k (the drafts before the row)."""
    offsets: list[int] = []
    for i, seq in enumerate(seqs):
        offsets.append(offsets[-1] + 1 if i and seqs[i - 1] is seq else 0)
    return offsets


def _accepting(seq: Sequence, offset: int) -> bool:
    """Is the sequence's grammar complete before its row at ``offset``?"""
    if seq.draft_accepting:
        return seq.draft_accepting[offset]
    return seq.grammar is not None and seq.grammar.accepting
