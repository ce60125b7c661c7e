"""From request JSON to engine work: body parsing and ``SamplingParams``."""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ...sampling_params import SamplingParams, check_stop_count
from ..errors import bad_request, from_validation_error
from ..openai.protocol import SamplingFields
from ..state import AsyncLLMLike
from .request import GenerationRequest

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("nano_qwen3_mlx.server")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def parse_body(request: web.Request, model: type[M]) -> M:
    """Read and validate a JSON body (size capped by ``client_max_size``)."""
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not _is_encodable(data):
        # JSON allows "\ud800" escapes; the tokenizer (and UTF-8) cannot take lone surrogates.
        raise bad_request("the request body contains invalid Unicode (a lone surrogate)")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_encodable(data: Any) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def vocab_size(engine: AsyncLLMLike) -> int | None:
    """The tokenizer's vocabulary size (added tokens included), None when it does not say."""
    return getattr(engine.tokenizer, "vocab_size", None)


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    vocab: int | None = None,
                    constraint: dict[str, Any] | None = None) -> SamplingParams:
    """The request's ``SamplingParams`` (``GenerationRequest.choices`` gives each its seed);
    ``constraint``: structured-output fields (server/constraints.py)."""
    given = {
        name: getattr(req, name)
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty")
        if getattr(req, name) is not None
    }
    if req.top_k is not None:
        # OpenAI-style -1 means off; a top_k above the vocabulary keeps every token (sampler).
        given["top_k"] = max(req.top_k, 0)
    if req.stop_token_ids is not None:
        given["stop_token_ids"] = _token_ids(req.stop_token_ids, vocab)
    given.update(constraint or {})
    stop = stop_list(req.stop, "stop")
    bias = _logit_bias(req.logit_bias, vocab)
    return SamplingParams(
        **given, max_tokens=max_tokens, stop_sequences=stop, logprobs=logprobs,
        logit_bias=bias, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, seed=req.seed,
    )


def stop_list(stop: str | list[str] | None, field_name: str) -> list[str]:
    """A request's stop strings as a list; a 400 naming ``field_name`` when there are more
    than ``MAX_STOP_SEQUENCES``."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    check_stop_count(len(stops), field_name)
    return stops


def _in_vocab(token_id: int, vocab: int | None) -> bool:
    return token_id >= 0 and (vocab is None or token_id < vocab)


def _token_ids(ids: list[int], vocab: int | None) -> list[int]:
    if not all(_in_vocab(t, vocab) for t in ids):
        raise bad_request(f"stop_token_ids must be token ids in [0, {vocab or 'vocab size'})",
                          "stop_token_ids")
    return ids


def _logit_bias(bias: dict[str, float] | None, vocab: int | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        valid_key = key.isascii() and key.isdigit() and len(key) < 20 and _in_vocab(int(key), vocab)
        if not valid_key or not math.isfinite(value) or not -100 <= value <= 100:
            raise bad_request(f"logit_bias maps token ids in [0, {vocab or 'vocab size'}) to "
                              "biases in [-100, 100]", "logit_bias")
        out[int(key)] = value
    return out


def openai_request(req: SamplingFields, engine: AsyncLLMLike, prompts: list[list[int]],
                   max_tokens: int | None, logprobs: int | None, response_id: str,
                   constraint: dict[str, Any] | None = None,
                   prompt_field: str = "messages") -> GenerationRequest:
    """The ``GenerationRequest`` of an OpenAI chat or text completion body (whose prompt is
    ``prompt_field``: ``messages`` or ``prompt``)."""
    params = sampling_params(req, max_tokens, logprobs, vocab_size(engine), constraint)
    return GenerationRequest(
        response_id, prompts, params, n=req.n, stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        priority=req.priority, timeout=req.timeout, prompt_field=prompt_field,
    )
