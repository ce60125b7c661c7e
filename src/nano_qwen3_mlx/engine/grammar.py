"""Constrained decoding with ``llguidance``: compiled grammars (cached), per-sequence matchers
and the allowed-token masks the sampler applies row by row.

Nothing here touches MLX: masks are numpy bitmasks, computed while the device runs the
forward pass of the step they are for; the sampler unpacks them on the device.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np

from ..errors import InvalidRequestError
from ..parsers import THINK_CLOSE, THINK_OPEN
from ..sampling_params import SamplingParams
from ..tokenizer_cache import shared_lltokenizer

log = logging.getLogger(__name__)

# Compact JSON, as the OpenAI API writes it: no free whitespace, which a model could otherwise
# repeat until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256
# The thinking block's pieces (thinking_grammar): free text that never spells </think> (so the
# reasoning split finds the real close), then the whitespace Qwen3 puts before its answer.
_THINK_LEXEMES = ("THINK_TEXT: /(?s:.*)/ & ~/(?s:.*<\\/think>.*)/\n"
                  "THINK_WS: /\\n{0,2}/\n")
_STRUCTURE = "structure"  # the name of the structure's grammar inside thinking_grammar
_ASSISTANT_TURN = "<|im_start|>assistant"


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
class ThinkingBudget:
    """Counts one sequence's thinking tokens and restricts the next token once they are spent.

    ``inside``: the sequence is in a thinking block (the prompt opened it, or the model wrote
    ``<think>``). Once ``budget`` tokens were thought (all blocks of the reply together), the
    only token allowed inside a block is ``close``, and outside ``open`` is no longer allowed.
    """

    open: int
    close: int
    budget: int
    inside: bool = False
    spent: int = 0

    def advance(self, token: int) -> None:
        if token == self.close:
            self.inside = False
        elif self.inside:
            self.spent += 1
        elif token == self.open:
            self.inside = True

    @property
    def must_close(self) -> bool:
        return self.inside and self.spent >= self.budget

    @property
    def spent_out(self) -> bool:
        """Outside a block with nothing left: no new block may open."""
        return not self.inside and self.spent >= self.budget

    @property
    def may_bind_next(self) -> bool:
        """Whether the token still in flight, whatever it is, could make :attr:`must_close`
        true: only then does the sampler need to read it first. (Outside a block it cannot:
        ``open`` was allowed only while budget was left.)"""
        return self.inside and self.spent + 1 >= self.budget

    def restrict(self, row: np.ndarray) -> None:
        """Apply the budget to one bitmask row (``int32`` words, bit ``t % 32`` of word
        ``t // 32`` for token ``t``)."""
        if self.must_close:
            row[:] = 0
            _set_bit(row, self.close, True)
        elif self.spent_out:
            _set_bit(row, self.open, False)


@dataclass(slots=True)
class GrammarState:
    """One sequence's constraint: its grammar matcher (the thinking block and the structure,
    see :func:`thinking_grammar`) and/or its thinking budget."""

    matcher: llg.LLMatcher | None = None
    budget: ThinkingBudget | None = None
    failed: str | None = None  # the matcher's error, if a token was rejected

    @property
    def active(self) -> bool:
        """Whether the next token is restricted at all (a mask must be computed)."""
        budget = self.budget
        return self.matcher is not None or (budget is not None
                                            and (budget.must_close or budget.spent_out))

    @property
    def needs_last_token(self) -> bool:
        """Whether the next mask depends on the token still in flight (a grammar always; a
        budget only near its end), so the sampler must read that token first."""
        return self.matcher is not None or (self.budget is not None and self.budget.may_bind_next)

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True when the grammar is complete or failed (the
        sequence stops; ``failed`` then says why)."""
        if self.budget is not None:
            self.budget.advance(token)
        if self.matcher is None:
            return False
        if not self.matcher.consume_token(token):
            error = self.matcher.get_error() or "token rejected by the grammar"
            self.failed = _first_lines(error.split("<state>")[0])  # not llguidance's dump
            log.warning("grammar rejected token %d: %s", token, self.failed)
            return True
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher is not None and self.matcher.is_accepting()

    def walk_drafts(self, drafts: list[int], vocab_size: int) -> tuple[list[int], np.ndarray,
                                                                        list[bool]]:
        """Check speculative ``drafts`` against the constraint without changing it.

        Returns the drafts up to the first one it disallows, the bitmask of every sampled
        position of the row (``1 + len(kept)`` rows: the mask after each kept prefix) and
        whether the grammar is accepting at each. The matcher walks the kept drafts, then
        rolls back: the sequence advances only by the tokens verification accepts."""
        width = llg_np.get_bitmask_shape(1, vocab_size)[1]
        masks = np.full((len(drafts) + 1, width), -1, np.int32)
        budget = None if self.budget is None else replace(self.budget)
        kept: list[int] = []
        accepting: list[bool] = []
        for j, token in enumerate([*drafts, None]):
            if self.matcher is not None:
                llg_np.fill_next_token_bitmask(self.matcher, masks, j)
            if budget is not None:
                budget.restrict(masks[j])
            accepting.append(self.accepting)
            if token is None or not _bit(masks[j], token) or (
                    self.matcher is not None and self.matcher.is_stopped()):
                break
            if self.matcher is not None and not self.matcher.consume_token(token):
                break  # never after an allowed token; the matcher is unchanged then
            if budget is not None:
                budget.advance(token)
            kept.append(token)
        if self.matcher is not None and kept and not self.matcher.rollback(len(kept)):
            raise RuntimeError("grammar matcher could not roll back speculative drafts")
        return kept, masks[:len(kept) + 1], accepting[:len(kept) + 1]


class GrammarCompiler:
    """Compiles constraints against one tokenizer; a compiled grammar is cached by its source."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltokenizer: llg.LLTokenizer | None = None
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        backend = getattr(tokenizer, "backend", None)
        ids = [backend.token_to_id(t) if backend is not None else None
               for t in (THINK_OPEN, THINK_CLOSE)]
        # Qwen3's <think> and </think> are single tokens; without them a model cannot think.
        self.think_ids: tuple[int, int] | None = None if None in ids else (ids[0], ids[1])

    @property
    def lltokenizer(self) -> llg.LLTokenizer:
        if self._lltokenizer is None:  # ~1 s for a 150k vocabulary: only when first needed
            tok = self._tokenizer  # shared by the engines on the same tokenizer
            self._lltokenizer = shared_lltokenizer(tok.backend, self.vocab_size,
                                                   list(tok.eos_token_ids))
        return self._lltokenizer

    def thinking_mode(self, params: SamplingParams, prompt_ids: list[int]) -> str:
        """Where the reply starts relative to a thinking block: ``params.grammar_thinking``,
        or for ``"auto"`` what the prompt says (:func:`prompt_thinking_mode`)."""
        if self.think_ids is None:
            return "none"
        if params.grammar_thinking != "auto":
            return params.grammar_thinking
        return prompt_thinking_mode(self._tokenizer, prompt_ids)

    def new_state(self, params: SamplingParams, prompt_ids: list[int]) -> GrammarState | None:
        """A fresh constraint for ``params`` after ``prompt_ids`` (None without a grammar or
        a thinking budget).

        Raises ``InvalidRequestError`` (a ``ValueError``) naming the problem for an invalid or
        unsupported grammar.
        """
        source = grammar_source(params)
        has_budget = params.thinking_budget is not None and self.think_ids is not None
        if source is None and not has_budget:
            return None
        mode = self.thinking_mode(params, prompt_ids)
        matcher = None
        if source is not None:
            kind, grammar = source
            if mode != "none":
                grammar = thinking_grammar(grammar, *self.think_ids, inside=mode == "inside")
            matcher = self._compiled(kind, grammar).deep_copy()
        budget = None
        if has_budget:
            budget = ThinkingBudget(*self.think_ids, params.thinking_budget, inside=mode == "inside")
        return GrammarState(matcher, budget)

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


def prompt_thinking_mode(tokenizer: Any, prompt_ids: list[int]) -> str:
    """``"inside"`` when the prompt opened ``<think>`` (Qwen3.5 templates), ``"none"`` when it
    closed one (thinking disabled) or is no chat turn, ``"optional"`` at the start of an
    assistant turn (``<|im_start|>assistant``), where a thinking model may open a block."""
    tail = tokenizer.decode(list(prompt_ids[-4:]), skip_special_tokens=False).rstrip()
    if tail.endswith(THINK_OPEN):
        return "inside"
    if tail.endswith(THINK_CLOSE):
        return "none"
    return "optional" if tail.endswith(_ASSISTANT_TURN) else "none"


def thinking_grammar(structure: str, think_open: int, think_close: int, *,
                     inside: bool = False) -> str:
    """One llguidance grammar: an optional thinking block, then ``structure``.

    ``structure`` is any llguidance grammar (Lark text, or the JSON of
    ``grammar_from_json_schema`` / ``grammar_from_regex``). The block is the ``<think>``
    token, free text (every token but special and added ones, and never the text
    ``</think>``), the ``</think>`` token and up to two newlines (as Qwen3 writes it). ``inside=True``: the prompt already opened the block, so the grammar starts
    in its free text and the block is not optional.
    """
    body = _grammar_list(structure)
    body[0] = {**body[0], "name": _STRUCTURE}
    block = f"THINK_TEXT <[{think_close}]> THINK_WS"
    if inside:
        lark = f"start: {block} @{_STRUCTURE}\n"
    else:
        lark = f"start: think? @{_STRUCTURE}\nthink: <[{think_open}]> {block}\n"
    lark += _THINK_LEXEMES
    return json.dumps({"grammars": [{"lark_grammar": lark}, *body]}, ensure_ascii=False)


def _grammar_list(grammar: str) -> list[dict[str, Any]]:
    """The ``grammars`` list of an llguidance grammar given as JSON or as Lark text."""
    if grammar.lstrip().startswith("{"):
        try:
            parsed = json.loads(grammar)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("grammars"), list):
            return list(parsed["grammars"])
    return [{"lark_grammar": grammar}]


GRAMMAR_FAILED = "grammar failed: "  # how RequestOutput.error starts when the grammar failed


def token_bitmasks(states: list[GrammarState], vocab_size: int) -> np.ndarray:
    """``(len(states), ceil(vocab_size / 32))`` int32: bit ``t % 32`` of word ``t // 32`` is
    set when the constraint allows token ``t`` next (the grammar's mask, narrowed by a spent
    thinking budget)."""
    width = llg_np.get_bitmask_shape(1, vocab_size)[1]
    bitmask = np.full((len(states), width), -1, np.int32)
    for row, state in enumerate(states):
        if state.matcher is not None:
            llg_np.fill_next_token_bitmask(state.matcher, bitmask, row)
        if state.budget is not None:
            state.budget.restrict(bitmask[row])
    return bitmask


def _set_bit(row: np.ndarray, token: int, value: bool) -> None:
    words = row.view(np.uint32)
    bit = np.uint32(1 << (token % 32))
    words[token // 32] = words[token // 32] | bit if value else words[token // 32] & ~bit


def _bit(row: np.ndarray, token: int) -> bool:
    return token < 32 * len(row) and bool((row.view(np.uint32)[token // 32] >> (token % 32)) & 1)


def _first_lines(message: str, limit: int = 300) -> str:
    return " ".join(message.split())[:limit]
