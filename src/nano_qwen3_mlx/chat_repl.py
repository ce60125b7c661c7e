"""``nano-qwen3 chat``: a terminal chat that survives Ctrl-C and keeps its history.

Ctrl-C during a reply stops that reply (the part said so far stays in the history); Ctrl-C
at the prompt clears the line; Ctrl-D or ``/exit`` ends the session; ``/reset`` forgets the
conversation. While a reply streams, what the user types is not echoed into it (it waits,
as type-ahead, for the next prompt).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

COMMANDS = "Ctrl-C stops a reply, /reset clears the history, /exit or Ctrl-D quits"


@dataclass(slots=True)
class ChatSession:
    """One conversation with an ``LLM``: the history, and how each reply is sampled."""

    llm: Any
    params: Any  # SamplingParams
    system: str | None = None
    thinking: bool = False
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text``; what was said is kept even if the caller stops."""
        self.history.append({"role": "user", "content": text})
        prompt = self.llm.tokenizer.apply_chat_template(self.history, tokenize=True,
                                                        enable_thinking=self.thinking)
        pieces: list[str] = []
        try:
            for chunk in self.llm.generate_stream(prompt, self.params):
                pieces.append(chunk["text"])
                yield chunk["text"]
        finally:
            self.history.append({"role": "assistant", "content": "".join(pieces)})


def run(session: ChatSession, model_name: str) -> None:
    """The read-reply loop on this terminal (or on piped stdin, without prompts)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        print(f"chatting with {model_name} · {COMMANDS}", file=sys.stderr, flush=True)
    for line in _lines(interactive):
        if line == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        stream = session.reply(line)
        try:
            with _no_echo(interactive):
                for text in stream:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # aborts the request; the partial reply stays in the history
            sys.stdout.write("\n")
            print("(reply stopped)", file=sys.stderr, flush=True)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()


def _lines(interactive: bool) -> Iterator[str]:
    """User lines until EOF or /exit; a prompt_toolkit prompt (history, editing) on a tty."""
    read = _prompt_reader() if interactive else _plain_reader()
    while True:
        try:
            line = read().strip()
        except KeyboardInterrupt:  # at the prompt: drop the line, as shells do
            continue
        except EOFError:
            return
        if line in ("/exit", "/quit"):
            return
        if line:
            yield line


def _plain_reader():
    return lambda: input("")


def _prompt_reader():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    prompt = PromptSession(history=InMemoryHistory())
    return lambda: prompt.prompt("> ")


@contextlib.contextmanager
def _no_echo(interactive: bool) -> Iterator[None]:
    """Turn terminal echo off while a reply streams (Ctrl-C still interrupts)."""
    if not interactive:
        yield
        return
    import termios

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)
