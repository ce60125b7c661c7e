"""Speculative decoding with a draft model: a smaller model of the same tokenizer proposes
the next k tokens of each speculating sequence, the target verifies them in its packed step.

The draft keeps its own paged KV pool with the target's block size and the same number of
blocks, grown and rebuilt with the target's, so a sequence's block table addresses both
pools: there is no second bookkeeping. Every step the target runs, the draft runs over the
same packed batch (``follow``), so its KV covers every prompt chunk, accepted token and
draft the target computed. A speculating step first chains k one-token draft steps over
its speculating rows (``propose``: the last known token, then each draft in turn), reads
the drafts back to the host (one sync per speculating step: the target's input and the
verification need them there), and the target then checks them as the n-gram drafts are.

Drafts are the draft model's argmax: deterministic, so q is one-hot and the exact rejection
scheme of ``speculative.py`` ("sample as usual, accept while the sample equals the draft")
keeps the target's output distribution at any temperature, and greedy output token for
token. A draft that disagrees with the target (another model, KV the draft never computed
such as blocks loaded by the disk tier) only lowers the acceptance, never changes the output.
Rejected drafts' KV lies past the sequence's length in both pools; the next steps overwrite it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.contract import uniform_kv
from ..models.loader import LoadedModel, ModelLoadError, load
from .drafter import Drafter, chain_drafts
from .kv_cache import KVLayout, PagedKVCache
from .model_runner import ModelRunner, StepOutput
from .scheduler import ScheduledBatch
from .speculative import ModelSpeculator

if TYPE_CHECKING:
    from ..config import EngineConfig

log = logging.getLogger(__name__)


class DraftModel(Drafter):
    """The draft model, its KV pool (the target's block ids) and the runner that fills it."""

    def __init__(self, loaded: LoadedModel, target: LoadedModel, block_size: int,
                 kv_cache_dtype: str | None = None) -> None:
        check_compatible(loaded, target)
        model = loaded.model
        layout = KVLayout.parse(kv_cache_dtype, model.dtype, uniform_kv(model).head_dim)
        super().__init__(model, block_size, layout)
        self.loaded, self.model = loaded, model
        # seq_id -> one past the last position the previous followed step wrote for it.
        self._ends: dict[int, int] = {}

    @classmethod
    def load(cls, config: EngineConfig, target: LoadedModel) -> DraftModel:
        """``config.draft_model`` loaded as the target was (alias, directory or GGUF; same
        dtype and quantization)."""
        loaded = load(config.draft_model, dtype=config.dtype, quantize=config.quantize)
        draft = cls(loaded, target, config.block_size, config.kv_cache_dtype)
        log.info("draft model %s: %.1f M parameters, %d KV bytes per token", config.draft_model,
                 draft.model.num_parameters()["total"] / 1e6, draft.block_bytes // config.block_size)
        return draft

    @property
    def weights_nbytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def _new_runner(self, cache: PagedKVCache) -> ModelRunner:
        return ModelRunner(self.model, cache, sampler=None)

    def follow(self, batch: ScheduledBatch, prev: StepOutput | None,
               out: StepOutput | None = None) -> None:
        """Queue the draft's forward pass over the target's step: the same tokens (a token
        still being sampled comes lazily from ``prev``) written to the same slots. Nothing
        is sampled; a speculating row runs only its last draft (``propose`` wrote the rest).
        ``out`` (the step's own output, which the MTP head reads) is not needed here."""
        self._ends = {seq.seq_id: start + n for seq, start, n in
                      zip(batch.seqs, batch.start_positions, batch.num_new_tokens)}
        _, hidden = self.runner.forward(_kv_only(batch), prev)
        self._queue_with_pool(hidden)

    def ready(self, batch: ScheduledBatch, i: int) -> bool:
        """Is the draft's KV of row ``i``'s earlier tokens written by steps already queued?

        Drafts are computed before this step's own writes and block copies, so a row whose
        sequence was not in the previous step (just admitted: its prompt's last token, a
        prefix shared with a chunk of this step, a copied block) drafts from the next step.
        """
        seq = batch.seqs[i]
        if self._ends.get(seq.seq_id, -1) < batch.start_positions[i]:
            return False
        copied = {dst for _, dst in batch.copies}
        return not copied.intersection(seq.block_table)

    def propose(self, batch: ScheduledBatch, rows: list[tuple[int, int]]) -> list[list[int]]:
        """For each (batch row, k): the draft's k greedy tokens after the row's sequence.

        The rows' blocks must already hold k more slots. One one-token step per position,
        over the rows that still draft; the tokens stay on the device until the one read.
        """
        seqs = [batch.seqs[i] for i, _ in rows]
        tokens = mx.array([seq.token_ids[-1] for seq in seqs], mx.int32)
        return chain_drafts(seqs, [k for _, k in rows], (tokens,),
                            lambda step, carry: (self._greedy(step, carry[0]),))

    def _greedy(self, step: ScheduledBatch, tokens: mx.array) -> mx.array:
        """The draft's argmax after one token per row (lazy)."""
        order = list(range(len(step)))
        ctx = self.runner.attention_context(step, order)
        hidden = self.model.hidden_states(tokens[:, None], ctx)[:, 0]
        if not ctx.pruned:
            hidden = hidden[ctx.sampled.tokens]
        return mx.argmax(self.model.compute_logits(hidden), axis=-1).astype(mx.int32)


def _kv_only(batch: ScheduledBatch) -> ScheduledBatch:
    """``batch`` with no row sampling, and each speculating row cut to its last draft."""
    out = ScheduledBatch(list(batch.seqs), list(batch.num_new_tokens), list(batch.start_positions),
                         [False] * len(batch), batch.copies, batch.state_points,
                         batch.state_sources, list(batch.num_drafts))
    for i, k in enumerate(batch.num_drafts):
        if k:
            out.start_positions[i] += k
            out.num_new_tokens[i] = 1
    return out


def check_compatible(draft: LoadedModel, target: LoadedModel) -> None:
    """A ``ModelLoadError`` unless the draft can draft for the target: the same vocabulary
    (token strings to ids, logits width, end-of-sequence ids) and paged attention only."""
    def fail(why: str) -> None:
        raise ModelLoadError(f"draft model {draft.name} cannot draft for {target.name}: {why}")

    if draft.model.state_layers:
        fail("it has recurrent layers (a draft must be attention-only)")
    if draft.model.vocab_size != target.model.vocab_size:
        fail(f"vocab_size {draft.model.vocab_size} != {target.model.vocab_size}")
    vocab = [getattr(t.tokenizer, "backend", None) for t in (draft, target)]
    if None not in vocab and vocab[0].get_vocab(True) != vocab[1].get_vocab(True):
        fail("its tokenizer maps tokens to other ids")
    if set(draft.tokenizer.eos_token_ids) != set(target.tokenizer.eos_token_ids):
        fail(f"end-of-sequence ids {sorted(draft.tokenizer.eos_token_ids)} != "
             f"{sorted(target.tokenizer.eos_token_ids)}")


class DraftSpeculator(ModelSpeculator):
    """``ModelSpeculator`` whose drafts come from a draft model (adaptive k, step-size rules
    and ``/stats`` counters are the n-gram method's)."""

    drafter: DraftModel

    def may_draft(self, seq) -> bool:
        return True  # a draft model always has a proposal

    def draft_start(self, batch: ScheduledBatch, i: int) -> bool | None:
        """True once the draft's KV of the row's earlier tokens is queued (it needs no more)."""
        return True if self.drafter.ready(batch, i) else None

    def propose(self, batch: ScheduledBatch, rows: list[tuple[int, int, bool]]) -> list[list[int]]:
        return self.drafter.propose(batch, [(i, k) for i, k, _ in rows])
