"""Per-request generation settings and the presets our users know."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` means greedy.

    ``stop`` is accepted as an alias of ``stop_sequences``. Invalid values raise
    ``InvalidRequestError`` (a ``ValueError``) whose ``field`` names the field.

    Structured output (at most one of them): ``json_schema`` (a JSON Schema, dict or JSON
    text), ``regex``, ``choice`` (one of these strings) or ``grammar`` (Lark, llguidance's
    dialect). The output then matches it; the request stops when the grammar is complete.
    ``strict=False`` ignores schema keywords the grammar engine does not implement (instead
    of rejecting the schema). ``grammar_after`` is a token (e.g. ``"</think>"``) before which
    output is free: Qwen3's reasoning stays unconstrained, its answer follows the grammar.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int | None = 256
    stop_sequences: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop: list[str] | str | None = None
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    strict: bool = True
    grammar_after: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_sequences, str):
            self.stop_sequences = [self.stop_sequences]
        if self.stop is not None:
            extra = [self.stop] if isinstance(self.stop, str) else list(self.stop)
            self.stop_sequences = list(self.stop_sequences) + extra
            self.stop = None
        if isinstance(self.json_schema, str):
            self.json_schema = _parse_schema(self.json_schema)
        self._validate()
        self._validate_constraint()

    def _validate(self) -> None:
        _check(self, "temperature", _finite(self.temperature) and self.temperature >= 0, ">= 0")
        _check(self, "top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        _check(self, "top_k", _int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 = off)")
        _check(self, "min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]")
        ok_max = self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1)
        _check(self, "max_tokens", ok_max, "an int >= 1")
        ok_rep = _finite(self.repetition_penalty) and self.repetition_penalty > 0
        _check(self, "repetition_penalty", ok_rep, "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(self, name, _finite(value) and -2 <= value <= 2, "in [-2, 2]")
        ok_lp = self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= 20)
        _check(self, "logprobs", ok_lp, "an int in [0, 20]")
        _check(self, "min_tokens", _int(self.min_tokens) and self.min_tokens >= 0, ">= 0")
        ok_stop = all(isinstance(s, str) and s for s in self.stop_sequences)
        _check(self, "stop_sequences", ok_stop, "a list of non-empty strings")
        ok_seed = self.seed is None or (_int(self.seed) and -(2**63) <= self.seed < 2**64)
        _check(self, "seed", ok_seed, "an int in [-2**63, 2**64)")

    def _validate_constraint(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"give at most one of json_schema, regex, choice, grammar (got {given})", field=given[1])
        _check(self, "json_schema", self.json_schema is None or isinstance(self.json_schema, dict),
               "a JSON Schema object")
        for name in ("regex", "grammar", "grammar_after"):
            value = getattr(self, name)
            _check(self, name, value is None or (isinstance(value, str) and value != ""),
                   "a non-empty string")
        ok_choice = self.choice is None or (
            isinstance(self.choice, list) and self.choice
            and all(isinstance(c, str) and c for c in self.choice))
        _check(self, "choice", ok_choice, "a non-empty list of non-empty strings")

    @property
    def is_constrained(self) -> bool:
        """Whether a grammar constrains the output."""
        return any(getattr(self, n) is not None for n in ("json_schema", "regex", "choice", "grammar"))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stop"}

    def clone(self, **overrides: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        new = replace(self, **overrides)
        return new

    # Presets: each accepts overrides, e.g. ``SamplingParams.creative(max_tokens=500)``.
    @classmethod
    def balanced(cls, **overrides: Any) -> SamplingParams:
        return cls(**{"temperature": 0.7, "top_p": 0.9, "top_k": 50, **overrides})

    @classmethod
    def creative(cls, **overrides: Any) -> SamplingParams:
        return cls(**{"temperature": 1.0, "top_p": 0.95, "top_k": 100, **overrides})

    @classmethod
    def factual(cls, **overrides: Any) -> SamplingParams:
        return cls(**{"temperature": 0.3, "top_p": 0.8, "top_k": 20, **overrides})

    @classmethod
    def code(cls, **overrides: Any) -> SamplingParams:
        return cls(**{"temperature": 0.1, "top_p": 0.95, "repetition_penalty": 1.05, **overrides})

    @classmethod
    def deterministic(cls, **overrides: Any) -> SamplingParams:
        return cls(**{"temperature": 0.0, **overrides})


def _parse_schema(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"json_schema is not valid JSON: {exc}", field="json_schema") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(params: SamplingParams, name: str, ok: bool, expected: str) -> None:
    if not ok:
        message = f"{name} must be {expected}, got {getattr(params, name)!r}"
        raise InvalidRequestError(message, field=name)
