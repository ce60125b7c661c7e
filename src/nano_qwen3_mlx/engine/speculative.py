"""Speculative decoding by n-gram prompt lookup, verified inside the packed step.

A decoding sequence whose last tokens occurred earlier in its text (prompt or output) drafts
the tokens that followed them. Its row in the step then carries the last accepted token plus
the k drafts, like a short prefill chunk whose every position is sampled. The draft is
deterministic (q is one-hot), so exact rejection sampling reduces to: sample each position
as usual (same logit processing, same Gumbel noise per row) and accept draft j while the
token sampled at position j equals it; the first sampled token that differs is the
correction, and after a fully accepted run the last position gives a bonus token. Accepting
x with probability p(x), else drawing from p with x removed, is exactly what "sample y ~ p,
accept if y == x" does, so the output distribution is the plain one at any temperature, and
greedy output is token for token the same.

Rejected drafts' KV stays in slots past the sequence's computed length: every reader masks by
length, and the next step overwrites them; blocks past the sequence's need are freed.

Every decoding row may speculate; row ``j`` of a speculating sequence (after ``j`` drafts)
is processed exactly as the plain row would be once those drafts were its tokens:

- a grammar or thinking budget (``seq.grammar``): before the step, the drafts are walked
  through the matcher (``GrammarState.walk_drafts``), cut at the first token the constraint
  forbids, and each position gets the mask after the drafts before it; the matcher then
  rolls back, and verification advances it by the accepted tokens only;
- penalties count the drafts before the position; ``min_tokens`` blocks EOS by the
  position's own completion length (and the grammar's accepting state there);
- a ``seed`` draws its noise from a key of (seed, position in the completion)
  (``sampler.seeded_key``), so its tokens depend neither on batching nor on speculation;
- a hybrid model's recurrent layers run the row token by token, keeping the state after
  each of its first k positions in a scratch slot (``StateManager.take_draft_slots``, the
  row's ``state_points``); verification copies the one after the accepted prefix into the
  sequence's slot (lazily, before the next step reads it) and frees the scratch slots. The
  pool's cap counts ``MAX_SPEC_ROWS * k`` scratch slots.

Not speculated: pooling (embedding) requests; steps of more decode rows than
``MAX_SPEC_ROWS`` (or ``SMALL_BATCH`` while acceptance is low).

Drafts may also come from a model: the draft model (``draft_model.py``) or the MTP head
(``mtp.py``), through ``ModelSpeculator`` (each gives its readiness test and its proposer);
the rules here, ``attach`` and the verification are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .block_manager import BlockManager
from .scheduler import ScheduledBatch
from .sequence import Sequence

if TYPE_CHECKING:
    from .drafter import Drafter

MAX_NGRAM, MIN_NGRAM = 4, 2  # suffix lengths tried, longest first
SEARCH_WINDOW = 4096  # only the last this many tokens are searched (bounded host cost)
# Past this many decode rows a step speculates no more: the decode weights are already
# amortised over the rows, and each draft costs a full token of compute (measured in the
# README's speculative-decoding table).
MAX_SPEC_ROWS = 8
BACKOFF_MIN, BACKOFF_MAX = 16, 256  # steps a sequence waits after drafts that all missed
# A sequence's acceptance rate (moving average of accepted / drafted): below PAUSE_RATE it
# pauses like after a miss; its pauses shorten again only once the rate is back to GOOD_RATE
# (a lucky hit among rejections must not restart frequent tries).
RATE_WEIGHT, PAUSE_RATE, GOOD_RATE = 0.3, 0.25, 0.5
# Above this many decode rows a step speculates only while the engine-wide acceptance rate is
# good (a step that speculates waits for the step in flight, and at 8 rows the rejected
# workload lost 18% without this rule), or once every PROBE_EVERY steps to notice a change.
SMALL_BATCH, PROBE_EVERY = 4, 32


def propose_ngram(tokens: list[int], k: int, max_n: int = MAX_NGRAM,
                  min_n: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the longest suffix n-gram of
    ``tokens`` (``min_n <= n <= max_n``): the latest with ``k`` tokens after it, else the
    earliest (a short loop's latest match is followed by only the last token); [] if none."""
    if k <= 0:
        return []
    seq = np.asarray(tokens[-SEARCH_WINDOW:], np.int64)
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        windows = sliding_window_view(seq[:-1], n)  # every n-gram with a token after it
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:  # the latest match that has k tokens after it, else the earliest
            full = hits[hits + n + k <= len(seq)]
            start = int(full[-1] if full.size else hits[0]) + n
            return seq[start:start + k].tolist()
    return []


def may_match(seq: Sequence) -> bool:
    """Could the suffix match once the token in flight is known? Its shortest n-gram starts
    with the last known token, so that token must occur earlier. Without this, a step would
    wait for the step in flight (no pipelining) only to find no match."""
    if seq.pending_row is None:
        return True
    window = seq.token_ids[-SEARCH_WINDOW:]
    return window[-1] in window[:-1]


@dataclass(slots=True)
class SpecState:
    """A sequence's adaptive draft length: shrinks on misses, backs off when all miss."""

    k: int
    skip: int = 0  # steps left before it drafts again
    backoff: int = BACKOFF_MIN
    rate: float = 1.0  # moving average of its acceptance rate


@dataclass(slots=True)
class SpecStats:
    steps: int = 0  # engine steps that speculated
    rows: int = 0  # speculating row-steps (one sequence in one step)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens the speculating rows produced (accepted + correction/bonus)

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "rows": self.rows, "draft_tokens": self.drafted,
                "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_step": self.emitted / self.rows if self.rows else 0.0}


class Speculator:
    """Plans the drafts of a step and learns each sequence's draft length from the results."""

    def __init__(self, num_tokens: int, max_rows: int = MAX_SPEC_ROWS,
                 vocab_size: int | None = None, states: Any = None) -> None:
        self.num_tokens, self.max_rows = num_tokens, max_rows
        self.vocab_size = vocab_size  # the logits' width: a grammar row's masks have it
        self.states = states  # a hybrid model's StateManager (scratch slots per draft)
        self.stats = SpecStats()
        self.rate = 1.0  # engine-wide moving average of the acceptance rate
        self._since_probe = 0

    def _state(self, seq: Sequence) -> SpecState:
        if seq.spec is None:
            seq.spec = SpecState(self.num_tokens)
        return seq.spec

    def eligible(self, seq: Sequence) -> bool:
        """May this sequence draft now (its sampling allows it, its back-off is over)?"""
        return not seq.pooling and self._state(seq).skip == 0

    def wants(self, batch: ScheduledBatch) -> bool:
        """Will this step try to draft? Then the step in flight is read first (the drafts
        continue its token) and this step is read before the next is scheduled."""
        rows = [s for s, n, last in zip(batch.seqs, batch.num_new_tokens, batch.samples)
                if n == 1 and last]
        if len(rows) > self.max_rows:
            return False
        if len(rows) > SMALL_BATCH and self.rate < GOOD_RATE:
            self._since_probe += 1
            if self._since_probe < PROBE_EVERY:
                return False
        self._since_probe = 0
        wants = False
        for seq in rows:
            if self.eligible(seq):
                wants = wants or self.may_draft(seq)
            elif seq.spec is not None and seq.spec.skip:
                seq.spec.skip -= 1
        return wants

    def draft(self, batch: ScheduledBatch, blocks: BlockManager, max_model_len: int,
              budget: int) -> int:
        """Give eligible decode rows their drafts (``seq.draft_ids``, ``batch.num_drafts``)
        within the step's token ``budget``; returns how many rows speculate."""
        budget -= batch.num_tokens
        num_rows = 0
        for i, seq in enumerate(batch.seqs):
            k = self.draft_len(batch, i, max_model_len, budget)
            drafts = propose_ngram(seq.token_ids, k)
            if self.attach(batch, i, drafts, blocks):
                budget -= len(drafts)
                num_rows += 1
        if num_rows:
            self.stats.steps += 1
        return num_rows

    def attach(self, batch: ScheduledBatch, i: int, drafts: list[int], blocks: BlockManager,
               reserved: bool = False) -> bool:
        """Make row ``i`` verify ``drafts`` (cut where its grammar forbids one); False if it
        cannot (nothing left, no room, no scratch state slots). ``reserved``: the row's
        ``len(drafts)`` slots are appended already (a draft model wrote its KV there);
        given back if the row does not speculate."""
        seq = batch.seqs[i]
        if seq.grammar is not None and drafts:  # cut at the first token it disallows
            drafts, seq.draft_masks, seq.draft_accepting = \
                seq.grammar.walk_drafts(drafts, self.vocab_size)
        ok = bool(drafts) and (reserved or blocks.can_append(seq, len(drafts)))
        if ok and self.states is not None:
            ok = self.states.take_draft_slots(seq, len(drafts))
        if not ok:
            seq.draft_masks, seq.draft_accepting = None, []
            if reserved:
                blocks.trim(seq, len(seq.token_ids))
            return False
        if not reserved:
            blocks.append_slots(seq, len(drafts))
        seq.draft_ids = drafts
        if self.states is not None:  # the state after each draft, for any rollback
            batch.state_points[i] = batch.state_points[i] + self.states.draft_points(seq)
        batch.num_new_tokens[i] += len(drafts)
        batch.num_drafts[i] = len(drafts)
        return True

    def may_draft(self, seq: Sequence) -> bool:
        """Could ``seq`` draft this step (before the step in flight is read)?"""
        return may_match(seq)

    def draft_len(self, batch: ScheduledBatch, i: int, max_model_len: int, budget: int) -> int:
        """How many tokens row ``i`` may draft (0: none): its adaptive k within the context,
        its ``max_tokens`` and the step's remaining token ``budget``."""
        seq = batch.seqs[i]
        if batch.num_new_tokens[i] != 1 or seq.pending_row is not None or not self.eligible(seq):
            return 0
        room = max_model_len - len(seq.token_ids) - 1
        left = (seq.params.max_tokens or 1 << 30) - seq.num_completion_tokens - 1
        return max(0, min(self._state(seq).k, room, left, budget))

    def verified(self, seq: Sequence, num_drafted: int, num_accepted: int, num_emitted: int) -> None:
        """Record one speculating row's result and adapt the sequence's draft length."""
        st, state = self.stats, self._state(seq)
        st.rows, st.drafted, st.accepted = st.rows + 1, st.drafted + num_drafted, st.accepted + num_accepted
        st.emitted += num_emitted
        state.rate += RATE_WEIGHT * (num_accepted / num_drafted - state.rate)
        self.rate += RATE_WEIGHT / 3 * (num_accepted / num_drafted - self.rate)
        if num_accepted == num_drafted:
            state.k = min(self.num_tokens, state.k + 1)
        elif num_accepted:
            state.k = num_accepted + 1
        else:  # a miss: one draft next time, then pause
            state.k = 1 if state.k > 1 else 0
        if state.k == 0 or state.rate < PAUSE_RATE:  # pause, longer each time
            state.k, state.skip = 1, state.backoff
            state.backoff = min(BACKOFF_MAX, state.backoff * 2)
        elif state.rate >= GOOD_RATE:
            state.backoff = BACKOFF_MIN


class ModelSpeculator(Speculator):
    """A ``Speculator`` whose drafts come from a model (a draft model, the MTP head) rather
    than the text: each ready row's k slots are reserved first (the model writes its KV
    there while drafting), then one chained pass drafts every row, read back in one sync.
    Subclasses give the two hooks, ``draft_start`` and ``propose``."""

    def __init__(self, num_tokens: int, drafter: Drafter, **options: Any) -> None:
        super().__init__(num_tokens, **options)
        self.drafter = drafter

    def draft(self, batch: ScheduledBatch, blocks: BlockManager, max_model_len: int,
              budget: int) -> int:
        """Reserve each ready row's k slots, draft them all in one chained pass, and mark
        the rows as speculating (``seq.draft_ids``, ``batch.num_drafts``)."""
        budget -= batch.num_tokens
        rows = []
        for i, seq in enumerate(batch.seqs):
            k = self.draft_len(batch, i, max_model_len, budget)
            start = self.draft_start(batch, i) if k else None
            if start is not None and blocks.can_append(seq, k):
                blocks.append_slots(seq, k)
                rows.append((i, k, start))
                budget -= k
        if not rows:
            return 0
        taken = [i for (i, _, _), drafts in zip(rows, self.propose(batch, rows))
                 if self.attach(batch, i, drafts, blocks, reserved=True)]
        if taken:
            self.stats.steps += 1
        return len(taken)

    def draft_start(self, batch: ScheduledBatch, i: int) -> Any | None:
        """What ``propose`` needs to start row ``i``'s drafts; None: it cannot draft now."""
        raise NotImplementedError

    def propose(self, batch: ScheduledBatch, rows: list[tuple[int, int, Any]]) -> list[list[int]]:
        """For each (batch row, k, its ``draft_start``): its k drafts, in slots reserved."""
        raise NotImplementedError
