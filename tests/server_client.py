"""What the scripted-engine server tests share: a ``FakeEngine`` app client and its fixtures.

A test module gets the ``tokenizer``, ``engine`` and ``client`` fixtures with
``pytest_plugins = ["tests.server_fixtures"]``.
"""

from __future__ import annotations

import asyncio

from nano_qwen3_mlx.config import ServerConfig
from nano_qwen3_mlx.server import create_app

USER = [{"role": "user", "content": "hi"}]
_APP_OPTIONS = ("keepalive_s", "max_buffered_chunks", "write_timeout_s")


async def make_client(aiohttp_client, engine, **config):
    """A test client for ``engine``; ``config`` holds ServerConfig fields and app options."""
    options = {k: config.pop(k) for k in _APP_OPTIONS if k in config}
    app = create_app(server_config=ServerConfig(**config), engine=engine,
                     **{"keepalive_s": 0.05, **options})
    return await aiohttp_client(app)


async def wait_inactive(engine, timeout_s: float = 1.0) -> None:
    """Wait (bounded) until the fake engine runs nothing: aborts land a moment after a drop."""
    for _ in range(round(timeout_s / 0.02)):
        if not engine.active:
            return
        await asyncio.sleep(0.02)
