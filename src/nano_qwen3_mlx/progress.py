"""A spinner on stderr while the user waits (weights loading, KV pool allocation)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console


class Spinner:
    """``start()``/``stop()`` or ``with``. When stderr is no terminal: the message as one
    plain line if ``plain`` (a server log), else nothing (a CLI's stderr stays clean)."""

    def __init__(self, message: str, *, plain: bool = False) -> None:
        self.console = Console(stderr=True)
        self.message = message
        self.plain = plain
        self._status: Any = None

    def start(self) -> Spinner:
        if self.console.is_terminal:
            self._status = self.console.status(self.message)
            self._status.start()
        elif self.plain:
            print(self.message, file=sys.stderr, flush=True)
        return self

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> Spinner:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
