"""The chat page at ``/``: ``chat.html`` (package data), one file with its script and style
inline, a small Markdown renderer that escapes HTML first, nothing fetched from elsewhere."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# Inline script and style only; no other origin is reachable from the page.
PAGE_CSP = ("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' data:")


async def chat_page(request: web.Request) -> web.Response:
    """The chat page; it asks for the API key itself (the route needs none)."""
    page = resources.files(__package__).joinpath("chat.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})
