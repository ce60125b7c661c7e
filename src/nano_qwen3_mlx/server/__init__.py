"""OpenAI-compatible HTTP server (aiohttp) over ``AsyncLLM``."""

from .app import create_app
from .state import STATE_KEY, ServerState

__all__ = ["create_app", "STATE_KEY", "ServerState"]
