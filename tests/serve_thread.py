"""The real app (AsyncLLM on a tiny checkpoint) served on loopback from a background thread,
for synchronous HTTP clients such as schemathesis (``requests``)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from nano_qwen3_mlx.async_llm import AsyncLLM
from nano_qwen3_mlx.config import EngineConfig, ServerConfig
from nano_qwen3_mlx.server import create_app


@contextlib.contextmanager
def serve_in_thread(engine_config: EngineConfig, server_config: ServerConfig,
                    **app_options: Any) -> Iterator[tuple[str, AsyncLLM]]:
    """Yield ``(base_url, llm)``; the server and the engine stop when the block ends."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["stop"], box["loop"] = stop, asyncio.get_running_loop()
        try:
            async with AsyncLLM(config=engine_config) as llm:
                app = create_app(server_config=server_config, engine=llm, **app_options)
                runner = web.AppRunner(app, handler_cancellation=True)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                box["url"], box["llm"] = f"http://127.0.0.1:{port}", llm
                started.set()
                await stop.wait()
                await runner.cleanup()
        finally:
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(120)
    if "url" not in box:
        raise RuntimeError("the test server did not start")
    try:
        yield box["url"], box["llm"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(60)
