"""Constrained decoding with ``llguidance``: compiled grammars (cached), per-sequence matchers
and the allowed-token masks the sampler applies row by row.

Nothing here touches MLX: masks are numpy booleans, so they can be computed while the device
runs the forward pass of the step they are for.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np

from ..errors import InvalidRequestError
from ..sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Compact JSON, as the OpenAI API writes it: no free whitespace, which a model could otherwise
# repeat until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256


def grammar_source(params: SamplingParams) -> tuple[str, str] | None:
    """``(kind, llguidance grammar)`` for the constraint in ``params``, or None."""
    if params.json_schema is not None:
        schema = params.json_schema
        options = {**_JSON_OPTIONS, "lenient": not params.strict}
        try:
            return "json_schema", llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as exc:
            raise InvalidRequestError(f"json_schema is not a JSON object: {exc}",
                                      field="json_schema") from None
    if params.regex is not None:
        return "regex", llg.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return "choice", llg.LLMatcher.grammar_from_lark(lark)
    if params.grammar is not None:
        return "grammar", llg.LLMatcher.grammar_from_lark(params.grammar)
    return None


def check_grammar(params: SamplingParams) -> None:
    """Raise ``InvalidRequestError`` naming the problem if ``params``' grammar is invalid or
    unsupported. Needs no tokenizer and touches no shared state: safe on any thread."""
    source = grammar_source(params)
    if source is None:
        return
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(source[1])
    if is_error:
        raise InvalidRequestError(f"invalid {source[0]}: {_first_lines(messages[0])}",
                                  field=source[0])


@dataclass(slots=True)
class GrammarState:
    """One sequence's position in its grammar.

    ``gate`` is the token after which the grammar starts (Qwen3's ``</think>``: the reasoning
    is free, the answer is constrained); None when it applies from the first token.
    """

    matcher: llg.LLMatcher
    gate: int | None = None
    failed: str | None = None  # the matcher's error, if a token was rejected

    @property
    def active(self) -> bool:
        return self.gate is None

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True when the grammar is complete (the sequence stops)."""
        if self.gate is not None:
            if token == self.gate:
                self.gate = None
            return False
        if not self.matcher.consume_token(token):
            self.failed = self.matcher.get_error() or "token rejected by the grammar"
            log.warning("grammar rejected token %d: %s", token, self.failed)
            return True
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.active and self.matcher.is_accepting()


class GrammarCompiler:
    """Compiles constraints against one tokenizer; a compiled grammar is cached by its source."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltokenizer: llg.LLTokenizer | None = None
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()

    @property
    def lltokenizer(self) -> llg.LLTokenizer:
        if self._lltokenizer is None:  # ~1 s for a 150k vocabulary: only when first needed
            tok = self._tokenizer
            self._lltokenizer = llg.LLTokenizer(
                tok.backend.to_str(), n_vocab=self.vocab_size, eos_token=list(tok.eos_token_ids)
            )
        return self._lltokenizer

    def new_state(self, params: SamplingParams) -> GrammarState | None:
        """A fresh matcher for ``params``' constraint (None without one).

        Raises ``InvalidRequestError`` (a ``ValueError``) naming the problem for an invalid or unsupported grammar.
        """
        source = grammar_source(params)
        if source is None:
            return None
        gate = self._gate_token(params.grammar_after)
        return GrammarState(self._compiled(*source).deep_copy(), gate)

    def _compiled(self, kind: str, grammar: str) -> llg.LLMatcher:
        matcher = self._cache.get(grammar)
        if matcher is not None:
            self._cache.move_to_end(grammar)
            return matcher
        matcher = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {kind}: {_first_lines(matcher.get_error())}",
                                      field=kind)
        self._cache[grammar] = matcher
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return matcher

    def _gate_token(self, text: str | None) -> int | None:
        if text is None:
            return None
        token = self._tokenizer.backend.token_to_id(text)
        if token is None:
            raise InvalidRequestError(
                f"grammar_after must be a single token of the vocabulary, got {text!r}",
                field="grammar_after")
        return token


def allowed_tokens(states: list[GrammarState], vocab_size: int) -> np.ndarray:
    """``(len(states), vocab_size)`` booleans: the tokens each grammar allows next."""
    width = llg_np.get_bitmask_shape(1, vocab_size)[1]
    bitmask = np.full((len(states), width), -1, np.int32)
    for row, state in enumerate(states):
        llg_np.fill_next_token_bitmask(state.matcher, bitmask, row)
    # Bit i of int32 word j is token 32*j + i; little-endian bytes keep that order.
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


def _first_lines(message: str, limit: int = 300) -> str:
    return " ".join(message.split())[:limit]
