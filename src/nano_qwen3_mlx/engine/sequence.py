"""``Sequence``: one request's tokens, state, block table, sampling params and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no KV blocks (new, or preempted and to be recomputed)
    RUNNING = "running"  # owns KV blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity: compared and hashed as one request
class Sequence:
    """One request as the engine sees it.

    ``token_ids`` holds the tokens Python knows. With pipelined decoding the token sampled
    in the step still in flight is not known yet: ``pending_row`` is its row in that
    step's sampled array, and it already counts in ``num_tokens``.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0
    pending_row: int | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens reused from the cache at admission
    first_token_time: float | None = None
    last_token_time: float | None = None
    output_state: Any = None  # output_processor.OutputState: detokenizer, stop matcher
    # Prefill only: the last prompt token's final-norm hidden state is returned (an embedding)
    # instead of a sampled token, and the sequence ends after its prompt.
    pooling: bool = False
    grammar: Any = None  # grammar.GrammarState when the output is constrained
    # Hybrid models: the state-pool slot this sequence owns while running, and how many of
    # its tokens the state there has absorbed (steps queued so far; state_manager.py).
    state_slot: int | None = None
    state_tokens: int = 0
    # Speculative decoding: the tokens this step's row drafts after its last token (verified
    # when the step is read), and the adaptive draft length (speculative.SpecState).
    draft_ids: list[int] = field(default_factory=list)
    spec: Any = None
    # A constrained speculating row: the mask of each sampled position (the mask after the
    # drafts before it) and whether the grammar is accepting there (grammar.walk_drafts).
    draft_masks: Any = None
    draft_accepting: list[bool] = field(default_factory=list)
    # A hybrid speculating row: the scratch state slots taking the state after each of its
    # first k positions (state_manager.StateManager.take_draft_slots).
    draft_slots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + (self.pending_row is not None)

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        return self.status is SequenceStatus.RUNNING and self.num_uncomputed_tokens == 1

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def reached_max_tokens(self) -> bool:
        limit = self.params.max_tokens
        return limit is not None and self.num_completion_tokens >= limit

    def sort_key(self) -> tuple[int, float, int]:
        """Lower sorts first: higher priority, then earlier arrival (vLLM: lower value wins)."""
        return (self.priority, self.arrival_time, self.seq_id)
