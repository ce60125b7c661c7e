"""``nano-qwen3 chat`` in a real terminal (tmux), on the demo model: the banner, Ctrl-C stops
the reply but not the session, typing during a reply is not echoed into it, /reset confirms."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (.ci/run installs it)")
SECRET = "SECRETXX"


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def _screen(session: str) -> str:
    return _tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)


def _wait_for(session: str, predicate, what: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        screen = _screen(session)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; the screen:\n{screen}")


def _reply(screen: str) -> str:
    return screen.rsplit("dragon and a knight.", 1)[-1].strip()


def _at_prompt(screen: str) -> bool:
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    return bool(lines) and lines[-1] == ">"


def test_chat_survives_ctrl_c_and_confirms_reset(smollm2_gguf, tmp_path):
    session = f"chat-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "nano_qwen3_mlx.cli", "chat", "--model", str(smollm2_gguf),
           "--max-tokens", "1000", "--temperature", "0"]
    env = f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ''))} TERM=xterm"
    _tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50",
          f"env {env} {shlex.join(cmd)}; sleep 30")
    try:
        screen = _wait_for(session, lambda s: _at_prompt(s) and "chatting with" in s, "the banner")
        banner = next(line for line in screen.splitlines() if "chatting with" in line)
        assert "Ctrl-C" in banner and "/reset" in banner and "/exit" in banner
        _tmux("send-keys", "-t", session, "Tell me a long story about a dragon and a knight.",
              "Enter")
        started = _wait_for(session, lambda s: len(_reply(s).split()) >= 2, "the reply to start")
        # The terminal does not echo while the reply streams.
        tty = _tmux("display", "-p", "-t", session, "#{pane_tty}").strip()
        modes = subprocess.run(["stty", "-F", tty, "-a"], capture_output=True, text=True).stdout
        assert " -echo " in f" {modes} ".replace("\n", " "), modes
        _tmux("send-keys", "-t", session, "-l", SECRET)
        # More of the reply arrives after the typing, where an echo would have landed.
        _wait_for(session, lambda s: len(_reply(s)) > len(_reply(started)) + 10, "more reply")
        _tmux("send-keys", "-t", session, "C-c")
        screen = _wait_for(session, lambda s: "(reply stopped)" in s and _at_prompt(s),
                           "the reply to stop and a new prompt")
        assert SECRET not in screen
        # The session goes on: a new prompt, and /reset answers.
        _tmux("send-keys", "-t", session, "/reset", "Enter")
        _wait_for(session, lambda s: "(history cleared)" in s and _at_prompt(s), "/reset")
        _tmux("send-keys", "-t", session, "/exit", "Enter")
        deadline = time.monotonic() + 30
        while _tmux("display", "-p", "-t", session, "#{pane_current_command}").strip() != "sleep":
            assert time.monotonic() < deadline, "/exit did not end the chat"
            time.sleep(0.2)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
