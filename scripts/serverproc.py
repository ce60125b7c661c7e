"""Running a server for the scripts: free loopback port, start, wait for ``/health``, stop.

Shared by ``loadtest.py`` and ``bench_server.py`` (both put this folder on ``sys.path`` by
being run as ``python scripts/NAME.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_loopback(url: str) -> None:
    """Refuse anything but a loopback address: these tools must not load anyone else's server."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: {url} is not a loopback address")


def serve_command(model: str, port: int, extra_args: list[str]) -> list[str]:
    """``nano-qwen3 serve`` for ``model`` on loopback ``port``."""
    return [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args]


@contextlib.contextmanager
def running(cmd: list[str], port: int, startup_s: float = 300.0,
            stop_s: float = 60.0) -> Iterator[str]:
    """Start a server and yield its URL once ``/health`` answers 200; stop it afterwards."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"error: {cmd[2]} did not start:\n{log.read()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        _stop(proc, stop_s)
        log.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen, stop_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=stop_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a server a script started is stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile of sorted ``values`` (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]
