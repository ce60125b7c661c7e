"""``nano-qwen3 chat``: a terminal chat that survives Ctrl-C and keeps its history.

Ctrl-C during a reply stops that reply (the part said so far stays in the history), also
while a long prompt is still being read (prefilled); Ctrl-C at the prompt clears the line;
Ctrl-D or ``/exit`` ends the session; ``/reset`` forgets the conversation; ``/help`` (or any
other ``/word``) lists the commands. A message the context cannot hold is refused in one
line and the conversation goes on. While a reply streams, what the user types is not echoed
into it (it waits, as type-ahead, for the next prompt).

The engine runs in ``AsyncLLM``'s thread, so the terminal's thread only waits on a queue:
Ctrl-C reaches it at once even while the engine is inside one long prefill step, and the
request is aborted (the engine frees it after that step).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InvalidRequestError

COMMANDS = "Ctrl-C stops a reply, /reset clears the history, /exit or Ctrl-D quits, /help lists these"
# A command is one word after one slash; "/usr/bin/env ..." or "/ hello" is a message.
COMMAND = re.compile(r"/[A-Za-z][\w-]*")
T = TypeVar("T")


@dataclass(slots=True)
class ChatSession:
    """One conversation with a started ``AsyncLLM`` (driven on ``loop``): the history, and
    how each reply is sampled."""

    llm: Any  # AsyncLLM, started on `loop`
    loop: asyncio.AbstractEventLoop
    params: Any  # SamplingParams
    system: str | None = None
    thinking: bool = False
    history: list[dict[str, str]] = field(default_factory=list)
    _task: asyncio.Future | None = field(default=None, init=False, repr=False)  # what ``wait`` runs
    _interrupted: bool = field(default=False, init=False, repr=False)  # Ctrl-C since ``ctrl_c``

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text``; what was said is kept even if the caller stops.

        Raises ``InvalidRequestError`` (a prompt over the context) before any text, with the
        history as it was before ``text``.
        """
        self.history.append({"role": "user", "content": text})
        prompt = self.llm.tokenizer.apply_chat_template(self.history, tokenize=True,
                                                        enable_thinking=self.thinking)
        stream = self.llm.generate_stream(prompt, self.params)
        pieces: list[str] = []
        refused = False
        try:
            while (chunk := self.wait(anext(stream, None))) is not None:
                pieces.append(chunk["text"])
                yield chunk["text"]
        except InvalidRequestError:
            refused = True
            raise
        finally:
            # Aborts the request if it is still running; never interrupted itself.
            self.loop.run_until_complete(stream.aclose())
            if refused:
                self.history.pop()
            else:
                self.history.append({"role": "assistant", "content": "".join(pieces)})

    @contextlib.contextmanager
    def ctrl_c(self) -> Iterator[None]:
        """While a reply is under way, from before its prompt is templated until its stream is
        closed, Ctrl-C stops it: the signal is taken by the loop (through its wakeup pipe:
        it may land on the engine thread, inside a long MLX call) and cancels what ``wait``
        runs, at once or when the next ``wait`` starts.

        One handler for the whole reply, not one per ``wait``: between two waits Python's
        default handler was back, and a SIGINT caught by it just before the next ``wait``
        installed the loop's handler could be run by that one (a no-op) instead, and lost.
        """
        self._interrupted = False
        self.loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            yield
        finally:
            self.loop.remove_signal_handler(signal.SIGINT)

    def _interrupt(self) -> None:
        self._interrupted = True
        if self._task is not None:
            self._task.cancel()

    def wait(self, step: Awaitable[T]) -> T:
        """Run ``step`` on the loop; a Ctrl-C (``ctrl_c``) cancels it (which aborts a running
        request) and raises ``KeyboardInterrupt`` here, so the caller stops at once."""
        self._task = task = asyncio.ensure_future(step, loop=self.loop)
        if self._interrupted:  # pressed before this step began
            task.cancel()
        try:
            result = self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            if not self._interrupted:
                raise
        finally:
            self._task = None
        if self._interrupted:
            raise KeyboardInterrupt
        return result


def run(session: ChatSession, model_name: str) -> None:
    """The read-reply loop on this terminal (or on piped stdin, without prompts)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        _note(f"chatting with {model_name} · {COMMANDS}")
    for line in _lines(interactive):
        if COMMAND.fullmatch(line):
            _command(session, line)
            continue
        with session.ctrl_c():
            _say(session, line, interactive)


def _say(session: ChatSession, line: str, interactive: bool) -> None:
    """One turn: the reply streamed to the terminal, a refusal or a stop in one line."""
    stream = session.reply(line)
    try:
        with _no_echo(interactive):
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
    except InvalidRequestError as exc:
        _note(f"error: {exc.message}; not sent, the conversation so far is kept")
        return
    except KeyboardInterrupt:
        stream.close()  # aborts the request; the partial reply stays in the history
        sys.stdout.write("\n")
        _note("(reply stopped)")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()


def _command(session: ChatSession, line: str) -> None:
    if line == "/reset":
        session.reset()
        _note("(history cleared)")
    elif line == "/help":
        _note(f"commands: {COMMANDS}")
    else:
        _note(f"unknown command {line}; {COMMANDS}")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
