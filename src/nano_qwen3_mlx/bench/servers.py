"""Running a server for benchmarks: free loopback port, start, wait for ``/health``, stop.

Used by ``nano-qwen3 bench --suite chat`` and by the scripts (``scripts/serverproc.py``).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from ..blas import subprocess_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: str, port: int, extra_args: list[str]) -> list[str]:
    """``nano-qwen3 serve`` for ``model`` on loopback ``port``."""
    return [sys.executable, "-m", "nano_qwen3_mlx.cli", "serve", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args]


def mlx_lm_server_command(model: str, port: int, extra_args: list[str]) -> list[str]:
    """``mlx_lm.server`` (with its prompt cache, on by default) on loopback ``port``."""
    return [sys.executable, "-m", "mlx_lm.server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING", *extra_args]


@contextlib.contextmanager
def running(cmd: list[str], port: int, startup_s: float = 300.0,
            stop_s: float = 60.0) -> Iterator[str]:
    """Start a server and yield its URL once ``/health`` answers 200; stop it afterwards."""
    log = tempfile.TemporaryFile(mode="w+")
    # The same BLAS in both servers (mlx_lm.server would load MLX's reference one).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
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
