"""Fixtures for the scripted-engine server tests (a pytest plugin, see ``server_client``)."""

from __future__ import annotations

import pytest

from nano_qwen3_mlx.tokenizer import Tokenizer
from tests.server_client import make_client
from tests.test_server_fakes import FakeEngine


@pytest.fixture(scope="session")
def tokenizer(qwen_tokenizer_dir):
    return Tokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
async def client(aiohttp_client, engine):
    return await make_client(aiohttp_client, engine)
