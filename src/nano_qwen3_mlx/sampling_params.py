"""Per-request generation settings and the presets our users know."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import InvalidRequestError

# The most stop strings one request may give: each is matched against every new piece of text.
MAX_STOP_SEQUENCES = 64


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` means greedy.

    ``stop`` is accepted as an alias of ``stop_sequences`` (at most
    :data:`MAX_STOP_SEQUENCES` of them). Invalid values raise
    ``InvalidRequestError`` (a ``ValueError``) whose ``field`` names the field.

    Structured output (at most one of them): ``json_schema`` (a JSON Schema, dict or JSON
    text), ``regex``, ``choice`` (one of these strings) or ``grammar`` (Lark, llguidance's
    dialect). The output then matches it; the request stops when the grammar is complete.
    ``strict=False`` ignores schema keywords the grammar engine does not implement (instead
    of rejecting the schema). The grammar also covers Qwen3's thinking: ``grammar_thinking``
    says where the reply starts, ``"auto"`` (from the prompt: inside a ``<think>`` the prompt
    opened, an optional block at the start of an assistant turn, none after a closed block or
    in plain text), ``"optional"`` (a free ``<think>...</think>`` block may come first),
    ``"inside"`` (free text until ``</think>``, then the structure) or ``"none"``.

    ``thinking_budget`` caps the tokens of a thinking block: once spent, ``</think>`` is the
    only token allowed, so the answer (and any structure) follows within ``max_tokens``.

    A field of :data:`MODEL_DEFAULT_FIELDS` left out (or given as None) takes the model's
    default when the engine runs the request (its ``generation_config.json``, then the
    server's; ``max_tokens``: the engine's ``max_tokens_default``). Until then it reads as
    the neutral value of :data:`NEUTRAL` and is listed in ``defaulted``.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop_sequences: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    repetition_penalty: float | None = None
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
    grammar_thinking: str = "auto"
    thinking_budget: int | None = None
    defaulted: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        unset = {name for name in MODEL_DEFAULT_FIELDS if getattr(self, name) is None}
        for name in unset:
            setattr(self, name, NEUTRAL[name])
        self.defaulted = frozenset(self.defaulted | unset)
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
        check_stop_count(len(self.stop_sequences), "stop")
        ok_seed = self.seed is None or (_int(self.seed) and -(2**63) <= self.seed < 2**64)
        _check(self, "seed", ok_seed, "an int in [-2**63, 2**64)")

    def _validate_constraint(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"give at most one of json_schema, regex, choice, grammar (got {given})", field=given[1])
        _check(self, "json_schema", self.json_schema is None or isinstance(self.json_schema, dict),
               "a JSON Schema object")
        _check(self, "grammar_thinking", self.grammar_thinking in GRAMMAR_THINKING,
               f"one of {', '.join(GRAMMAR_THINKING)}")
        ok_budget = self.thinking_budget is None or (
            _int(self.thinking_budget) and self.thinking_budget >= 0)
        _check(self, "thinking_budget", ok_budget, "an int >= 0")
        for name in ("regex", "grammar"):
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
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("stop", "defaulted")}

    def clone(self, **overrides: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return replace(self, defaulted=self.defaulted - overrides.keys(), **overrides)

    def with_defaults(self, defaults: dict[str, Any]) -> SamplingParams:
        """Fill the fields left out with ``defaults`` (the model's); given fields stay."""
        filled = {k: v for k, v in defaults.items() if k in self.defaulted}
        return replace(self, defaulted=frozenset(), **filled)

    def summary(self) -> str:
        """The settings that shape the output, e.g. ``max_tokens=2048; temperature=0.7; ...``."""
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return "; ".join(f"{name}={getattr(self, name)}" for name in names)

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
# Where a reply starts relative to a thinking block (SamplingParams.grammar_thinking).
GRAMMAR_THINKING = ("auto", "optional", "inside", "none")
# Fields whose default comes from the model (generation_config.json) or the server.
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                        "max_tokens")
# What those fields read as before the engine fills them (no effect on the distribution;
# max_tokens None = up to the context length).
NEUTRAL: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                           "repetition_penalty": 1.0, "max_tokens": None}


# Used when neither the request, the operator nor the model's generation_config says
# (llama.cpp's and Ollama's choices: min_p keeps small models from rambling off-topic).
SERVER_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "top_k": 40,
                                            "min_p": 0.05, "repetition_penalty": 1.0}


def merge_defaults(generation_config: dict[str, Any], overrides: dict[str, Any],
                   max_tokens: int) -> dict[str, Any]:
    """What a request's left-out fields become: operator overrides > the model's
    generation_config > :data:`SERVER_SAMPLING_DEFAULTS`; ``max_tokens`` as given."""
    merged = {**SERVER_SAMPLING_DEFAULTS, **generation_config, **overrides, "max_tokens": max_tokens}
    merged["top_k"] = int(merged["top_k"])  # JSON/TOML may write 20.0
    return merged


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_stop_count(count: int, field_name: str) -> None:
    """``InvalidRequestError`` naming ``field_name`` past :data:`MAX_STOP_SEQUENCES`."""
    if count > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"{field_name}: at most {MAX_STOP_SEQUENCES} stop sequences, "
                                  f"got {count}", field=field_name)


def _check(params: SamplingParams, name: str, ok: bool, expected: str) -> None:
    if not ok:
        message = f"{name} must be {expected}, got {getattr(params, name)!r}"
        raise InvalidRequestError(message, field=name)
