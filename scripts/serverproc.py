"""Helpers for the scripts: loopback checks, SIGTERM, percentiles, and running a server.

Shared by ``loadtest.py`` and ``bench_server.py`` (both put this folder on ``sys.path`` by
being run as ``python scripts/NAME.py``). Starting and stopping live in
``nano_qwen3_mlx.bench.servers`` (``nano-qwen3 bench`` starts servers too).
"""

from __future__ import annotations

import ipaddress
import signal
import sys
from urllib.parse import urlparse

from nano_qwen3_mlx.bench.servers import free_port, healthy, running, serve_command

__all__ = ["check_loopback", "exit_on_sigterm", "free_port", "healthy", "percentile",
           "running", "serve_command"]


def check_loopback(url: str) -> None:
    """Refuse anything but a loopback address: these tools must not load anyone else's server."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: {url} is not a loopback address")


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a server a script started is stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted ``values`` (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]
