"""Schemathesis against ``/openapi.json`` on the real engine (tiny checkpoint): generated
requests, valid and invalid, never get a 5xx, and every response matches the document.

Bounded: 30 examples per operation (plus schemathesis' coverage cases), a 48-token context,
and valid bodies capped at n=4 / max_tokens=4 so the run takes seconds."""

from __future__ import annotations

import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server.openapi import build_openapi
from tests.serve_thread import serve_in_thread

schema = schemathesis.openapi.from_dict(build_openapi(with_auth=False))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def base_url(tiny_qwen3_dir):
    engine = EngineConfig(model=str(tiny_qwen3_dir), num_kv_blocks=256, max_num_seqs=16,
                          max_model_len=48, max_queue_size=256)
    server = ServerConfig(served_model_name="tiny", request_timeout=20)
    with serve_in_thread(engine, server, keepalive_s=0.5) as (url, _):
        yield url


def _bound_work(body) -> None:
    """Keep generation short (valid but huge ``n`` / ``max_tokens`` would only cost time; the
    large values themselves are covered by tests/test_server_fuzz_real.py)."""
    if not isinstance(body, dict):
        return
    for key, cap in (("n", 4), ("max_tokens", 4), ("max_completion_tokens", 4),
                     ("max_output_tokens", 4)):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[key] = cap
    if "input" in body:  # /v1/responses (or /v1/embeddings, which ignores the field)
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = 4
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4  # unset means "up to the context length"


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_conformance(case, base_url, session):
    if case.meta is not None and case.meta.generation.mode.is_positive:
        _bound_work(case.body)  # only valid bodies: capping must not make invalid ones valid
    case.call_and_validate(base_url=base_url, session=session, checks=CHECKS, timeout=30)


def test_served_document_is_the_one_tested(base_url, session):
    served = session.get(f"{base_url}/openapi.json", timeout=10).json()
    assert served == build_openapi(with_auth=False)
    assert schemathesis.openapi.from_dict(served) is not None


def test_server_still_serves_and_is_idle(base_url, session):
    ok = session.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      timeout=30)
    assert ok.status_code == 200
    for _ in range(100):
        stats = session.get(f"{base_url}/stats", timeout=5).json()
        if stats["kv_cache"]["num_used_blocks"] == 0 and stats["requests"]["running"] == 0:
            break
        time.sleep(0.05)
    assert stats["kv_cache"]["num_used_blocks"] == 0 and stats["requests"]["waiting"] == 0
