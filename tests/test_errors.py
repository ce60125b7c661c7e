"""Typed errors: each carries its status, code and field; the server renders them without
reading messages or class names, and never shows a client an internal message."""

from __future__ import annotations

import pytest

from nano_qwen3_mlx import QueueFullError, SamplingParams
from nano_qwen3_mlx.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadingError,
    first_line,
)
from nano_qwen3_mlx.server.errors import error_json, to_api_error


@pytest.mark.parametrize("field,value", [("top_p", 2.0), ("max_tokens", 0), ("min_tokens", -1)])
def test_sampling_params_errors_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field and info.value.status == 400
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working
    assert error_json(info.value)["error"]["param"] == field


def test_field_comes_from_the_error_not_from_its_message():
    err = InvalidRequestError("temperature is fine, the prompt is not", field="prompt")
    assert error_json(err)["error"] == {"message": err.message, "type": "invalid_request_error",
                                        "param": "prompt", "code": None}


def test_statuses_codes_and_retry_hints():
    full = QueueFullError("request queue is full (8 requests)")
    assert (full.status, full.code, full.headers) == (429, "queue_full", {"Retry-After": "1"})
    loading = ModelLoadingError()
    assert (loading.status, loading.headers["Retry-After"]) == (503, "5")


def test_a_dead_engine_never_shows_its_message():
    err = EngineDeadError("engine thread died: /home/someone/model/weights.safetensors")
    body = error_json(err)["error"]
    assert body["code"] == "engine_dead" and "/home" not in body["message"]


def test_engine_exceptions_map_by_type():
    assert to_api_error(ValueError("prompt is empty")).status == 400
    assert to_api_error(RuntimeError("boom"), engine_dead=True).status == 503
    assert to_api_error(QueueFullError("full"), engine_dead=True).status == 429
    internal = to_api_error(RuntimeError("/secret/path"))
    assert internal.status == 500 and "/secret" not in error_json(internal)["error"]["message"]


def test_first_line():
    assert first_line(OSError("cannot open\n  detail")) == "cannot open"
    assert first_line(KeyError()) == "KeyError"
