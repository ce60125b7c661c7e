"""The package as a user installs it: ``pip install .`` (not editable) into a fresh venv, run
from a folder with no repo around it: models, download, generate, serve + one request."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(venv: Path, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(venv / "bin" / "nano-qwen3"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (args, result.stderr)
    return result


def test_wheel_install_works_from_any_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)], check=True,
                   timeout=900)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "NANO_QWEN3_WEIGHTS", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the user cache dir (platformdirs)
    assert "smollm2-135m" in _run(venv, "models", cwd=elsewhere, env=env).stdout
    path = Path(_run(venv, "download", "smollm2-135m", cwd=elsewhere, env=env).stdout.strip())
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    again = _run(venv, "download", "smollm2-135m", cwd=elsewhere, env=env)
    assert "already downloaded" in again.stderr
    # --config production: a preset shipped inside the package.
    out = _run(venv, "generate", "Hi", "-m", "smollm2-135m", "-n", "3", "--config", "production",
               cwd=elsewhere, env=env)
    assert "3 tokens" in out.stderr
    _serve_one_request(venv, elsewhere, env)


def _serve_one_request(venv: Path, cwd: Path, env: dict) -> None:
    server = subprocess.Popen([str(venv / "bin" / "nano-qwen3"), "serve", "-m", "smollm2-135m",
                               "--port", "0"], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stderr:
            if match := re.search(r"listening\s+(http://\S+)/v1", line):
                url = match.group(1)
                break
        assert url, "the server did not start"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            reply = json.load(resp)
        assert reply["usage"]["completion_tokens"] == 3
        with urllib.request.urlopen(f"{url}/", timeout=30) as resp:  # the page is package data
            assert b"<title>nano-qwen3 chat</title>" in resp.read()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
