"""Sampled tokens -> text: incremental detokenizing, stop checks, logprob records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sampling_params import SamplingParams
from .sequence import Sequence


@dataclass(slots=True)
class OutputState:
    """Per-request text state kept on ``Sequence.output_state``."""

    detokenizer: Any
    stop_matcher: Any
    matched: bool = False
    # vLLM's stop_reason: the stop string matched, or the stop token id (None for EOS/length).
    stop_reason: str | int | None = None


class OutputProcessor:
    """Decides, token by token, what text a request emits and whether it is finished."""

    def __init__(self, tokenizer: Any) -> None:
        from ..tokenizer import StopMatcher

        self.tokenizer = tokenizer
        self._stop_matcher_cls = StopMatcher

    def new_state(self, params: SamplingParams) -> OutputState:
        return OutputState(self.tokenizer.detokenizer(skip_special_tokens=True),
                           self._stop_matcher_cls(params.stop_sequences))

    def append(self, seq: Sequence, token: int, max_model_len: int) -> tuple[str, str | None]:
        """Add ``token`` to ``seq``; return (new text, finish reason or None)."""
        seq.token_ids.append(token)
        params, state = seq.params, seq.output_state
        text, reason = "", None
        is_eos = token in self.tokenizer.eos_token_ids and not params.ignore_eos
        if is_eos or token in params.stop_token_ids:
            reason = "stop"  # the stop token itself is not part of the text
            state.stop_reason = None if is_eos else token
        else:
            complete = seq.grammar is not None and seq.grammar.advance(token)
            text, matched = state.stop_matcher.feed(state.detokenizer.add(token))
            state.matched, state.stop_reason = matched is not None, matched
            reason = "stop" if state.matched or complete else None
        out_of_room = seq.reached_max_tokens or seq.num_tokens >= max_model_len
        if seq.grammar is not None and seq.grammar.failed and not state.matched:
            # A grammar that failed did not complete: say so, never "stop".
            reason = "length" if out_of_room else "error"
        if reason is None and out_of_room:
            reason = "length"
        if reason and not state.matched:  # flush what the detokenizer/matcher held back
            tail, _ = state.stop_matcher.feed(state.detokenizer.finalize())
            text += tail + state.stop_matcher.flush()
        return text, reason

    def logprobs(self, seq: Sequence, row: int, token: int, lp, top_ids, top_lp) -> list | None:
        """The OpenAI-style logprob record of one sampled token, when the request asked."""
        n = seq.params.logprobs
        if n is None or lp is None:
            return None
        to_str = self.tokenizer.token_to_str
        tops = [] if not n or top_ids is None else [
            {"token_id": t, "token": to_str(t), "logprob": v}
            for t, v in zip(top_ids[row][:n], top_lp[row][:n])
            if v != float("-inf")  # tokens a grammar forbids are no alternatives
        ]
        return [{"token_id": token, "token": to_str(token), "logprob": lp[row], "top_logprobs": tops}]
