"""Speculative decoding with the checkpoint's own multi-token prediction (MTP) head
(Qwen3.5 / Qwen3-Next ``mtp.*``, ``models/mtp.py``).

The head predicts token t + 2 from the target's final hidden state at t and token t + 1. It
has one attention layer with a paged KV pool of its own, on the target's block ids (as the
draft model's, ``draft_model.py``), written at the target's positions: slot t holds the head's
K/V of (token t + 1, hidden t). So the head runs right after every target step (``follow``),
over every token the target computed, with the target's hidden states
(``StepOutput.hidden``: the runner keeps them all) and, where a position sampled, the token
it sampled (still lazy). Its argmax at each sampled position is the draft after that token;
when the step is read, a row's first draft is the one at its last accepted position, so a
rejected draft's correction still gets a draft (the head ran at the correction's position
too): no extra pass and no extra sync. Further drafts (k > 1) chain the head on its own
output (``chain``: one one-token pass per draft, one read), as vLLM's MTP does.

Drafts are greedy (argmax), so the exact rejection of ``speculative.py`` keeps the output
distribution at any temperature and greedy output token for token. KV the head never wrote
for a sequence (a prefix cached by a sequence with another next token, blocks loaded by the
disk tier) only lowers the acceptance.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ..models.loader import LoadedModel, ModelLoadError
from .drafter import Drafter, chain_drafts
from .kv_cache import KVLayout, PagedKVCache
from .model_runner import ModelRunner, StepOutput, packed_order
from .scheduler import ScheduledBatch
from .speculative import ModelSpeculator


class MTPDrafter(Drafter):
    """The target's MTP head, its KV pool (the target's block ids) and its latest drafts."""

    def __init__(self, target: LoadedModel, block_size: int,
                 kv_cache_dtype: str | None = None) -> None:
        self.model = target.model
        if "mtp" not in self.model:
            raise ModelLoadError(f"speculative='mtp': {target.name} was loaded without its "
                                 "multi-token prediction head (load it with mtp=True)")
        self.head = self.model.mtp
        layout = KVLayout.parse(kv_cache_dtype, self.model.dtype, self.head.kv_layers[0].head_dim)
        super().__init__(self.head, block_size, layout)
        # From the latest followed step: seq_id -> (position of its first sampled token,
        # index of that token's draft, number of sampled tokens), and the drafts (lazy).
        self._where: dict[int, tuple[int, int, int]] = {}
        self._drafts: mx.array | None = None
        self._picked: mx.array | None = None  # the head's output there (chained drafts)
        self._read: list[int] | None = None

    # weights_nbytes stays 0: the head is part of the target's parameters

    def attach(self, num_blocks: int) -> None:
        """(Re)build the pool; the drafts of the old one go with it."""
        super().attach(num_blocks)
        self._where, self._drafts = {}, None

    def _new_runner(self, cache: PagedKVCache) -> ModelRunner:
        # keep_hidden: no pruning, the rows to read are picked here (a step may sample none).
        return ModelRunner(self.head, cache, sampler=None, keep_hidden=True)

    def follow(self, batch: ScheduledBatch, prev: StepOutput | None, out: StepOutput | None) -> None:
        """Queue the head over the target's step ``out``: its KV at every position of the
        step and, lazily, its draft after each sampled token."""
        if out is None or out.hidden is None:
            return
        self.runner.copy_reused(batch)  # the target's reused blocks ending mid-block, here too
        order = packed_order(batch)
        next_ids, where = self._next_tokens(batch, order, out)
        ctx = self.runner.attention_context(batch, order)
        hidden = self.model.mtp_hidden_states(next_ids[:, None], out.hidden[:, None], ctx)[:, 0]
        picked = self._picked = hidden[ctx.sampled.tokens]
        self._drafts = (mx.argmax(self.model.compute_logits(picked), axis=-1).astype(mx.int32)
                        if picked.shape[0] else None)
        self._where, self._read = where, None
        self._queue_with_pool(*([self._drafts] if self._drafts is not None else []))

    @staticmethod
    def _next_tokens(batch: ScheduledBatch, order: list[int], out: StepOutput
                     ) -> tuple[mx.array, dict[int, tuple[int, int, int]]]:
        """Each packed token's next token (a sampled position's: the token it sampled, lazy;
        else the sequence's next known token) and where each row's drafts will be."""
        ids, pending, where = [], [], {}
        sampler_row = picked = 0  # the sampler's rows skip pooling rows; the picked ones don't
        for i in order:
            seq, start, n = batch.seqs[i], batch.start_positions[i], batch.num_new_tokens[i]
            first = start + n - 1 - batch.num_drafts[i] if batch.samples[i] else start + n
            if batch.samples[i] and not seq.pooling:
                where[seq.seq_id] = (first, picked, start + n - first)
            for p in range(start, start + n):
                if p >= first and not seq.pooling:
                    ids.append(0)
                    pending.append(sampler_row)
                    sampler_row += 1
                else:
                    ids.append(seq.token_ids[p + 1] if p + 1 < len(seq.token_ids) else 0)
                    pending.append(-1)
            picked += start + n - first if batch.samples[i] else 0
        ids_a = mx.array(ids, mx.int32)
        pend = np.array(pending, np.int32)
        if (pend >= 0).any():
            lazy = out.sampled.token_ids[mx.array(np.maximum(pend, 0))]
            ids_a = mx.where(mx.array(pend >= 0), lazy, ids_a)
        return ids_a, where

    def covers(self, seq: Any) -> bool:
        """Did the latest followed step sample for ``seq`` (so it may have a draft)?"""
        return seq.seq_id in self._where

    def draft_for(self, seq: Any) -> tuple[int, int] | None:
        """The head's draft after ``seq``'s last token and its row among the followed
        step's picked ones, if that step (read by now) sampled the token; else None."""
        entry = self._where.get(seq.seq_id)
        if entry is None or self._drafts is None:
            return None
        first, index, count = entry
        j = len(seq.token_ids) - 2 - first  # the sampled position of the last token
        if not 0 <= j < count:
            return None
        if self._read is None:
            self._read = self._drafts.tolist()
        return self._read[index + j], index + j

    def chain(self, batch: ScheduledBatch, rows: list[tuple[int, int, tuple[int, int]]]
              ) -> list[list[int]]:
        """For each (batch row, k, its first draft and picked row): k greedy drafts.

        Draft j + 1 is the head run once more at the next position on draft j and on the
        head's own output there in place of the model's hidden state (not computed yet).
        Those writes to the head's pool lie at positions the verifying step rewrites. The
        rows' blocks must already hold k more slots; one read for all the chained tokens.
        """
        drafts = [[first] for _, _, (first, _) in rows]
        ks = [k for _, k, _ in rows]
        if max(ks, default=0) < 2:
            return drafts
        seqs = [batch.seqs[i] for i, _, _ in rows]
        tokens = mx.array([d[0] for d in drafts], mx.int32)
        hidden = self._picked[mx.array([at for _, _, (_, at) in rows])]
        more = chain_drafts(seqs, [k - 1 for k in ks], (tokens, hidden), self._chained)
        return [first + rest for first, rest in zip(drafts, more)]

    def _chained(self, step: ScheduledBatch, carry: tuple[mx.array, mx.array]
                 ) -> tuple[mx.array, mx.array]:
        """The head's next drafts and its output, one token a row after ``carry``'s."""
        tokens, hidden = carry
        ctx = self.runner.attention_context(step, list(range(len(step))))
        hidden = self.model.mtp_hidden_states(tokens[:, None], hidden[:, None], ctx)[:, 0]
        return mx.argmax(self.model.compute_logits(hidden), axis=-1).astype(mx.int32), hidden


class MTPSpeculator(ModelSpeculator):
    """``ModelSpeculator`` whose drafts come from the MTP head (adaptive k, step-size rules
    and ``/stats`` counters are the n-gram method's)."""

    drafter: MTPDrafter

    def may_draft(self, seq) -> bool:
        return self.drafter.covers(seq)

    def draft_start(self, batch: ScheduledBatch, i: int) -> tuple[int, int] | None:
        """The head's first draft after the row's last token and its picked row, if any."""
        return self.drafter.draft_for(batch.seqs[i])

    def propose(self, batch: ScheduledBatch, rows: list[tuple[int, int, tuple[int, int]]]
                ) -> list[list[int]]:
        return self.drafter.chain(batch, rows)
