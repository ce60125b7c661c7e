"""The formatter base of the agent APIs (Anthropic Messages, OpenAI Responses) and
``serve_turn``, the runner's ``serve`` for a :class:`~.turns.TurnRun`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ...outputs import RequestOutput
from .call import ApiCall
from .formatter import Formatter, Payload
from .runner import RunResult
from .streaming import stream_run
from .turns import Finish, TurnParser, TurnPrompt, TurnRun, finish_of


@dataclass(slots=True)
class TurnResult:
    """A whole turn: reasoning, text, tool calls (OpenAI shape) and how it ended."""

    reasoning: str
    text: str
    tool_calls: list[dict[str, Any]]
    finish: Finish
    saw_reasoning: bool


class TurnFormatter(Formatter):
    """Base of the agent-API formatters: the turn is parsed as it streams (``stream_output``
    -> :meth:`piece`), or at once from the run's outputs for a JSON response."""

    sse_done = False  # Anthropic and Responses streams end without ``data: [DONE]``

    def __init__(self, prompt: TurnPrompt, use_tools: bool, outputs: list[RequestOutput]):
        self.parser = TurnParser(prompt, use_tools)
        self.outputs = outputs

    def piece(self, kind: str, text: str) -> list[Payload]:
        """Events for a reasoning or text delta."""
        raise NotImplementedError

    def stream_output(self, index: int, out: RequestOutput) -> list[Payload]:
        return [e for kind, text in self.parser.feed(out) for e in self.piece(kind, text)]

    def finish_pieces(self) -> tuple[list[Payload], list[dict[str, Any]]]:
        """At the end of a stream: the events of the held-back text, and the tool calls."""
        pieces, calls = self.parser.finish()
        return [e for kind, text in pieces for e in self.piece(kind, text)], calls

    def collect(self, result: RunResult) -> TurnResult:
        parts: dict[str, list[str]] = {"reasoning": [], "text": []}
        for out in self.outputs:
            for kind, text in self.parser.feed(out):
                parts[kind].append(text)
        pieces, calls = self.parser.finish()
        for kind, text in pieces:
            parts[kind].append(text)
        text = "".join(parts["text"])
        # As parse_tool_calls does for a whole text: the content around calls is stripped.
        return TurnResult("".join(parts["reasoning"]), text.strip() if calls else text, calls,
                          finish_of(result, self.parser), self.parser.reasoning.saw_reasoning)


async def serve_turn(call: ApiCall, run: TurnRun, formatter: Formatter) -> web.StreamResponse:
    """The runner's ``serve`` for a :class:`TurnRun`: SSE events or one JSON body."""
    if run.request.stream:
        return await stream_run(call.http, run, formatter)  # type: ignore[arg-type]
    return web.json_response(formatter.response(await run.collect()))
