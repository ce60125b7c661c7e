"""``EngineThread``: the one thread that calls MLX, driving one or several engines.

MLX streams are thread-local, so every engine of a process (one per loaded model) is built,
stepped and dropped on this thread. Each turn of the loop runs the commands that arrived
(add, abort, build an engine, ...), then one step of every engine that has work, in turn:
the steps of several loaded models interleave round-robin, one step each per turn.
``AsyncLLM`` is the client: it owns one ``LLMEngine`` and the asyncio side of its requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


def exit_process(code: int) -> None:
    """End the process now, skipping the interpreter's teardown: tearing it down around MLX's
    threads (this module's, the streams') now and then aborted it ("terminate called without
    an active exception"). For ``serve`` once its engines are stopped, ``chat`` once its
    engine is, and a Ctrl-C while an engine thread may still be inside MLX."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class EngineClient(Protocol):
    """What the thread drives: an ``AsyncLLM`` attached to it."""

    def _handle(self, command: tuple) -> None: ...

    def _tick(self) -> bool: ...  # one step if busy; True while it has unfinished requests

    def _thread_died(self, exc: BaseException) -> None: ...


class EngineThread:
    """One daemon thread running commands and the engines' steps; see the module doc."""

    def __init__(self, name: str = "nano-qwen3-engine") -> None:
        self.name = name
        self.error: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._clients: list[EngineClient] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def post(self, client: EngineClient, command: tuple) -> None:
        """Queue a command for ``client._handle`` on the thread (thread-safe)."""
        self._inbox.put((client, command))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the thread between two steps; its result or exception as a future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("the engine thread has stopped"))
            else:
                self._inbox.put((None, ("call", fn, future)))
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``call`` awaited from asyncio."""
        return await asyncio.wrap_future(self.call(fn))

    def attach(self, client: EngineClient) -> None:
        """Drive ``client`` from now on (call on the thread, e.g. inside ``call``)."""
        if client not in self._clients:
            self._clients.append(client)

    def detach(self, client: EngineClient) -> None:
        """Stop driving ``client`` (call on the thread)."""
        if client in self._clients:
            self._clients.remove(client)

    def stop(self) -> None:
        """Ask the loop to end; each attached client gets ``("stop",)`` first."""
        self._inbox.put((None, ("stop",)))

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    # ---- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            busy = False
            while not self._stopping:
                self._handle_commands(block=not busy)
                # list(): a client may detach itself inside its own tick
                busy = any([client._tick() for client in list(self._clients)])
        except BaseException as exc:
            log.exception("engine thread died")
            self.error = exc
            for client in list(self._clients):
                client._thread_died(exc)
        self._fail_calls()

    def _handle_commands(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
            while True:
                self._dispatch(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _dispatch(self, client: EngineClient | None, command: tuple) -> None:
        if client is not None:
            client._handle(command)
        elif command[0] == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)
        elif command[0] == "stop":
            self._stopping = True
            for client in list(self._clients):
                client._handle(("stop",))

    def _fail_calls(self) -> None:
        """Calls queued after the loop ended fail instead of waiting forever."""
        with self._lock:
            self._closed = True
        while True:
            try:
                client, command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if client is None and command[0] == "call":
                command[2].set_exception(RuntimeError("the engine thread has stopped"))
