"""The one internal request every endpoint parses its JSON into, and its choices.

An endpoint's protocol module turns the body into a :class:`GenerationRequest`; the runner
(:mod:`.runner`) only ever sees this type, whatever the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import InvalidRequestError
from ...sampling_params import SamplingParams


@dataclass(slots=True)
class Choice:
    """One choice of a request: one engine request, ``{response id}-{index}``."""

    index: int  # prompt_index * n + i: the choice's index in the response
    prompt_index: int
    token_ids: list[int]
    params: SamplingParams
    request_id: str


@dataclass(slots=True)
class GenerationRequest:
    """What to generate, independent of the API it came from."""

    response_id: str  # e.g. "chatcmpl-<hex>"; choice i runs as engine request "<id>-<i>"
    prompts: list[list[int]]  # token ids, one list per prompt (chat: always one)
    # max_tokens as the client asked (None: up to the context); per-choice seeds are seed + i.
    # Structured output (response_format, guided_*, forced tool calls) travels here too, as
    # SamplingParams fields, so the engine sees it per choice.
    params: SamplingParams
    n: int = 1  # choices per prompt
    stream: bool = False
    include_usage: bool = False  # streams: end with a usage event
    priority: int = 0  # lower runs first
    timeout: float | None = None  # seconds; the server's request_timeout caps it
    # What the API calls the prompt and max_tokens, so a 400 names the client's own field.
    prompt_field: str = "messages"
    max_tokens_field: str = "max_tokens"

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)

    def choices(self, max_model_len: int, defaults: dict[str, Any] | None = None) -> list[Choice]:
        """``n`` choices per prompt, each with its own seed; left-out sampling fields take
        the engine's ``defaults`` here, so what runs is known before the request starts."""
        out = []
        for p, ids in enumerate(self.prompts):
            max_tokens = resolve_max_tokens(self.params.max_tokens, len(ids), max_model_len,
                                            (self.prompt_field, self.max_tokens_field))
            for i in range(self.n):
                index = p * self.n + i
                seed = None if self.params.seed is None else self.params.seed + i
                params = self.params.clone(max_tokens=max_tokens, seed=seed)
                params = params.with_defaults(defaults or {})
                out.append(Choice(index, p, ids, params, f"{self.response_id}-{index}"))
        return out


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int,
                       fields: tuple[str, str] = ("messages", "max_tokens")) -> int | None:
    """``max_tokens`` for a prompt (None: left out, the engine's default applies; the context
    still ends it), or a 400 naming the lengths when it cannot fit; its ``param`` is the
    prompt's field (``fields[0]``) when the prompt alone is too long, else ``fields[1]``."""
    room = max_model_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        asked = prompt_len + (requested or 0)
        raise InvalidRequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({prompt_len} in the prompt, {requested or 0} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            field=fields[1] if room > 0 else fields[0],
        )
    return requested
